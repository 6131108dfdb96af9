"""The `zimage` CLI without a server or a model: every user error is one line on stderr and exit status 2, the
API's answers become such lines (a fake transport), and jobs show as kubectl shows objects."""

from __future__ import annotations

import argparse
import io
import json
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image

from zimage_api import cli
from zimage_api.cli_client import ApiClient
from zimage_api.cli_config import Shared
from zimage_api.cli_errors import CliError, Failure, UserError, flagged
from zimage_api.cli_keys import secret_command
from zimage_api.cli_output import age, job_id, render_jobs, table


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ZIMAGE_API_URL", "ZIMAGE_API_KEY", "ZIMAGE_MODEL_SOURCE", "MODELS_DIR"):
        monkeypatch.delenv(name, raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, list[str]]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


@pytest.fixture(scope="module")
def closed() -> Iterator[str]:
    """A URL that refuses connections: its port is bound, but nobody listens (nothing else can take it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def files(tmp_path: Path, closed: str) -> dict[str, str]:
    image, not_image = tmp_path / "in.png", tmp_path / "notes.png"
    Image.new("RGB", (80, 64), (200, 30, 30)).save(image)
    not_image.write_text("not an image")
    return {
        "IMAGE": str(image),
        "NOT_IMAGE": str(not_image),
        "MISSING": str(tmp_path / "missing.png"),
        "CLOSED": closed,
    }


CLOSED = "CLOSED"  # replaced by the `closed` fixture's URL

USER_ERRORS = [
    (["generate", "x", "-n", "9"], "-n/--num-images must be between 1 and 8"),
    (["generate", "x", "--num-images", "0"], "-n/--num-images must be between 1 and 8"),
    (["generate", "x", "--width", "70"], "--width must be between 64 and 2048, a multiple of 16"),
    (["generate", "x", "--height", "4096"], "--height must be between 64 and 2048, a multiple of 16"),
    (["generate", "x", "--steps", "0"], "--steps must be between 1 and 100"),
    (["generate", "x", "--guidance", "21"], "--guidance must be between 0 and 20"),
    (["generate", ""], "PROMPT must not be empty"),
    (["generate", "x", "--mask", "IMAGE"], "--mask needs --image"),
    (["generate", "x", "--strength", "0.5"], "--strength needs --image"),
    (["generate", "x", "--image", "IMAGE", "--strength", "1.5"], "--strength must be above 0 and at most 1"),
    (["generate", "x", "--image", "IMAGE", "--strength", "0"], "--strength must be above 0 and at most 1"),
    (["generate", "x", "--image", "MISSING"], "--image: cannot read"),
    (["generate", "x", "--image", "NOT_IMAGE"], "--image: not an image of an allowed type (png, jpeg, webp)"),
    (["generate", "x", "--image", "IMAGE", "--mask", "NOT_IMAGE"], "--mask: not an image of an allowed type"),
    (["generate", "x", "--variant", "edit"], "--variant edit needs --image"),
    (["generate", "x", "--reference", "IMAGE"], "--reference needs --image"),
    (["generate", "x", "--image", "IMAGE", "--reference", "IMAGE"], "--reference: --variant turbo takes none"),
    (["generate", "x", "--variant", "edit", "--image", "IMAGE", "--reference", "IMAGE"], "--variant edit takes none"),
    (
        ["generate", "x", "--variant", "omni", "--image", "IMAGE", *["--reference", "IMAGE"] * 4],
        "takes at most 3, got 4",
    ),
    (["generate", "x", "--variant", "omni", "--image", "IMAGE", "--mask", "IMAGE"], "--mask: --variant omni edits"),
    (["generate", "x", "--variant", "omni", "--image", "IMAGE", "--reference", "NOT_IMAGE"], "--reference: not an"),
    (["generate", "x", "--model", "nope"], "--model: model 'nope' is neither a directory"),
    (["generate", "x", "--api", CLOSED], f"cannot reach the API at {CLOSED}: connection refused"),
    (["generate", "x", "--api", "localhost:8080"], "--api: not an http(s) URL: 'localhost:8080'"),
    (["generate", "x", "--api", CLOSED, "--variant", "base"], "--variant is for local runs"),
    (["generate", "x", "--api", CLOSED, "--image", "IMAGE", "--steps", "2"], "--steps: not taken by the API's"),
    (["generate", "x", "--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["generate"], "the following arguments are required: prompt"),
    (["generate", "x", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["jobs", "list"], "--api URL (or $ZIMAGE_API_URL)"),
    (["jobs", "watch", "j1", "--api", CLOSED], f"cannot reach the API at {CLOSED}: connection refused"),
    (["jobs", "get", "j1", "-o", "xml", "--api", CLOSED], "argument -o/--output: invalid choice: 'xml'"),
    (["keys", "create", "--tenant", "Team X"], "--tenant must be a DNS label"),
    (["keys", "create", "--tenant", "a", "--id", "UPPER"], "--id: 1-32 characters a-z, 0-9"),
]


@pytest.mark.parametrize(("argv", "message"), USER_ERRORS, ids=[" ".join(a) for a, _ in USER_ERRORS])
def test_a_user_error_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], files: dict[str, str], argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, *[files.get(a, a) for a in argv])
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("zimage: error: ") and message.replace(CLOSED, files[CLOSED]) in err[0], err[0]
    assert out == ""


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture[str], closed: str) -> None:
    code, _, err = run(capsys, "generate", "x", "-n", "9", "--debug")
    assert code == 2
    assert err[0] == "Traceback (most recent call last):"
    assert err[-1] == "zimage: error: -n/--num-images must be between 1 and 8"
    code, _, err = run(capsys, "--debug", "jobs", "list", "--api", closed)
    assert code == 2 and "Traceback" in err[0] and "httpx.ConnectError" in "\n".join(err)


def test_an_internal_error_exits_1_in_one_line_and_commands_register_in_one_place(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(args: argparse.Namespace) -> int:
        raise RuntimeError("a bug\nwith a second line")

    def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], shared: Shared) -> None:
        sub.add_parser("boom", parents=[shared.debug]).set_defaults(func=boom)

    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, register])
    code, _, err = run(capsys, "boom")
    assert code == 1
    assert err == ["zimage: error: internal error: RuntimeError: a bug (--debug shows the traceback)"]
    code, _, err = run(capsys, "boom", "--debug")
    assert code == 1 and err[0].startswith("Traceback") and err[-1].endswith("RuntimeError: a bug")


# -- the API's answers ---------------------------------------------------------------------------------------
def error(status: int, message: str, param: str | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": "x", "param": param, "code": None}})


ANSWERS = [
    (error(401, "invalid API key"), "k", UserError, "the API refused the key: invalid API key (check --api-key"),
    (error(401, "missing or invalid API key"), "", UserError, "the API wants a key: pass --api-key or set"),
    (error(404, "model: no model named 'nope' (GET /v1/models)", "model"), "k", UserError, "--model: no model named"),
    (
        error(400, "numImages: Input should be less than or equal to 8; width: too big", "numImages"),
        "k",
        UserError,
        "-n/--num-images: Input should be less than or equal to 8; --width: too big",
    ),
    (error(429, "rate limit of 1 requests/s exceeded; retry in 2s"), "k", UserError, "rate limit of 1"),
    (error(500, "boom"), "k", Failure, "the API failed (500): boom"),
    (httpx.Response(502, text="<html>\n<b>Bad Gateway</b>\n</html>"), "k", Failure, "(502): <html> <b>Bad Gateway"),
]


@pytest.mark.parametrize(("response", "key", "kind", "message"), ANSWERS)
def test_api_answers_become_one_line(response: httpx.Response, key: str, kind: type[CliError], message: str) -> None:
    client = ApiClient("http://api.test", key, transport=httpx.MockTransport(lambda r: response))
    with client, pytest.raises(kind) as caught:
        client.call("GET", "/v1/jobs")
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.exit_code == (2 if kind is UserError else 1)


def test_event_stream_of_an_unknown_job_and_its_events() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/jobs/nope/events":
            return error(404, "no job 'nope'", "id")
        assert request.headers["authorization"] == "Bearer k" and request.headers["accept"] == "text/event-stream"
        body = ': keepalive\n\nevent: progress\ndata: {"step": 1, "totalSteps": 2}\n\nevent: succeeded\ndata: {}\n\n'
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    with ApiClient("http://api.test/", "k", transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(UserError, match="no job 'nope'"):
            list(client.events("nope"))
        assert list(client.events("j1")) == [("progress", {"step": 1, "totalSteps": 2}), ("succeeded", {})]


def test_image_links_are_fetched_without_the_key() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"png")

    with ApiClient("http://api.test", "secret-key", transport=httpx.MockTransport(answer)) as client:
        assert client.download("https://bucket.s3.test/x.png?X-Amz-Signature=s") == b"png"
    assert "authorization" not in seen[0].headers


def test_flagged_leaves_other_text_alone() -> None:
    assert flagged("strength: too big") == "--strength: too big"
    assert flagged("job dev-1 failed: x") == "job dev-1 failed: x"
    assert flagged("see: http://x") == "see: http://x"


# -- output --------------------------------------------------------------------------------------------------
NOW = datetime(2026, 1, 2, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("created", "shown"),
    [
        ("2026-01-02T11:59:18Z", "42s"),
        ("2026-01-02T11:43:00Z", "17m"),
        ("2026-01-02T07:00:00+00:00", "5h"),
        ("2025-12-30T12:00:00Z", "3d"),
        ("2026-01-02T12:00:05Z", "0s"),  # a clock a little ahead
        (None, "<unknown>"),
        ("yesterday", "<unknown>"),
    ],
)
def test_age_as_kubectl_shows_it(created: str | None, shown: str) -> None:
    assert age(created, NOW) == shown


def job(jid: str, **kw: Any) -> dict[str, Any]:
    base = {"id": jid, "mode": "imagejob", "phase": "Running", "model": "z-image-turbo",
            "progress": {"step": 3, "totalSteps": 8}, "images": [], "createdAt": "2026-01-02T11:59:00Z"}  # fmt: skip
    return {**base, **kw}


def test_jobs_as_a_table_json_yaml_and_names() -> None:
    jobs = [job("dev-1"), job("dev-22", mode="bulk", phase="Succeeded", images=[{}, {}], progress={})]
    assert render_jobs(jobs, "table", NOW).splitlines() == [
        "ID       MODE       PHASE       PROGRESS   IMAGES   MODEL           AGE",
        "dev-1    imagejob   Running     3/8        0        z-image-turbo   60s",
        "dev-22   bulk       Succeeded   -          2        z-image-turbo   60s",
    ]
    assert render_jobs(jobs, "name", NOW) == "job/dev-1\njob/dev-22"
    assert json.loads(render_jobs(jobs, "json", NOW)) == {"object": "list", "data": jobs}
    assert yaml.safe_load(render_jobs(jobs, "yaml", NOW)) == {"object": "list", "data": jobs}
    assert json.loads(render_jobs(jobs[:1], "json", NOW, single=True)) == jobs[0]
    assert render_jobs([], "table", NOW) == ""
    assert table(["A", "LONGER"], [["xyz", ""]]) == "A     LONGER\nxyz"
    assert job_id("job/dev-1") == job_id("dev-1") == "dev-1"


# -- keys ----------------------------------------------------------------------------------------------------
def test_keys_create_prints_the_key_and_an_apply_of_only_its_entry(capsys: pytest.CaptureFixture[str]) -> None:
    from zimage_api.apikeys import KeyRing, parse_entry

    code, out, err = run(capsys, "keys", "create", "--tenant", "team-x", "--id", "123", "-n", "zimage", "--burst", "4")
    assert code == 0
    key = out.strip()
    text = "\n".join(err)
    assert key not in text  # only the hash goes into the Secret
    command = text[text.index("kubectl apply") :]
    first, *manifest, last = command.splitlines()
    assert first == "kubectl apply -n zimage --server-side --field-manager=zimage-key-123 -f - <<'EOF'"
    assert last == "EOF"
    doc = yaml.safe_load("\n".join(manifest))
    assert doc["kind"] == "Secret" and doc["metadata"] == {"name": "zimage-api-keys"}
    assert list(doc["stringData"]) == ["123"]  # a string, though it is all digits
    who = KeyRing({"123": parse_entry("123", doc["stringData"]["123"])}).authenticate(key)
    assert who is not None and who.tenant == "team-x" and who.burst == 4


def test_secret_command_quotes_for_yaml() -> None:
    command = secret_command("keys", None, "k1", '{"tenant": "it\'s"}')
    assert command.startswith("kubectl apply --server-side")
    doc = yaml.safe_load(io.StringIO("\n".join(command.splitlines()[1:-1])))
    assert doc["stringData"] == {"k1": '{"tenant": "it\'s"}'}
