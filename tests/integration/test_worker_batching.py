"""Dynamic batching and the finisher thread, through real Redis and the tiny diffusers model."""

from __future__ import annotations

import io
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from zimage_queue import GenerationParams, JobMessage, JobQueue
from zimage_worker.diffusers_engine import DiffusersEngine
from zimage_worker.engine import Request
from zimage_worker.loop import Worker
from zimage_worker.storage import LocalStore

pytest.importorskip("diffusers")

Q = "ns/m"


class Recording:
    """The tiny engine, recording how many jobs each pipeline call carried."""

    def __init__(self, inner: DiffusersEngine, before_batch: Any = None) -> None:
        self.inner, self.name, self.variant = inner, inner.name, inner.variant
        self.calls: list[int] = []
        self.before_batch = before_batch

    def generate(self, params: GenerationParams, **kw: Any) -> Any:
        self.calls.append(1)
        return self.inner.generate(params, **kw)

    def generate_batch(self, requests: list[Request]) -> Any:
        self.calls.append(len(requests))
        if self.before_batch:
            self.before_batch(requests)
        return self.inner.generate_batch(requests)


@pytest.fixture(scope="module")
def tiny() -> DiffusersEngine:
    return DiffusersEngine("tiny-random", device="cpu")


def job(prompt: str, seed: int, **kw: Any) -> JobMessage:
    params = GenerationParams(prompt=prompt, width=64, height=64, steps=2, seed=seed, **kw)
    return JobMessage(uid=str(uuid.uuid4()), namespace="ns", name=f"j{seed}", queue=Q, params=params)


def pixels(q: JobQueue, uid: str) -> list[np.ndarray]:
    results = q.result(uid)
    assert results is not None
    out = []
    for r in results:
        with Image.open(r.uri.removeprefix("file://")) as img:
            out.append(np.asarray(img.convert("RGB"), dtype=np.int16))
    return out


JOBS = [("a lighthouse", 1), ("a red fox", 2), ("a bowl of ramen", 3), ("a lighthouse", 4), ("a tram", 5)]


def test_compatible_jobs_share_a_call_and_match_their_unbatched_images(
    redis_url: str, tmp_path: Path, tiny: DiffusersEngine
) -> None:
    q = JobQueue.from_url(redis_url)
    batched = [job(p, s, num_images=2 if s == 2 else 1) for p, s in JOBS]
    odd = job("a big one", 9).model_copy(update={"params": job("x", 9).params.model_copy(update={"width": 96})})
    for m in [*batched, odd]:
        q.enqueue(m)
    engine = Recording(tiny)
    Worker(q, engine, LocalStore(tmp_path / "b"), Q, "w", max_batch_size=4).run(max_jobs=6, block_ms=0)
    assert engine.calls == [4, 1, 1], engine.calls  # 4 compatible; then the fifth and the 96-wide one, apart

    alone = [m.model_copy(update={"uid": str(uuid.uuid4())}) for m in batched]
    for m in alone:
        q.enqueue(m)
    single = Recording(tiny)
    Worker(q, single, LocalStore(tmp_path / "a"), Q, "w", max_batch_size=1).run(max_jobs=5, block_ms=0)
    assert single.calls == [1] * 5
    for b, a in zip(batched, alone, strict=True):
        got, want = pixels(q, b.uid), pixels(q, a.uid)
        assert len(got) == len(want) == b.params.num_images
        for x, y in zip(got, want, strict=True):
            diff = np.abs(x - y)
            assert diff.max() <= 2 and diff.mean() < 0.05, (b.params.prompt, diff.max(), diff.mean())
    assert pixels(q, odd.uid)[0].shape == (64, 96, 3)


def test_a_job_cancelled_mid_batch_stops_alone(redis_url: str, tmp_path: Path, tiny: DiffusersEngine) -> None:
    q = JobQueue.from_url(redis_url)
    jobs = [job(p, s) for p, s in JOBS[:3]]
    for m in jobs:
        q.enqueue(m)
    engine = Recording(tiny, before_batch=lambda requests: q.cancel(jobs[1].uid))  # cancelled once it runs
    Worker(q, engine, LocalStore(tmp_path), Q, "w", max_batch_size=3).run(max_jobs=3, block_ms=0)
    assert engine.calls == [3]
    assert q.result(jobs[0].uid) and q.result(jobs[2].uid) and q.result(jobs[1].uid) is None
    events = [e for _, e in q.read_events("t", block_ms=0, count=100)]
    assert [(e.type, e.message) for e in events if e.uid == jobs[1].uid and e.type == "cancelled"] == [
        ("cancelled", "cancelled while running")
    ]


def test_a_failing_batch_is_retried_job_by_job(redis_url: str, tmp_path: Path, tiny: DiffusersEngine) -> None:
    """A job that breaks the batched call (here: any call with more than one job) costs the others nothing."""
    q = JobQueue.from_url(redis_url)
    jobs = [job(p, s) for p, s in JOBS[:4]]
    for m in jobs:
        q.enqueue(m)

    def explode(requests: list[Request]) -> None:
        raise RuntimeError("CUDA out of memory. Tried to allocate 9.00 GiB")

    engine = Recording(tiny, before_batch=explode)
    Worker(q, engine, LocalStore(tmp_path), Q, "w", max_batch_size=4).run(max_jobs=4, block_ms=0)
    assert engine.calls == [4, 1, 1, 1, 1]
    assert all(q.result(m.uid) for m in jobs)


class SlowStore(LocalStore):
    """Blocks the first upload until the engine has started the next batch: proof that storing runs off the
    generation path (with inline storing the second batch could never start while the first upload waits)."""

    def __init__(self, root: Path, next_batch: threading.Event) -> None:
        super().__init__(root)
        self.next_batch, self.overlapped = next_batch, False

    def put(self, key: str, data: bytes, content_type: str) -> str:
        if not self.overlapped:
            self.overlapped = self.next_batch.wait(timeout=30)
        return super().put(key, data, content_type)


def test_encoding_and_upload_overlap_the_next_batch(redis_url: str, tmp_path: Path, tiny: DiffusersEngine) -> None:
    q = JobQueue.from_url(redis_url)
    jobs = [job(p, s) for p, s in JOBS[:4]]
    for m in jobs:
        q.enqueue(m)
    second = threading.Event()
    engine = Recording(tiny, before_batch=lambda requests: second.set() if len(engine.calls) == 2 else None)
    store = SlowStore(tmp_path, second)
    Worker(q, engine, store, Q, "w", max_batch_size=2).run(max_jobs=4, block_ms=0)
    assert engine.calls == [2, 2] and store.overlapped
    assert all(q.result(m.uid) for m in jobs)  # run() returns only once every result is recorded
    for m in jobs:
        [r] = q.result(m.uid) or []
        with Image.open(io.BytesIO(Path(r.uri.removeprefix("file://")).read_bytes())) as img:
            assert img.size == (64, 64)
