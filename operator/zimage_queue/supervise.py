"""Supervised background loops: no silent death.

Every long-running loop of the operator and the worker is a *pass* run over and over. A pass that raises is
logged and the loop goes on after a capped, jittered exponential backoff; a loop whose passes keep failing, or
that has not finished a pass for too long (stuck), makes ``Health.problems`` non-empty, which turns the
process's liveness probe red so Kubernetes restarts it. The bookkeeping is pure (the clock is passed in); the
two runners (asyncio task, thread) are thin.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from zimage_queue.metrics import LOOP_FAILURES

log = logging.getLogger(__name__)

BACKOFF_BASE_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 30.0
MAX_FAILURES = 5  # consecutive failed passes before liveness turns red
STALL_SECONDS = 300.0  # a loop with no finished pass for this long is stuck


def backoff_seconds(
    failures: int, base: float = BACKOFF_BASE_SECONDS, cap: float = BACKOFF_CAP_SECONDS, jitter: float = 1.0
) -> float:
    """Delay before the next pass after ``failures`` consecutive failures; ``jitter`` in [0, 1] ("equal jitter":
    half the exponential step is fixed, half random, so replicas that failed together do not retry together)."""
    step = min(cap, base * 2 ** max(0, failures - 1))
    return step / 2 + step / 2 * jitter


@dataclass
class LoopState:
    started: float
    last_ok: float | None = None
    failures: int = 0
    last_error: str = ""
    passes: int = 0
    stall_seconds: float = STALL_SECONDS


@dataclass
class Health:
    """What every supervised loop of this process last did."""

    max_failures: int = MAX_FAILURES
    loops: dict[str, LoopState] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def register(self, name: str, now: float, stall_seconds: float = STALL_SECONDS) -> LoopState:
        with self._lock:
            st = self.loops[name] = LoopState(started=now, stall_seconds=stall_seconds)
            return st

    def ok(self, name: str, now: float) -> None:
        with self._lock:
            st = self.loops[name]
            st.last_ok, st.failures, st.passes = now, 0, st.passes + 1

    def failed(self, name: str, now: float, error: str) -> int:
        LOOP_FAILURES.labels(loop=name).inc()
        with self._lock:
            st = self.loops[name]
            st.failures += 1
            st.last_error = error[:500]
            return st.failures

    def problems(self, now: float) -> list[str]:
        """Why the process is not live; empty when every loop is well."""
        out = []
        with self._lock:
            for name, st in self.loops.items():
                if st.failures >= self.max_failures:
                    out.append(f"{name}: {st.failures} passes failed in a row (last: {st.last_error})")
                elif now - (st.last_ok if st.last_ok is not None else st.started) > st.stall_seconds:
                    out.append(f"{name}: no pass finished for {now - (st.last_ok or st.started):.0f}s")
        return out

    def report(self, now: float) -> dict[str, dict[str, object]]:
        with self._lock:
            return {
                name: {
                    "failures": st.failures,
                    "passes": st.passes,
                    "secondsSinceOk": None if st.last_ok is None else round(now - st.last_ok, 1),
                    "lastError": st.last_error,
                }
                for name, st in self.loops.items()
            }


async def run_async(
    health: Health,
    name: str,
    one_pass: Callable[[], Awaitable[None]],
    interval: Callable[[], float],
    *,
    stall_seconds: float = STALL_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    backoff_base: float = BACKOFF_BASE_SECONDS,
) -> None:
    """Run ``one_pass`` forever in this task: ``interval()`` seconds apart, backing off after failures."""
    health.register(name, clock(), stall_seconds)
    while True:
        try:
            await one_pass()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            failures = health.failed(name, clock(), f"{type(e).__name__}: {e}")
            delay = backoff_seconds(failures, base=backoff_base, jitter=random.random())
            log.exception("%s failed (%d in a row); next try in %.1fs", name, failures, delay)
            await asyncio.sleep(delay)
            continue
        health.ok(name, clock())
        await asyncio.sleep(interval())


def run_thread(
    health: Health,
    name: str,
    one_pass: Callable[[], None],
    interval: float,
    stop: threading.Event,
    *,
    stall_seconds: float = STALL_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> threading.Thread:
    """Run ``one_pass`` every ``interval`` seconds on a daemon thread until ``stop`` is set."""
    health.register(name, clock(), stall_seconds)

    def loop() -> None:
        delay = interval
        while not stop.wait(delay):
            try:
                one_pass()
            except Exception as e:
                failures = health.failed(name, clock(), f"{type(e).__name__}: {e}")
                delay = backoff_seconds(failures, cap=max(interval, 1.0) * 4, jitter=random.random())
                log.warning("%s failed (%d in a row): %s; next try in %.1fs", name, failures, e, delay)
                continue
            health.ok(name, clock())
            delay = interval

    t = threading.Thread(target=loop, name=name, daemon=True)
    t.start()
    return t


def widen_thread_pool(threads: int) -> ThreadPoolExecutor:
    """Give the running loop a default executor of ``threads`` threads (asyncio's own has min(32, cores + 4),
    six on two cores): every ``asyncio.to_thread`` call (a sync Redis or Kubernetes call) waits for one of
    them, so with six a process serves at most six such calls at once however many jobs are in flight."""
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="blocking")
    asyncio.get_running_loop().set_default_executor(pool)
    return pool


T = TypeVar("T")


async def take_batch(queue: asyncio.Queue[T], limit: int, wait_seconds: float) -> list[T]:
    """Up to ``limit`` items of ``queue``: what is there, after waiting up to ``wait_seconds`` for the first
    (empty when none came), so a loop's pass neither spins nor blocks past its stall check."""
    try:
        first = await asyncio.wait_for(queue.get(), wait_seconds)
    except TimeoutError:
        return []
    batch = [first]
    while len(batch) < limit and not queue.empty():
        batch.append(queue.get_nowait())
    return batch
