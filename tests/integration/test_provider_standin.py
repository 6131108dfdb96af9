"""The provider stand-in (bench/provider.py) through the official ``openai`` SDK: chat completions (plain and
streamed), image generations and edits, 429 with Retry-After over a key's limit, 401, injected 503s, latency,
hanging requests, and the CLI that runs it on the test bed."""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from bench.provider import KeySpec, ProviderStandIn, max_in_window, parse_rate
from conftest import REPO, wait_for
from zimage_queue.server import free_port


@pytest.fixture
def provider() -> Iterator[ProviderStandIn]:
    with ProviderStandIn(keys={"k1": "4/1s", "k2": None, "broken": KeySpec(status=500)}) as p:
        yield p


def client(p: ProviderStandIn, key: str = "k2", **kw: object) -> OpenAI:
    return OpenAI(base_url=p.url, api_key=key, max_retries=0, **kw)  # type: ignore[arg-type]


def png(size: tuple[int, int] = (40, 30), colour: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def decode(b64: str | None) -> Image.Image:
    assert b64
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_parse_rate_and_windows() -> None:
    assert parse_rate("4/1s") == (4, 1.0)
    assert parse_rate("4/s") == (4, 1.0)
    assert parse_rate("60/min") == (60, 60.0)
    assert parse_rate("10/250ms") == (10, 0.25)
    with pytest.raises(ValueError):
        parse_rate("4 per second")
    assert max_in_window([0.0, 0.5, 1.0, 1.6, 3.0], 1.0) == 3  # [0, 1] is closed
    assert max_in_window([], 1.0) == 0


def test_chat_completion(provider: ProviderStandIn) -> None:
    c = client(provider)
    messages: list[dict[str, str]] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
    ]
    r = c.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
    assert r.object == "chat.completion" and r.model == "gpt-4o-mini"
    assert r.choices[0].message.content == "Stand-in reply to: hello there"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 5, 9)
    again = c.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
    assert again.id == r.id and again.choices[0].message.content == r.choices[0].message.content

    short = c.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "one two three"}], max_completion_tokens=2, n=2
    )
    assert [ch.message.content for ch in short.choices] == ["Stand-in reply"] * 2
    assert short.choices[0].finish_reason == "length"

    stream = c.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "a b"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "Stand-in reply to: a b"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_image_generation(provider: ProviderStandIn) -> None:
    c = client(provider)
    r = c.images.generate(model="gpt-image-1", prompt="a red fox", size="64x48", n=2)
    assert r.data is not None and len(r.data) == 2
    images = [decode(d.b64_json) for d in r.data]
    assert all(i.format == "PNG" and i.size == (64, 48) for i in images)
    assert images[0].getpixel((0, 0)) != images[1].getpixel((0, 0))  # one colour per image, from the prompt
    assert r.size == "64x48" and r.usage is not None and r.usage.output_tokens > 0
    same = c.images.generate(model="gpt-image-1", prompt="a red fox", size="64x48")
    assert same.data is not None and decode(same.data[0].b64_json).getpixel((0, 0)) == images[0].getpixel((0, 0))

    jpeg = c.images.generate(model="gpt-image-1", prompt="x", size="32x32", output_format="jpeg")
    assert jpeg.data is not None and decode(jpeg.data[0].b64_json).format == "JPEG"
    linked = c.images.generate(model="dall-e-2", prompt="x", size="16x16", response_format="url")
    assert linked.data is not None and linked.data[0].url
    got = httpx.get(linked.data[0].url)
    assert got.status_code == 200 and Image.open(io.BytesIO(got.content)).size == (16, 16)

    with pytest.raises(openai.BadRequestError) as bad:
        c.images.generate(model="gpt-image-1", prompt="x", size="huge")
    assert bad.value.body["param"] == "size"  # type: ignore[index]


def test_image_edit(provider: ProviderStandIn) -> None:
    c = client(provider)
    r = c.images.edit(model="gpt-image-1", image=("in.png", png((40, 30)), "image/png"), prompt="make it blue")
    assert r.data is not None and decode(r.data[0].b64_json).size == (40, 30)  # size auto: the input's
    r = c.images.edit(
        model="gpt-image-1",
        image=[("in.png", png(), "image/png")],
        mask=("mask.png", png(colour="white"), "image/png"),
        prompt="make it blue",
        size="24x24",
        n=3,
    )
    assert r.data is not None and len(r.data) == 3 and decode(r.data[0].b64_json).size == (24, 24)
    with pytest.raises(openai.BadRequestError):
        c.images.edit(model="gpt-image-1", image=("in.png", b"not an image", "image/png"), prompt="x")
    assert [rec.path for rec in provider.records(status=200)].count("/v1/images/edits") == 2


def test_rate_limit_answers_429_with_retry_after(provider: ProviderStandIn) -> None:
    c = client(provider, "k1")
    for _ in range(4):
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError) as over:
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    resp = over.value.response
    assert resp.status_code == 429
    assert int(resp.headers["retry-after"]) == 1  # whole seconds, rounded up
    wait_ms = int(resp.headers["retry-after-ms"])
    assert 0 < wait_ms <= 1000
    assert over.value.body == {  # OpenAI's error shape
        "message": over.value.body["message"],  # type: ignore[index]
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    # The other keys have their own windows.
    client(provider, "k2").chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    time.sleep(wait_ms / 1000 + 0.01)
    c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    # The SDK's own retries honour the header: a burst of 8 goes through, never more than 4 a second accepted.
    patient = OpenAI(base_url=provider.url, api_key="k1", max_retries=8)
    for _ in range(8):
        patient.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert provider.peak(1.0, "k1") <= 4
    assert provider.statuses("k1")[429] >= 2
    assert provider.statuses("k1")[200] == 13


def test_unknown_or_missing_key_is_401(provider: ProviderStandIn) -> None:
    with pytest.raises(openai.AuthenticationError) as e:
        client(provider, "sk-not-a-known-key").models.list()
    assert e.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    assert "sk-not-a-known-key" not in e.value.body["message"]  # type: ignore[index]
    r = httpx.post(f"{provider.url}/chat/completions", json={"model": "m", "messages": []})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert [rec.status for rec in provider.records()] == [401, 401]
    assert provider.records()[0].key == "sk-not-a-known-key" and provider.records()[1].key is None


def test_injected_faults(provider: ProviderStandIn) -> None:
    c = client(provider)
    provider.down = True
    with pytest.raises(openai.InternalServerError) as e:
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 503 and e.value.body["type"] == "server_error"  # type: ignore[index]
    provider.down = False
    c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])

    with pytest.raises(openai.InternalServerError) as e:  # a key that always fails
        client(provider, "broken").chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 500

    provider.fail_rate, provider.fail_status = 0.5, 502
    outcomes = []
    for _ in range(40):
        try:
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            outcomes.append(200)
        except openai.InternalServerError as err:
            outcomes.append(err.status_code)
    assert set(outcomes) == {200, 502} and 5 <= outcomes.count(502) <= 35
    provider.fail_rate = 0.0

    provider.latency = 0.2
    t0 = time.monotonic()
    c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 >= 0.2
    provider.latency = 0.0

    provider.hang_rate = 1.0
    with pytest.raises(openai.APITimeoutError):
        client(provider, timeout=0.3).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    provider.hang_rate = 0.0


def test_close_does_not_wait_for_hanging_requests() -> None:
    p = ProviderStandIn(keys=["k"], hang_rate=1.0, hang_seconds=60)
    with p:
        with pytest.raises(openai.APITimeoutError):
            client(p, "k", timeout=0.3).models.list()
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 5


FAULTS = ["--latency", "0.01-0.02", "--fail", "503"]


def test_cli() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.provider", "--port", str(port), "--keys", "k1,k2", "--rate", "2/1s", *FAULTS],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    root = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            try:
                return httpx.get(f"{root}/_standin/records").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=30, what="the stand-in CLI")
        c = OpenAI(base_url=f"{root}/v1", api_key="k1", max_retries=0)
        with pytest.raises(openai.InternalServerError):  # --fail 503: the provider is down
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        faults = httpx.post(f"{root}/_standin/faults", json={"fail_rate": 0}).json()
        assert faults["fail_rate"] == 0 and faults["latency"] == [0.01, 0.02]
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.RateLimitError):  # --rate 2/1s
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        seen = httpx.get(f"{root}/_standin/records").json()["records"]
        assert [(r["key"], r["status"]) for r in seen] == [("k1", 503), ("k1", 200), ("k1", 429)]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary == {"requests": 3, "statuses": {"503": 1, "200": 1, "429": 1}}
