"""Remote backends: `zimage-forwarder` processes serve a queue by calling a provider stand-in (a real HTTP server on
loopback, bench/provider.py) through a key pool in a real Redis. Counted on the provider's side: no key ever goes
over its limit, with several replicas sharing the pool; a provider that is down sends jobs to the fallback."""

from __future__ import annotations

import base64
import io
import json
import uuid
from pathlib import Path

import pytest
from PIL import Image

from bench.provider import ProviderStandIn
from conftest import BIN, Processes, wait_for, worker_env
from zimage_queue import GenerationParams, JobMessage, JobQueue
from zimage_queue.keys import queue_name
from zimage_queue.server import RedisServer

NS = "team-a"


@pytest.fixture
def redis_url() -> object:
    with RedisServer() as srv:
        yield srv.url


def keys_dir(tmp: Path, keys: list[str], name: str = "keys") -> Path:
    d = tmp / name
    d.mkdir()
    for i, k in enumerate(keys):
        (d / f"k{i}").write_text(k + "\n")
    return d


def start_forwarder(
    ps: Processes, redis_url: str, model: str, provider: ProviderStandIn, keys: Path, images: Path, **extra: str
) -> None:
    env = worker_env(redis_url, queue_name(NS, model), images)
    env.update(
        {
            "ZIMAGE_WORKER_NAME": f"fw-{model}-{len(ps.procs)}",
            "ZIMAGE_REMOTE_BASE_URL": provider.url,
            "ZIMAGE_REMOTE_MODEL": "gpt-image-1",
            "ZIMAGE_REMOTE_KEYS_DIR": str(keys),
            "ZIMAGE_REMOTE_KEY_POOL": f"{NS}/{keys.name}",
            **extra,
        }
    )
    ps.start(f"forwarder-{model}", [str(BIN / "zimage-forwarder")], env)


def enqueue(q: JobQueue, model: str, n: int, **params: object) -> list[str]:
    uids = []
    for i in range(n):
        uid = uuid.uuid4().hex
        p = GenerationParams.model_validate({"prompt": f"a fox {i}", "width": 64, "height": 64, "seed": i, **params})
        q.enqueue(JobMessage(uid=uid, namespace=NS, name=f"job-{i}", tenant="t", queue=queue_name(NS, model), params=p))
        uids.append(uid)
    return uids


def finished(q: JobQueue, uids: list[str]) -> dict[str, object]:
    return q.finals(uids)  # type: ignore[return-value]


def test_three_replicas_share_five_keys_and_never_exceed_a_limit(
    redis_url: str, tmp_path: Path, processes: Processes
) -> None:
    keys = [f"sk-{i}" for i in range(5)]
    with ProviderStandIn({k: "4/1s" for k in keys}, latency=(0.05, 0.15), seed=1) as provider:
        kd = keys_dir(tmp_path, keys)
        for _ in range(3):
            start_forwarder(processes, redis_url, "remote", provider, kd, tmp_path / "images",
                            ZIMAGE_REMOTE_REQUESTS_PER_WINDOW="4", ZIMAGE_REMOTE_WINDOW_SECONDS="1",
                            ZIMAGE_CONCURRENCY_PER_REPLICA="16")  # fmt: skip
        q = JobQueue.from_url(redis_url)
        uids = enqueue(q, "remote", 100)
        done = wait_for(lambda: (f := finished(q, uids)) and len(f) == len(uids) and f, timeout=90, what="100 jobs")
        assert {f.event.type for f in done.values()} == {"succeeded"}  # type: ignore[attr-defined]
        assert {f.event.worker.rsplit("-", 1)[0] for f in done.values()} == {"fw-remote"}  # type: ignore[attr-defined]
        assert len({f.event.worker for f in done.values()}) == 3  # type: ignore[attr-defined]  # all replicas served
        # The provider's count of every request it received (refused ones too): each key at most 4 in any
        # second, all five together at most 20, so it never had to answer 429.
        assert max(provider.peak(1.0, key=k, accepted=False) for k in keys) <= 4
        assert provider.peak(1.0, accepted=False) <= 20
        assert provider.statuses()[429] == 0
        assert all(provider.records(key=k) for k in keys)  # every key used
        first = next(iter(done.values()))
        [result] = first.results  # type: ignore[attr-defined]
        with Image.open(Path(result.uri.removeprefix("file://"))) as img:
            assert img.size == (64, 64)


def test_a_provider_that_is_down_sends_jobs_to_the_fallback(
    redis_url: str, tmp_path: Path, processes: Processes
) -> None:
    with (
        ProviderStandIn(["sk-a"], down=True) as a,
        ProviderStandIn(["sk-b"]) as b,
    ):
        images = tmp_path / "images"
        start_forwarder(processes, redis_url, "provider-a", a, keys_dir(tmp_path, ["sk-a"], "a-keys"), images,
                        ZIMAGE_REMOTE_MAX_ATTEMPTS="2",
                        ZIMAGE_FALLBACKS=json.dumps({"unavailable": ["provider-b"]}))  # fmt: skip
        start_forwarder(processes, redis_url, "provider-b", b, keys_dir(tmp_path, ["sk-b"], "b-keys"), images)
        q = JobQueue.from_url(redis_url)
        uids = enqueue(q, "provider-a", 3)
        done = wait_for(lambda: (f := finished(q, uids)) and len(f) == 3 and f, timeout=60, what="3 jobs")
        assert {f.event.type for f in done.values()} == {"succeeded"}  # type: ignore[attr-defined]
        assert {f.event.worker.split("-")[1] + "-" + f.event.worker.split("-")[2] for f in done.values()} == {
            "provider-b"
        }  # type: ignore[attr-defined]
        # At most two tries each at A, fewer once its only key is benched after three failures; then B.
        assert 3 <= a.statuses()[503] <= 6 and b.statuses()[200] == 3
        moved = [json.loads(e) for e in read_events(q) if json.loads(e)["type"] == "rerouted"]
        assert len(moved) == 3
        assert {(m["reason"], m["message"]) for m in moved} == {("ProviderUnavailable", "provider-b")}


def test_a_chat_deployment_answers_text(redis_url: str, tmp_path: Path, processes: Processes) -> None:
    with ProviderStandIn(["sk-c"]) as provider:
        start_forwarder(processes, redis_url, "writer", provider, keys_dir(tmp_path, ["sk-c"]), tmp_path / "images",
                        ZIMAGE_REMOTE_API="chat")  # fmt: skip
        q = JobQueue.from_url(redis_url)
        [uid] = enqueue(q, "writer", 1)
        done = wait_for(lambda: finished(q, [uid]), timeout=60, what="the chat job")
        ev = done[uid].event
        assert ev.type == "succeeded" and ev.text and "a fox 0" in ev.text and done[uid].results == []
        [call] = provider.records(key="sk-c")
        assert call.path == "/v1/chat/completions"


def read_events(q: JobQueue) -> list[str]:
    from zimage_queue import keys

    return [
        (fields.get(b"event") or next(iter(fields.values()))).decode()
        for _, fields in q.r.xrange(keys.EVENTS_STREAM)  # type: ignore[union-attr]
    ]


def _decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))
