"""Pure replica decisions for a ModelDeployment's worker pool: (spec, queue, observed pods, now) -> replicas.

Demand is queued plus in-flight jobs. KEDA's Redis scalers count only waiting entries, so a pool whose jobs are all
running looks idle and gets scaled down under its busy workers; counting in-flight work keeps them.

Scaling up happens at once (or once higher demand has lasted ``scaleUpStabilizationSeconds``), scaling down only
after ``scaleDownDelaySeconds`` of continuously lower demand. Within each window the decision is the most
conservative recommendation seen (HPA-style stabilization), so noisy or flapping input cannot make replicas flap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from zimage_operator.conditions import iso
from zimage_operator.types import MAX_SCALING_HISTORY, ModelDeploymentSpec, Scaling

DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
# ReplicaSets delete the lowest cost first; unannotated pods count as 0, so idle workers sit with fresh ones.
IDLE_COST = 0
BUSY_COST = 10_000


class ScaleReason:
    SCALE_UP = "ScaleUp"
    SCALE_DOWN = "ScaleDown"
    WAKE_FROM_ZERO = "WakeFromZero"
    IDLE = "Idle"
    STEADY = "Steady"
    CLAMPED = "Clamped"
    # No change yet: the demand has moved but its window has not elapsed.
    SCALE_UP_STABILIZING = "ScaleUpStabilizing"
    SCALE_DOWN_DELAYED = "ScaleDownDelayed"


@dataclass(frozen=True)
class ScalerState:
    """What the scaler remembers between polls. Losing it (operator restart) only restarts the windows."""

    desired: int | None = None
    low_since: datetime | None = None  # demand below the current replicas, continuously, since then
    low_peak: int = 0  # the highest recommendation seen since low_since: where a scale-down may go
    high_since: datetime | None = None  # demand above the current replicas, continuously, since then
    high_floor: int = 0  # the lowest recommendation seen since high_since: where a delayed scale-up may go
    last_scale_time: datetime | None = None


def policy_for(spec: ModelDeploymentSpec) -> Scaling:
    """The policy the scaler applies to a pool: a forwarder replica absorbs remote.concurrencyPerReplica open
    calls, so that replaces targetQueuePerReplica; every other pool's is spec.scaling as written."""
    if spec.backend == "remote" and spec.remote:
        return spec.scaling.model_copy(update={"target_queue_per_replica": spec.remote.concurrency_per_replica})
    return spec.scaling


def recommend(spec: Scaling, queued: int, in_flight: int, current: int, busy: int) -> int:
    """The replicas this instant's demand asks for, before any window: clamped to [min, max]."""
    lo, hi = spec.min_replicas, max(spec.min_replicas, spec.max_replicas)
    queued, in_flight, busy = max(0, queued), max(0, in_flight), max(0, busy)
    per = spec.target_queue_per_replica
    if current == 0 and queued < spec.activation_queue_length and in_flight == 0 and busy == 0:
        # A sleeping pool wakes only for enough waiting work, so a trickle below the threshold waits for company.
        return lo
    # In-flight jobs in the demand keep ceil(in_flight / per) workers, but jobs spread one per worker can occupy
    # more than that (4 jobs on 4 workers at 4 per replica asks for 1): busy is the floor that spares them.
    want = max(math.ceil((queued + in_flight) / per), busy)
    return min(max(want, lo), hi)


def decide_replicas(
    spec: Scaling,
    queued: int,
    in_flight: int,
    current: int,
    state: ScalerState,
    now: datetime,
    *,
    busy: int,
) -> tuple[int, ScalerState, str]:
    """Return (desired replicas, new state, reason). ``current`` is the workload's replicas as last set.

    ``busy`` is the number of workers holding a job; a scale-down never goes below it, nor below the replicas the
    in-flight jobs alone need.
    """
    current = max(0, current)
    lo, hi = spec.min_replicas, max(spec.min_replicas, spec.max_replicas)
    want = recommend(spec, queued, in_flight, current, busy)

    def scaled(to: int, reason: str) -> tuple[int, ScalerState, str]:
        return to, ScalerState(desired=to, last_scale_time=now), reason

    if current < lo or current > hi:
        # The bounds changed under a running pool: follow the spec now, no window applies to an edit.
        return scaled(min(max(current, lo), hi), ScaleReason.CLAMPED)

    if want > current:
        if current == 0:
            # Waking is gated by activationQueueLength, not by the stabilization window: latency matters most here.
            return scaled(want, ScaleReason.WAKE_FROM_ZERO)
        window = spec.scale_up_stabilization_seconds
        if window <= 0:
            return scaled(want, ScaleReason.SCALE_UP)
        since = state.high_since or now
        floor = want if state.high_since is None else min(state.high_floor, want)
        if (now - since).total_seconds() >= window:
            return scaled(floor, ScaleReason.SCALE_UP)
        return (
            current,
            replace(state, desired=current, high_since=since, high_floor=floor, low_since=None),
            ScaleReason.SCALE_UP_STABILIZING,
        )

    if want < current:
        since = state.low_since or now
        peak = want if state.low_since is None else max(state.low_peak, want)
        if (now - since).total_seconds() >= spec.scale_down_delay_seconds:
            return scaled(peak, ScaleReason.IDLE if peak == 0 else ScaleReason.SCALE_DOWN)
        return (
            current,
            replace(state, desired=current, low_since=since, low_peak=peak, high_since=None),
            ScaleReason.SCALE_DOWN_DELAYED,
        )

    # Demand matches the pool: any pending window is broken, since neither direction was continuous.
    steady = replace(state, desired=current, low_since=None, low_peak=0, high_since=None, high_floor=0)
    return current, steady, ScaleReason.IDLE if current == 0 else ScaleReason.STEADY


def deletion_costs(pods: list[tuple[str, bool]]) -> dict[str, int]:
    """pod name -> pod-deletion-cost, so a scale-down removes idle workers and spares the ones holding a job."""
    return {name: BUSY_COST if busy else IDLE_COST for name, busy in pods}


def record_scaling(
    history: list[dict[str, Any]] | None, from_: int, to: int, reason: str, now: datetime
) -> list[dict[str, Any]]:
    """status.scalingHistory with one change appended, capped to the latest entries."""
    entry = {"time": iso(now), "from": from_, "to": to, "reason": reason}
    return [*(history or []), entry][-MAX_SCALING_HISTORY:]


def fallback_due(
    after_seconds: int, ready: int, queued: int, since: datetime | None, now: datetime
) -> tuple[bool, datetime | None]:
    """Whether waiting jobs should move to the fallback pool: no ready worker, work waiting, for after_seconds.

    Returns (move now, the start of the current no-capacity stretch or None when there is capacity).
    """
    if ready > 0 or queued == 0:
        return False, None
    since = since or now
    return (now - since).total_seconds() >= after_seconds, since
