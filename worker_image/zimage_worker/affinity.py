"""Adapter affinity: which of the job groups a worker holds runs next (pure functions, no Redis, no torch).

A worker that serves LoRA adapters holds a few more jobs than one call takes, grouped by ``batch_key`` (which
includes the adapter set and its scales). It runs next the group of the adapter set already active (no switch
at all), else one whose adapters are all loaded (a cheap ``set_adapters``), else the oldest; a switch that must
load weights comes last. No group waits without bound: once it has been held ``max_wait_s`` or passed over
``max_passes`` times it is due, and due groups run first, oldest first.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from zimage_worker.engine import AdapterSet

T = TypeVar("T")  # a held job (a Delivery in the worker)


@dataclass
class Group(Generic[T]):
    """Jobs that run as one pipeline call: the same batch key (``None``: a job that runs alone)."""

    key: Hashable | None
    adapters: AdapterSet
    jobs: list[T]
    since: float  # when its oldest job was taken (monotonic seconds)
    passed: int = 0  # calls that ran before it while it waited
    seq: int = field(default=0)  # arrival order, for ties


def add(
    groups: list[Group[T]],
    jobs: Iterable[tuple[Hashable | None, AdapterSet, T]],
    now: float,
    max_size: int,
) -> list[Group[T]]:
    """``groups`` with ``jobs`` (key, adapter set, job) added: to a held group of the same key with room (up to
    ``max_size`` jobs), else as a new group. A ``None`` key always starts its own group."""
    out = list(groups)
    seq = max((g.seq for g in out), default=-1) + 1
    for key, adapters, job in jobs:
        home = None
        if key is not None:
            home = next((g for g in out if g.key == key and len(g.jobs) < max_size), None)
        if home is None:
            out.append(Group(key, adapters, [job], now, seq=seq))
            seq += 1
        else:
            home.jobs.append(job)
    return out


def pick(
    groups: Sequence[Group[T]],
    active: AdapterSet | None,
    resident: Collection[str],
    now: float,
    max_wait_s: float,
    max_passes: int,
) -> int:
    """The index in ``groups`` (not empty) of the group to run next.

    1. Due groups (held ``max_wait_s`` or longer, or passed over ``max_passes`` times): the oldest.
    2. A group of the ``active`` adapter set (``None``: the engine has no adapters, so order is arrival).
    3. A group whose adapters are all ``resident``.
    4. The oldest.

    ``max_wait_s <= 0`` turns affinity off: arrival order only.
    """
    if not groups:
        raise ValueError("pick needs at least one group")

    def age(i: int) -> tuple[float, int]:
        return groups[i].since, groups[i].seq

    indices = range(len(groups))
    if max_wait_s <= 0 or active is None:
        return min(indices, key=age)
    due = [i for i in indices if now - groups[i].since >= max_wait_s or groups[i].passed >= max_passes]
    if due:
        return min(due, key=age)
    same = [i for i in indices if groups[i].adapters == active]
    if same:
        return min(same, key=age)
    loaded = [i for i in indices if all(name in resident for name, _ in groups[i].adapters)]
    return min(loaded or indices, key=age)


def take_next(
    groups: list[Group[T]],
    active: AdapterSet | None,
    resident: Collection[str],
    now: float,
    max_wait_s: float,
    max_passes: int,
) -> tuple[Group[T], list[Group[T]]]:
    """``pick`` and remove: the group to run and the rest, each of which was passed over once more."""
    i = pick(groups, active, resident, now, max_wait_s, max_passes)
    rest = groups[:i] + groups[i + 1 :]
    for g in rest:
        g.passed += 1
    return groups[i], rest
