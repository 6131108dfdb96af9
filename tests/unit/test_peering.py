"""The loops' leader follows kopf's peering rule (pure; the peering object's status as kopf writes it)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from zimage_operator.peering import PeeringGate, active

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def peer(priority: int, seen_ago: float = 1.0, lifetime: int = 15) -> dict[str, object]:
    return {"priority": priority, "lifetime": lifetime, "lastseen": (NOW - timedelta(seconds=seen_ago)).isoformat()}


@pytest.mark.parametrize(
    ("status", "mine", "expected"),
    [
        (None, 5, True),  # no peering status yet: nobody outranks us
        ({"me": peer(5)}, 5, True),
        ({"me": peer(5), "other": peer(3)}, 5, True),
        ({"me": peer(3), "other": peer(5)}, 3, False),  # a live peer of a higher priority runs
        ({"me": peer(3), "other": peer(5, seen_ago=20)}, 3, True),  # ... until its claim lapses
        ({"me": peer(5), "twin": peer(5)}, 5, False),  # kopf pauses both on equal priorities
        ({"me": peer(5), "junk": "x", "bad": {"priority": 9, "lastseen": "yesterday"}}, 5, True),
    ],
)
def test_active_follows_kopfs_rule(status: dict[str, object] | None, mine: int, expected: bool) -> None:
    assert active(status, mine, NOW) is expected  # type: ignore[arg-type]


def test_the_gate_reads_the_peering_object_at_most_once_a_second() -> None:
    reads: list[int] = []
    t = [0.0]

    def read() -> dict[str, object]:
        reads.append(1)
        return {"status": {}}

    gate = PeeringGate(read, priority=1, clock=lambda: t[0])
    assert gate() and gate()
    t[0] = 1.5
    assert gate()
    assert len(reads) == 2
