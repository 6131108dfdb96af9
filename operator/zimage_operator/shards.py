"""Sharded operators: which ImageJobs and ModelDeployments one operator process owns.

A shard is a name plus the namespaces it watches (``-n``, kopf's patterns: globs, ``!`` exclusions) and
optionally a label selector (``--selector``). kopf's watches get the selector server-side
(``settings.watching.label_selectors``), so the handlers only ever see the shard's own objects. Worker events
carry no labels: every shard reads the whole events stream through its own consumer group
(``keys.operator_group``) and applies only the events of its own jobs (``Ownership``); the rest it acks in its
own group, where no other shard reads. Each shard has its own leadership: peering object ``peering_name`` and
Redis lease ``keys.operator_lease``.

The parsing and matching here are pure; ``Ownership`` makes one API call for an event of a job it cannot place
from what it already knows (label shards only), and remembers the answer.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
from collections import OrderedDict
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from zimage_queue import JobEvent

# Used in the group and lease names, the peering object's name and the chart's object names.
SHARD_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$")
# Jobs whose shard an API call decided: the answer is kept (labels that move a job between shards while it runs
# are not followed). Bounded: the oldest answers go first.
MAX_REMEMBERED = 50_000

Operator = Literal["exists", "!exists", "=", "!=", "in", "notin"]
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_NAME}$")
_VALUE = re.compile(rf"^({_NAME})?$")
_SET = re.compile(r"^(?P<key>[^\s!=(),]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_CMP = re.compile(r"^(?P<key>[^\s!=(),]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s!=(),]*)$")


class SelectorError(ValueError):
    """A label selector this operator cannot use (bad syntax, or an operator it does not support)."""


@dataclass(frozen=True)
class Requirement:
    key: str
    op: Operator
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Kubernetes' meaning: ``!=`` and ``notin`` also match objects without the label."""
        has = self.key in labels
        if self.op == "exists":
            return has
        if self.op == "!exists":
            return not has
        if self.op in ("=", "in"):
            return has and labels[self.key] in self.values
        return not has or labels[self.key] not in self.values


def _split(selector: str) -> list[str]:
    """Requirements split at the commas outside parentheses."""
    parts, depth, current = [], 0, ""
    for c in selector:
        depth += c == "("
        depth -= c == ")"
        if depth < 0:
            raise SelectorError(f"unbalanced ')' in {selector!r}")
        if c == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += c
    if depth:
        raise SelectorError(f"unbalanced '(' in {selector!r}")
    return [*parts, current]


def _key(key: str, selector: str) -> str:
    if not _KEY.match(key) or len(key.rsplit("/", 1)[0]) > 253:
        raise SelectorError(f"invalid label key {key!r} in {selector!r}")
    return key


def _values(values: Sequence[str], selector: str) -> tuple[str, ...]:
    for v in values:
        if not _VALUE.match(v):
            raise SelectorError(f"invalid label value {v!r} in {selector!r}")
    return tuple(values)


def parse_selector(selector: str) -> tuple[Requirement, ...]:
    """A label selector string as ``kubectl -l`` takes it (equality and set-based requirements, ANDed).

    The API server applies the same string to the shard's watches; this parse is for the events, which carry
    no labels, and to refuse a bad selector at startup rather than on the first watch."""
    if not selector.strip():
        return ()
    out = []
    for raw in _split(selector):
        part = raw.strip()
        if not part:
            raise SelectorError(f"empty requirement in {selector!r}")
        if m := _SET.match(part):
            values = [v.strip() for v in m["values"].split(",")]
            op: Operator = "in" if m["op"] == "in" else "notin"
            out.append(Requirement(_key(m["key"], selector), op, _values(values, selector)))
        elif m := _CMP.match(part):
            op = "!=" if m["op"] == "!=" else "="
            out.append(Requirement(_key(m["key"], selector), op, _values([m["value"]], selector)))
        elif part.startswith("!"):
            out.append(Requirement(_key(part[1:].strip(), selector), "!exists"))
        elif re.match(r"^[^\s!=(),<>]+$", part):
            out.append(Requirement(_key(part, selector), "exists"))
        else:
            raise SelectorError(
                f"unsupported requirement {part!r} in {selector!r} (use key, !key, key=v, key!=v, "
                "key in (a,b), key notin (a,b))"
            )
    return tuple(out)


def selector_matches(requirements: Sequence[Requirement], labels: Mapping[str, str] | None) -> bool:
    return all(r.matches(labels or {}) for r in requirements)


def match_namespace(name: str, pattern: str) -> bool:
    """kopf's ``--namespace`` pattern rule: comma-separated globs, ``!`` excludes, a leading exclusion implies
    a catch-all first."""
    globs = [g.strip() for g in pattern.split(",") if g.strip()]
    if not globs:
        return False
    if globs[0].startswith("!"):
        globs.insert(0, "*")
    matches = first = fnmatch.fnmatchcase(name, globs[0])
    for glob in globs[1:]:
        if glob.startswith("!"):
            matches = matches and not fnmatch.fnmatchcase(name, glob[1:])
        else:
            matches = matches or (first and fnmatch.fnmatchcase(name, glob))
    return matches


def in_namespaces(name: str, patterns: Sequence[str]) -> bool:
    """Whether a shard watching ``patterns`` (none: the whole cluster) watches namespace ``name``."""
    return not patterns or any(match_namespace(name, p) for p in patterns)


def peering_name(base: str, shard: str) -> str:
    """Each shard's replicas meet in their own peering object: a shared one would pause every shard but one."""
    return f"{base}-{shard}" if shard else base


class Ownership:
    """Whether an event's job belongs to this shard.

    No shard (an unsharded install): every event. A namespace shard: the namespace decides, no I/O. A label
    shard: a job its watch has seen unfinished (``known``) is its own; another job is looked up once (``lookup``:
    namespace, name -> the object or None) and the answer remembered. An event of a job that no longer exists
    belongs to nobody (applying it would find nothing)."""

    def __init__(
        self,
        sharded: bool,
        namespaces: Sequence[str] = (),
        selector: str = "",
        lookup: Callable[[str, str], dict[str, Any] | None] | None = None,
        known: Container[str] = (),
        max_remembered: int = MAX_REMEMBERED,
    ) -> None:
        self.sharded = sharded
        self.namespaces = list(namespaces) if sharded else []
        self.requirements = parse_selector(selector) if sharded else ()
        self.lookup = lookup
        self.known = known
        self.max_remembered = max_remembered
        self.remembered: OrderedDict[str, bool] = OrderedDict()
        self.lookups = 0

    def decided(self, ev: JobEvent) -> bool | None:
        """The answer without I/O, or None when only the object's labels can tell."""
        if not self.sharded:
            return True
        if not in_namespaces(ev.namespace, self.namespaces):
            return False
        if not self.requirements or ev.uid in self.known:
            return True
        return self.remembered.get(ev.uid)

    def look_up(self, ev: JobEvent) -> bool:
        """Blocking: one GET of the job."""
        assert self.lookup is not None, "a label shard needs a lookup"
        self.lookups += 1
        obj = self.lookup(ev.namespace, ev.name)
        meta = (obj or {}).get("metadata") or {}
        owned = meta.get("uid") == ev.uid and selector_matches(self.requirements, meta.get("labels"))
        self.remembered[ev.uid] = owned
        self.remembered.move_to_end(ev.uid)
        while len(self.remembered) > self.max_remembered:
            self.remembered.popitem(last=False)
        return owned

    async def __call__(self, ev: JobEvent) -> bool:
        owned = self.decided(ev)
        if owned is None:
            owned = await asyncio.to_thread(self.look_up, ev)
        return owned
