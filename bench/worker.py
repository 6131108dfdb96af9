"""Worker throughput: a bare diffusers loop against our worker, on the same loaded model.

* ``naive``: what one writes first. One ``pipe()`` call per request, one after the other, each image encoded
  to PNG and written to disk before the next call (under ``torch.inference_mode()``, as in the worker, so the
  comparison is about batching and overlap, not autograd bookkeeping).
* ``worker b``: the real ``Worker`` (Redis queue on a private ``redis-server``, local image store) with
  ``max_batch_size=b``: compatible jobs share one pipeline call, encoding and writing run on the finisher
  thread while the next batch computes.

Both get the same burst of ``--requests`` text-to-image requests (different prompts and seeds, one image each,
all submitted at t=0) after a warm-up; images/s is requests over the time to the last image, latency is
submission to stored image. ``engine`` is the time spent inside pipeline calls (CUDA synchronised) less the
worker's own per-step callbacks. ``device idle`` is the time the device had nothing to do between the start of
the first pipeline call and the end of the last (dequeue, start and progress events, cancellation checks,
results, and in the naive loop encoding and writing), as a share of engine time: the worker's overhead on the
GPU's critical path. ``drain`` is what follows the last pipeline call: the last batch's images encoded and
stored.

CPU, tiny model (ratios only, as CI can run it)::

    .venv/bin/python -m bench.worker

The worker's own cost at full image size, on a machine without a GPU: ``stand-in`` holds every image for
``--device-ms`` (sleeping, so the host is free as it is while a GPU computes; no batching gain is assumed)
and returns a real 1024x1024 image from the tiny model, so dequeue, events, PNG encoding and storage are real::

    .venv/bin/python -m bench.worker --model stand-in --size 1024 --device-ms 900 --requests 16 --batch-sizes 1,4

GPU, Z-Image-Turbo's full-size architecture with random weights, 1024x1024, 8 steps, bf16, then a profile of
the worker at batch 4 (top kernels, how busy the GPU was)::

    .venv/bin/python -m bench.worker --model full-random --size 1024 --steps 8 --requests 32 --profile 4
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import PROMPTS
from zimage_queue import GenerationParams, JobMessage, JobQueue
from zimage_queue.server import RedisServer
from zimage_worker.diffusers_engine import DiffusersEngine, denoising_schedule
from zimage_worker.engine import Request, warm_up
from zimage_worker.loop import Worker
from zimage_worker.storage import LocalStore


@dataclass
class Result:
    name: str
    images_per_s: float
    p50_ms: float
    engine_s: float
    wall_s: float
    span_s: float  # first pipeline call's start to the last one's end
    drain_s: float  # last pipeline call's end to the last image stored

    @property
    def idle(self) -> float:
        return (self.span_s - self.engine_s) / self.engine_s


class Timed:
    """Wraps the engine: adds up the time inside pipeline calls, less the time spent in the worker's own
    per-step callbacks (progress events, cancellation checks), which count as worker overhead."""

    def __init__(self, inner: DiffusersEngine | StandIn) -> None:
        self.inner, self.name, self.variant = inner, inner.name, inner.variant
        self.seconds = 0.0
        self.callbacks = 0.0
        self.first = self.last = 0.0  # perf_counter() at the first call's start, the last one's end

    def _clocked(self, fn: Any) -> Any:
        def call(*args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.callbacks += time.perf_counter() - t0

        return call

    def _timed(self, fn: Any, *args: Any, **kw: Any) -> Any:
        t0, before = time.perf_counter(), self.callbacks
        self.first = self.first or t0
        try:
            return fn(*args, **kw)
        finally:
            _sync(self.inner)
            self.last = time.perf_counter()
            self.seconds += self.last - t0 - (self.callbacks - before)

    def generate(self, params: GenerationParams, **kw: Any) -> Any:
        kw = {k: self._clocked(v) if k in ("on_step", "should_stop") else v for k, v in kw.items()}
        return self._timed(self.inner.generate, params, **kw)

    def generate_batch(self, requests: list[Request]) -> Any:
        clocked = [
            Request(r.params, self._clocked(r.on_step), self._clocked(r.should_stop), r.load_image) for r in requests
        ]
        return self._timed(self.inner.generate_batch, clocked)


def _sync(engine: Any) -> None:
    import torch

    device = getattr(engine, "device", None)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


class StandIn:
    """Stands in for a GPU: each image takes ``seconds_per_image`` of sleep (the host is free meanwhile, as
    while CUDA kernels run), a batch takes exactly that per image (no batching gain is assumed), and progress
    and cancellation callbacks run between steps as with the real engine. The images are real: the tiny
    model's output at the requested size, rendered once, so encoding and storing them cost what they do."""

    name = "stand-in"
    variant = "turbo"  # the worker resolves steps and batch keys with the variant's defaults

    def __init__(self, seconds_per_image: float, size: int) -> None:
        self.seconds_per_image = seconds_per_image
        tiny = DiffusersEngine("tiny-random")
        kw: dict[str, Any] = {"on_step": lambda *_: None, "should_stop": lambda: False, "load_image": bytes}
        self.image = tiny.generate(GenerationParams(prompt="stand-in", width=size, height=size, steps=2), **kw)[0]

    def generate(self, params: GenerationParams, **kw: Any) -> list[Any]:
        (images,) = self.generate_batch([Request(params, **kw)])
        assert images is not None
        return images

    def generate_batch(self, requests: list[Request]) -> list[list[Any] | None]:
        steps = requests[0].params.steps or 8
        n = sum(r.params.num_images for r in requests)
        for step in range(1, steps + 1):
            time.sleep(self.seconds_per_image * n / steps)
            for r in requests:
                r.should_stop()  # polled for its cost; nothing here cancels
                r.on_step(step * r.params.num_images, steps * r.params.num_images)
        return [[self.image.copy() for _ in range(r.params.num_images)] for r in requests]


def requests(n: int, size: int, steps: int) -> list[GenerationParams]:
    return [
        GenerationParams(prompt=PROMPTS[i % len(PROMPTS)], width=size, height=size, steps=steps, seed=1000 + i)
        for i in range(n)
    ]


def pipe_call(engine: DiffusersEngine | StandIn, p: GenerationParams) -> Any:
    """One request the way the diffusers documentation shows it: one pipe() call."""
    import torch

    if isinstance(engine, StandIn):
        return engine.generate(p, on_step=lambda *_: None, should_stop=lambda: False, load_image=bytes)[0]
    steps, sigmas = denoising_schedule(p.steps or 8)
    with torch.inference_mode():  # as the worker does: the baseline gets every per-call advantage
        return engine.text_to_image(
            prompt=p.prompt,
            height=p.height,
            width=p.width,
            num_inference_steps=steps,
            sigmas=sigmas,
            guidance_scale=0.0,
            generator=torch.Generator(device=engine.device).manual_seed(p.seed or 0),
        ).images[0]


def naive(engine: DiffusersEngine | StandIn, jobs: list[GenerationParams], out: Path) -> Result:
    """The bare diffusers loop: one pipe() call per request, sequentially, PNG written before the next."""
    latencies, spent = [], 0.0
    t0 = time.perf_counter()
    first = last = 0.0
    for i, p in enumerate(jobs):
        c0 = time.perf_counter()
        first = first or c0
        image = pipe_call(engine, p)
        _sync(engine)
        last = time.perf_counter()
        spent += last - c0
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        (out / f"naive-{i}.png").write_bytes(buf.getvalue())
        latencies.append(time.perf_counter() - t0)
    end = time.perf_counter()
    wall = end - t0
    return Result("naive", len(jobs) / wall, statistics.median(latencies) * 1000, spent, wall, last - first, end - last)


def ours(
    engine: DiffusersEngine | StandIn, jobs: list[GenerationParams], batch: int, redis_url: str, out: Path
) -> Result:
    q = JobQueue.from_url(redis_url)
    queue = f"bench/b{batch}-{uuid.uuid4().hex[:6]}"
    timed = Timed(engine)
    worker = Worker(q, timed, LocalStore(out / queue), queue, "bench", max_batch_size=batch)
    q.ensure_queue(queue)
    messages = [
        JobMessage(uid=str(uuid.uuid4()), namespace="bench", name=f"j{i}", queue=queue, params=p)
        for i, p in enumerate(jobs)
    ]
    t0 = time.perf_counter()
    submitted = time.time()
    for m in messages:
        q.enqueue(m)
    # In this thread, as in a worker process: torch on CPU runs about a quarter slower from a non-main thread.
    worker.run(max_jobs=len(jobs), block_ms=100)
    end = time.perf_counter()
    wall = end - t0
    uids = {m.uid for m in messages}
    events = q.read_events("bench", count=100_000, block_ms=0, group=queue)
    done = {e.uid: e.ts for _, e in events if e.type == "succeeded" and e.uid in uids}
    assert len(done) == len(jobs), f"{len(done)} of {len(jobs)} jobs succeeded"
    latencies = [done[m.uid] - submitted for m in messages]
    p50 = statistics.median(latencies) * 1000
    span, drain = timed.last - timed.first, end - timed.last
    return Result(f"worker b={batch}", len(jobs) / wall, p50, timed.seconds, wall, span, drain)


def profile(
    engine: DiffusersEngine | StandIn, jobs: list[GenerationParams], batch: int, redis_url: str, out: Path
) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = isinstance(engine, DiffusersEngine) and engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with torch_profile(activities=activities) as prof:
        result = ours(engine, jobs, batch, redis_url, out)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15))
    if cuda:  # kernels on one stream do not overlap: their total is the time the GPU was busy
        busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
        print(f"# GPU busy {busy:.2f}s of {result.wall_s:.2f}s wall ({busy / result.wall_s:.0%}) at batch {batch}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", default="tiny-random", help="tiny-random (CPU), full-random (GPU, full size) or stand-in (no model)"
    )
    ap.add_argument("--device-ms", type=float, default=900.0, help="stand-in: device time per image")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,2,4,8")
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="B",
        help="then profile the worker at batch size B with torch.profiler: top operators, and on a GPU how much "
        "of the wall time its kernels kept it busy",
    )
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",")]

    t0 = time.perf_counter()
    engine: DiffusersEngine | StandIn
    if args.model == "stand-in":
        engine = StandIn(args.device_ms / 1000, args.size)
    else:
        engine = DiffusersEngine(args.model, device=args.device, dtype=args.dtype)
    load = time.perf_counter() - t0
    warm = warm_up(engine, args.size, batch=max(batches), steps=2)
    if isinstance(engine, StandIn):
        where = f"no device ({args.device_ms:g} ms per image, slept)"
    elif engine.device.type == "cuda":
        import torch

        where = f"{torch.cuda.get_device_name(engine.device)}, {engine.dtype}"
    else:
        where = f"CPU ({platform.processor() or platform.machine()}), {engine.dtype}"
    print(f"# {args.model} on {where}, {args.size}x{args.size}, {args.steps} steps, "
          f"{args.requests} requests; load {load:.1f}s, warm-up {warm:.1f}s")  # fmt: skip
    jobs = requests(args.requests, args.size, args.steps)
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp, RedisServer() as redis_srv:
        out = Path(tmp)
        rows = [naive(engine, jobs, out)]
        for b in batches:
            rows.append(ours(engine, jobs, b, redis_srv.url, out))
        if args.profile:
            profile(engine, jobs, args.profile, redis_srv.url, out)
    base = rows[0].images_per_s
    print(f"| {'run':<12} | images/s | vs naive | p50 latency ms | engine s | wall s | device idle | drain s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.name:<12} | {r.images_per_s:8.2f} | {r.images_per_s / base:7.2f}x | {r.p50_ms:14.0f} "
            f"| {r.engine_s:8.2f} | {r.wall_s:6.2f} | {r.idle:11.1%} | {r.drain_s:7.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
