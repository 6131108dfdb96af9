"""The worker's liveness: real progress, not ``lambda: True``.

A pipeline call gets a time budget derived from the steps it runs (``call_budget``); a call still running past
it is stuck (a hung kernel, a deadlocked collective), and so is a worker whose supervised loops keep failing.
Either turns /healthz red, so Kubernetes restarts the pod; its jobs are redelivered after the visibility timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from zimage_queue.supervise import Health


def call_budget(total_steps: int, base_seconds: float, step_seconds: float) -> float:
    """Seconds a pipeline call running ``total_steps`` denoising steps (over all its images) may take."""
    return base_seconds + step_seconds * max(1, total_steps)


@dataclass
class Watchdog:
    health: Health
    base_seconds: float = 300.0
    step_seconds: float = 30.0
    clock: Callable[[], float] = time.monotonic
    _call: tuple[float, float] | None = None  # (started, budget) of the pipeline call in progress
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def call_started(self, total_steps: int) -> None:
        with self._lock:
            self._call = (self.clock(), call_budget(total_steps, self.base_seconds, self.step_seconds))

    def call_ended(self) -> None:
        with self._lock:
            self._call = None

    def problems(self) -> list[str]:
        now = self.clock()
        out = self.health.problems(now)
        with self._lock:
            call = self._call
        if call is not None and now - call[0] > call[1]:
            out.append(f"pipeline call running for {now - call[0]:.0f}s, past its budget of {call[1]:.0f}s")
        return out

    def live(self) -> bool:
        return not self.problems()
