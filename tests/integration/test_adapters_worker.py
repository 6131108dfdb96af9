"""Jobs with LoRA adapters through the worker loop: real Redis, the tiny engine with tiny random adapters.

The worker holds up to twice a batch and runs the group of the active adapter set first (adapter affinity);
these tests follow which adapter set each pipeline call ran with."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("peft")

import numpy as np
from PIL import Image

from zimage_queue import GenerationParams, JobMessage, JobQueue
from zimage_queue.message import AdapterSpec, LoraRef
from zimage_worker.diffusers_engine import DiffusersEngine
from zimage_worker.engine import AdapterSet, Request, adapter_set
from zimage_worker.loop import Worker
from zimage_worker.storage import LocalStore
from zimage_worker.tiny import build_tiny_lora

Q = "ns/m"
A: AdapterSet = (("a", 1.0),)
B: AdapterSet = (("b", 0.5),)
BASE: AdapterSet = ()


class Recording(DiffusersEngine):
    """The tiny engine, recording the adapter set and the number of jobs of each pipeline call."""

    calls: list[tuple[AdapterSet, int]]
    before_call: Callable[[], None] | None = None

    def generate_batch(self, requests: list[Request]) -> Any:
        self.calls.append((adapter_set(requests[0].params, self.adapter_scales), len(requests)))
        if self.before_call:
            self.before_call()
        return super().generate_batch(requests)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    root = tmp_path_factory.mktemp("loras")
    specs = [
        AdapterSpec(name="a", source=str(root / "a")),
        AdapterSpec(name="b", source=str(root / "b"), default_scale=0.5),
    ]
    for seed, s in enumerate(specs):
        build_tiny_lora(s.source, seed=seed)
    return Recording("tiny-random", device="cpu", adapters=specs)


@pytest.fixture
def tiny(engine: Recording) -> Recording:
    engine.adapters.unload_all()  # each test starts from the base model with nothing loaded
    engine.calls = []
    engine.before_call = None
    return engine


def job(seed: int, loras: list[tuple[str, float | None]] | None = None) -> JobMessage:
    refs = None if loras is None else [LoraRef(name=n, scale=s) for n, s in loras]
    params = GenerationParams(prompt="a lighthouse", width=64, height=64, steps=2, seed=seed, loras=refs)
    return JobMessage(uid=str(uuid.uuid4()), namespace="ns", name=f"j{seed}", queue=Q, params=params)


def stored(q: JobQueue, uid: str) -> np.ndarray:
    [result] = q.result(uid) or [None]
    assert result is not None
    with Image.open(result.uri.removeprefix("file://")) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def alone(engine: DiffusersEngine, m: JobMessage) -> np.ndarray:
    [image] = engine.generate(m.params, on_step=lambda s, t: None, should_stop=lambda: False, load_image=lambda u: b"")
    return np.asarray(image, dtype=np.int16)


JOBS: list[list[tuple[str, float | None]] | None] = [[("a", 1.0)], [("b", None)], [("a", 1.0)], [("b", 0.5)], None]


def test_jobs_with_adapters_succeed_grouped_by_adapter_set(redis_url: str, tmp_path: Path, tiny: Recording) -> None:
    q = JobQueue.from_url(redis_url)
    jobs = [job(seed, loras) for seed, loras in enumerate([*JOBS, [("a", None)]])]  # a, b, a, b, plain, a
    for m in jobs:
        q.enqueue(m)
    Worker(q, tiny, LocalStore(tmp_path / "i"), Q, "w", max_batch_size=2).run(max_jobs=6, block_ms=0)
    # Four held: the a's, then (a active) the a that came with the plain job, the plain job (no load needed),
    # and the b's last, one switch each.
    assert tiny.calls == [(A, 2), (A, 1), (BASE, 1), (B, 2)]
    assert [q.state(m.uid) for m in jobs] == ["succeeded"] * 6
    for m in jobs:  # each job's image is its own adapter set's, as if it ran alone
        assert np.abs(stored(q, m.uid) - alone(tiny, m)).max() <= 2, m.params.loras
    assert np.abs(stored(q, jobs[0].uid) - alone(tiny, job(0))).mean() > 1.0  # and a did apply


def test_without_affinity_the_worker_runs_what_it_reads_in_order(
    redis_url: str, tmp_path: Path, tiny: Recording
) -> None:
    q = JobQueue.from_url(redis_url)
    jobs = [job(seed, loras) for seed, loras in enumerate(JOBS)]
    for m in jobs:
        q.enqueue(m)
    worker = Worker(q, tiny, LocalStore(tmp_path / "i"), Q, "w", max_batch_size=2, adapter_affinity_max_wait_ms=0)
    worker.run(max_jobs=5, block_ms=0)
    assert tiny.calls == [(A, 1), (B, 1), (A, 1), (B, 1), (BASE, 1)]
    assert [q.state(m.uid) for m in jobs] == ["succeeded"] * 5


def test_an_unknown_adapter_fails_the_job_without_retries(redis_url: str, tmp_path: Path, tiny: Recording) -> None:
    q = JobQueue.from_url(redis_url)
    bad, good = job(1, [("nope", 1.0)]), job(2, [("a", 1.0)])
    for m in (bad, good):
        q.enqueue(m)
    Worker(q, tiny, LocalStore(tmp_path / "i"), Q, "w").run(max_jobs=2, block_ms=0)
    final = q.finals([bad.uid])[bad.uid].event
    assert q.state(bad.uid) == "failed" and final.reason == "InvalidInput" and final.attempt == 1
    assert final.message == "unknown adapter(s) nope: this worker serves a, b"
    assert q.state(good.uid) == "succeeded"


def test_held_jobs_go_back_to_the_queue_when_the_worker_stops(redis_url: str, tmp_path: Path, tiny: Recording) -> None:
    q = JobQueue.from_url(redis_url)
    jobs = [job(seed, loras) for seed, loras in enumerate(JOBS[:4])]  # a, b, a, b
    for m in jobs:
        q.enqueue(m)
    store = LocalStore(tmp_path / "i")
    first = Worker(q, tiny, store, Q, "w1", max_batch_size=2)
    tiny.before_call = first.request_stop  # SIGTERM during the first call: finish it, hand back the rest
    first.run(block_ms=0)
    assert tiny.calls == [(A, 2)]
    assert [q.state(m.uid) for m in jobs] == ["succeeded", "queued", "succeeded", "queued"]
    assert first.held == [] and first.pending == []

    tiny.before_call = None
    Worker(q, tiny, store, Q, "w2", max_batch_size=2).run(max_jobs=2, block_ms=0)
    assert tiny.calls == [(A, 2), (B, 2)]
    for m in (jobs[1], jobs[3]):
        assert q.state(m.uid) == "succeeded" and q.finals([m.uid])[m.uid].event.attempt == 1  # not counted twice
