"""The queue-length scaler, table-driven: single decisions, then trajectories fed over simulated time."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from zimage_operator.scaling import (
    BUSY_COST,
    IDLE_COST,
    ScaleReason,
    ScalerState,
    decide_replicas,
    deletion_costs,
    record_scaling,
)
from zimage_operator.types import MAX_SCALING_HISTORY, Scaling

T0 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
R = ScaleReason

Sample = tuple[float, int, int, int]  # (seconds since T0, queued, in_flight, busy)


def scaling(**kw: Any) -> Scaling:
    return Scaling.model_validate(kw)


def simulate(spec: Scaling, samples: list[Sample], start: int = 0) -> list[int]:
    """Feed polls in order, applying each decision as the next poll's current replicas; return the trajectory."""
    current, state, out = start, ScalerState(), []
    for t, queued, in_flight, busy in samples:
        current, state, _ = decide_replicas(
            spec, queued, in_flight, current, state, T0 + timedelta(seconds=t), busy=busy
        )
        out.append(current)
    return out


@pytest.mark.parametrize(
    ("spec", "queued", "in_flight", "busy", "current", "replicas", "reason"),
    [
        pytest.param({}, 0, 0, 0, 0, 0, R.IDLE, id="idle pool stays at zero"),
        pytest.param({}, 1, 0, 0, 0, 1, R.WAKE_FROM_ZERO, id="one job wakes an idle pool"),
        pytest.param({"activationQueueLength": 3}, 2, 0, 0, 0, 0, R.IDLE, id="below activation stays asleep"),
        pytest.param({"activationQueueLength": 3}, 3, 0, 0, 0, 1, R.WAKE_FROM_ZERO, id="activation reached"),
        pytest.param({"activationQueueLength": 3}, 0, 1, 1, 0, 1, R.WAKE_FROM_ZERO, id="in-flight work is active"),
        pytest.param({}, 40, 0, 0, 0, 4, R.WAKE_FROM_ZERO, id="burst wakes straight to max"),
        pytest.param({}, 12, 0, 0, 1, 3, R.SCALE_UP, id="scale up at once"),
        pytest.param({}, 9, 0, 0, 1, 3, R.SCALE_UP, id="partial replica rounds up"),
        pytest.param({}, 100, 0, 0, 2, 4, R.SCALE_UP, id="capped at maxReplicas"),
        pytest.param({"scaleUpStabilizationSeconds": 10}, 12, 0, 0, 1, 1, R.SCALE_UP_STABILIZING, id="stabilizing"),
        pytest.param({"minReplicas": 2}, 0, 0, 0, 2, 2, R.STEADY, id="minReplicas kept when idle"),
        pytest.param({"minReplicas": 3}, 0, 0, 0, 1, 3, R.CLAMPED, id="raised min applies now"),
        pytest.param({"maxReplicas": 2}, 50, 4, 4, 4, 2, R.CLAMPED, id="lowered max applies now"),
        pytest.param({}, 0, 0, 0, 3, 3, R.SCALE_DOWN_DELAYED, id="scale down waits"),
        pytest.param({"scaleDownDelaySeconds": 0}, 0, 0, 0, 3, 0, R.IDLE, id="no delay: down to zero at once"),
        pytest.param({"scaleDownDelaySeconds": 0}, 4, 0, 0, 3, 1, R.SCALE_DOWN, id="no delay: down at once"),
        pytest.param({}, 8, 0, 0, 2, 2, R.STEADY, id="steady"),
        pytest.param({"scaleDownDelaySeconds": 0}, 0, 8, 2, 2, 2, R.STEADY, id="in-flight work keeps its workers"),
        pytest.param({"scaleDownDelaySeconds": 0}, 0, 4, 4, 4, 4, R.STEADY, id="busy workers are a floor"),
        pytest.param({"scaleDownDelaySeconds": 0}, 0, 2, 2, 4, 2, R.SCALE_DOWN, id="down to the busy workers"),
        pytest.param({}, -5, -1, -1, 0, 0, R.IDLE, id="negative counts read as zero"),
        pytest.param({"minReplicas": 3, "maxReplicas": 1}, 9, 0, 0, 3, 3, R.STEADY, id="min over max: min wins"),
    ],
)
def test_single_decision(
    spec: dict[str, Any], queued: int, in_flight: int, busy: int, current: int, replicas: int, reason: str
) -> None:
    got, state, why = decide_replicas(scaling(**spec), queued, in_flight, current, ScalerState(), T0, busy=busy)
    assert (got, why) == (replicas, reason)
    assert state.desired == got
    assert state.last_scale_time == (T0 if got != current else None)


def _flap(period: int, high: tuple[int, int, int], low: tuple[int, int, int], until: int) -> list[Sample]:
    return [(float(t), *(high if (t // period) % 2 == 0 else low)) for t in range(until)]


TRAJECTORIES: list[Any] = [
    pytest.param(
        {},
        [(0, 0, 0, 0), (1, 1, 0, 0), (2, 0, 1, 1), (30, 0, 0, 0), (89, 0, 0, 0), (90, 0, 0, 0), (91, 0, 0, 0)],
        0,
        [0, 1, 1, 1, 1, 0, 0],
        id="a single job wakes the pool, which sleeps scaleDownDelaySeconds after it finished",
    ),
    pytest.param(
        {},
        [(0, 0, 0, 0), (1, 0, 1, 1), (30, 1, 1, 1), (60, 0, 1, 1), (200, 0, 0, 0), (259, 0, 0, 0), (260, 0, 0, 0)],
        1,
        [1, 1, 1, 1, 1, 1, 0],
        id="work arriving during the delay restarts it",
    ),
    pytest.param(
        {},
        _flap(1, (0, 8, 2), (0, 0, 0), 300),
        2,
        [2] * 300,
        id="flapping every poll: never scales down",
    ),
    pytest.param(
        {},
        _flap(30, (8, 0, 0), (0, 0, 0), 300),
        2,
        [2] * 300,
        id="flapping slower than a poll but faster than the delay: still no flap",
    ),
    pytest.param(
        {},
        [(float(t), 4 + t % 2, 0, 0) for t in range(200)],
        1,
        [1] + [2] * 199,
        id="noise across a replica boundary: one step up, none back",
    ),
    pytest.param(
        {"scaleDownDelaySeconds": 10},
        [(0, 0, 16, 4), (1, 0, 4, 1), (3, 0, 12, 3), (6, 0, 4, 1), (9, 0, 8, 2), (11, 0, 4, 1), (12, 0, 4, 1)],
        4,
        [4, 4, 4, 4, 4, 3, 3],
        id="noisy drain: scale down to the highest demand seen in the window",
    ),
    pytest.param(
        {"scaleUpStabilizationSeconds": 10},
        [(0, 4, 0, 0), (1, 16, 0, 0), (2, 4, 0, 0), (20, 16, 0, 0), (25, 12, 0, 0), (29, 16, 0, 0), (30, 16, 0, 0)],
        1,
        [1, 1, 1, 1, 1, 1, 3],
        id="a spike is ignored; sustained demand scales to the lowest level it held",
    ),
    pytest.param(
        {"scaleUpStabilizationSeconds": 10},
        [(0, 0, 0, 0), (1, 40, 0, 0)],
        0,
        [0, 4],
        id="stabilization does not delay waking from zero",
    ),
    pytest.param(
        {"targetQueuePerReplica": 4},
        [(0, 0, 4, 4), (100, 0, 4, 4), (200, 0, 1, 1), (259, 0, 1, 1), (260, 0, 1, 1), (400, 0, 0, 0)],
        4,
        [4, 4, 4, 4, 1, 1],
        id="four long jobs on four workers are not consolidated onto one",
    ),
    pytest.param(
        {"minReplicas": 1},
        [(0, 0, 0, 0), (100, 0, 0, 0), (1000, 0, 0, 0)],
        1,
        [1, 1, 1],
        id="minReplicas 1 never sleeps",
    ),
]


@pytest.mark.parametrize(("spec", "samples", "start", "trajectory"), TRAJECTORIES)
def test_trajectory(spec: dict[str, Any], samples: list[Sample], start: int, trajectory: list[int]) -> None:
    assert simulate(scaling(**spec), samples, start) == trajectory


@pytest.mark.parametrize("seed", range(5))
def test_random_noise_is_damped(seed: int) -> None:
    """Load in phases, read with jitter and dropped samples: every scale-down follows a full quiet delay since the
    previous change, and never drops below the busy workers."""
    rng = random.Random(seed)
    spec = scaling(scaleDownDelaySeconds=60, maxReplicas=8)
    current, state = 0, ScalerState()
    changes: list[tuple[int, int, int]] = []  # (t, from, to)
    level = 0
    for t in range(3600):
        if t % 200 == 0:
            level = rng.choice([0, 2, 8, 20, 40])
        queued = 0 if rng.random() < 0.1 else max(0, level + rng.randint(-3, 3))
        busy = min(current, rng.randint(0, 3))
        before = current
        now = T0 + timedelta(seconds=t)
        current, state, _ = decide_replicas(spec, queued, busy, current, state, now, busy=busy)
        if current != before:
            changes.append((t, before, current))
        if current < before:
            assert current >= busy
    downs = [i for i, (_, before, after) in enumerate(changes) if after < before]
    assert downs, "the phases include quiet ones: the pool must have scaled down at least once"
    for i in downs:
        assert i == 0 or changes[i][0] - changes[i - 1][0] > 60, changes
    assert len(changes) <= 3600 // 60, "more changes than one per delay: flapping"


def test_windows_survive_only_while_continuous() -> None:
    spec = scaling(scaleDownDelaySeconds=60)
    _, state, reason = decide_replicas(spec, 0, 0, 2, ScalerState(), T0, busy=0)
    assert reason == R.SCALE_DOWN_DELAYED and state.low_since == T0
    _, state, reason = decide_replicas(spec, 8, 0, 2, state, T0 + timedelta(seconds=30), busy=0)
    assert reason == R.STEADY and state.low_since is None
    _, state, _ = decide_replicas(spec, 0, 0, 2, state, T0 + timedelta(seconds=61), busy=0)
    assert state.low_since == T0 + timedelta(seconds=61)


def test_deletion_costs_spare_busy_pods() -> None:
    costs = deletion_costs([("w-a", True), ("w-b", False), ("w-c", True)])
    assert costs == {"w-a": BUSY_COST, "w-b": IDLE_COST, "w-c": BUSY_COST}
    assert min(costs, key=lambda name: costs[name]) == "w-b"
    assert deletion_costs([]) == {}


def test_scaling_history_keeps_the_latest() -> None:
    history: list[dict[str, Any]] = []
    for i in range(MAX_SCALING_HISTORY + 3):
        history = record_scaling(history, i, i + 1, R.SCALE_UP, T0 + timedelta(seconds=i))
    assert len(history) == MAX_SCALING_HISTORY
    assert history[0]["from"] == 3 and history[-1] == {
        "time": "2026-11-23T12:00:12Z",
        "from": 12,
        "to": 13,
        "reason": "ScaleUp",
    }


@pytest.mark.parametrize(
    ("ready", "queued", "waited", "due"),
    [(0, 3, 10, True), (0, 3, 9, False), (1, 3, 60, False), (0, 0, 60, False)],
)
def test_fallback_after_a_stretch_without_capacity(ready: int, queued: int, waited: int, due: bool) -> None:
    from zimage_operator.scaling import fallback_due

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    first, since = fallback_due(10, ready, queued, None, t0)
    assert not first
    got, _ = fallback_due(10, ready, queued, since, t0 + timedelta(seconds=waited))
    assert got is due
