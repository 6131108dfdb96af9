"""Sharded operators: selectors, namespace patterns, event ownership, names, and the CLI's refusals."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from kopf._cogs.structs.references import NamespaceName
from kopf._cogs.structs.references import match_namespace as kopf_match_namespace

from zimage_operator import shards
from zimage_operator.__main__ import main
from zimage_operator.shards import Ownership, Requirement, SelectorError, parse_selector, selector_matches
from zimage_queue import JobEvent, keys


@pytest.mark.parametrize(
    ("selector", "parsed"),
    [
        ("", ()),
        ("zimage.dev/shard=a", (Requirement("zimage.dev/shard", "=", ("a",)),)),
        ("zimage.dev/shard==a", (Requirement("zimage.dev/shard", "=", ("a",)),)),
        (" team != b ", (Requirement("team", "!=", ("b",)),)),
        ("tier", (Requirement("tier", "exists"),)),
        ("!tier", (Requirement("tier", "!exists"),)),
        ("team in (a, b),tier", (Requirement("team", "in", ("a", "b")), Requirement("tier", "exists"))),
        ("team notin (a)", (Requirement("team", "notin", ("a",)),)),
        ("team=", (Requirement("team", "=", ("",)),)),
    ],
)
def test_selectors_parse_as_kubectl_reads_them(selector: str, parsed: tuple[Requirement, ...]) -> None:
    assert parse_selector(selector) == parsed


@pytest.mark.parametrize(
    "selector",
    ["team=a,", "team in (a", "team in a)", "team>3", "team=a b", "-bad=a", "team=-x", "x/y/z=a", "team in(a)b"],
)
def test_bad_selectors_are_refused(selector: str) -> None:
    with pytest.raises(SelectorError):
        parse_selector(selector)


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("team=a", {"team": "a"}, True),
        ("team=a", {"team": "b"}, False),
        ("team=a", {}, False),
        ("team!=a", {}, True),  # Kubernetes: an object without the label matches !=
        ("team!=a", {"team": "a"}, False),
        ("team in (a,b)", {"team": "b"}, True),
        ("team notin (a,b)", {"other": "x"}, True),
        ("team notin (a,b)", {"team": "a"}, False),
        ("tier", {"tier": ""}, True),
        ("!tier", {"tier": ""}, False),
        ("team=a,tier", {"team": "a"}, False),  # requirements are ANDed
        ("", {}, True),
    ],
)
def test_selector_matching_follows_kubernetes(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert selector_matches(parse_selector(selector), labels) is expected


@pytest.mark.parametrize(
    "pattern", ["team-a", "team-*", "!team-b", "team-*,!team-b", "*,!kube-*", "team-?", "other,team-a", ""]
)
@pytest.mark.parametrize("name", ["team-a", "team-b", "team-ab", "kube-system", "default"])
def test_namespace_patterns_mean_what_kopf_watches(pattern: str, name: str) -> None:
    assert shards.match_namespace(name, pattern) == kopf_match_namespace(NamespaceName(name), pattern)


def test_names_of_an_unsharded_install_are_unchanged() -> None:
    assert keys.operator_lease("") == keys.OPERATOR_LEASE == "zimage:operator-lease"
    assert keys.operator_group("") == keys.OPERATOR_GROUP == "operator"
    assert shards.peering_name("zimage", "") == "zimage"
    assert keys.operator_lease("a") != keys.operator_lease("b") != keys.OPERATOR_LEASE
    assert {keys.operator_group("a"), keys.operator_group("b")} == {"operator-a", "operator-b"}
    assert shards.peering_name("zimage", "a") == "zimage-a"


def event(ns: str = "team-a", uid: str = "u1", name: str = "j1") -> JobEvent:
    return JobEvent(type="started", uid=uid, namespace=ns, name=name)


def owned(o: Ownership, ev: JobEvent) -> bool:
    return asyncio.run(o(ev))


def test_unsharded_owns_every_event_without_lookups() -> None:
    o = Ownership(False, ["team-a"], "team=a")  # an unsharded operator applies every event, as before
    assert owned(o, event("elsewhere")) and o.lookups == 0


def test_a_namespace_shard_decides_by_namespace_alone() -> None:
    o = Ownership(True, ["team-*,!team-x", "ops"])
    assert owned(o, event("team-a")) and owned(o, event("ops"))
    assert not owned(o, event("team-x"))
    assert not owned(o, event("other"))
    assert owned(Ownership(True, ["team-*", "!team-x"]), event("team-x"))  # as for kopf: separate -n are ORed
    assert Ownership(True, []).decided(event("anything")) is True  # -A: the whole cluster


class Jobs:
    def __init__(self, objects: dict[tuple[str, str], dict[str, Any]]) -> None:
        self.objects = objects
        self.calls: list[tuple[str, str]] = []

    def __call__(self, ns: str, name: str) -> dict[str, Any] | None:
        self.calls.append((ns, name))
        return self.objects.get((ns, name))


def job(uid: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"uid": uid, "labels": labels}}


def test_a_label_shard_looks_each_unknown_job_up_once() -> None:
    jobs = Jobs({("ns", "mine"): job("u-mine", shard="a"), ("ns", "theirs"): job("u-theirs", shard="b")})
    known = {"u-seen": ("ns", "seen")}
    o = Ownership(True, ["ns"], "shard=a", lookup=jobs, known=known)
    assert owned(o, event("ns", "u-seen", "seen")) and jobs.calls == []  # its watch saw it: no lookup
    for _ in range(3):
        assert owned(o, event("ns", "u-mine", "mine"))
        assert not owned(o, event("ns", "u-theirs", "theirs"))
    assert jobs.calls == [("ns", "mine"), ("ns", "theirs")]
    assert not owned(o, event("other-ns", "u-x", "x")) and len(jobs.calls) == 2  # outside its namespaces
    # a job gone, or a newer one under the same name: nobody's
    assert not owned(o, event("ns", "u-gone", "gone"))
    assert not owned(o, event("ns", "u-old", "mine"))


def test_remembered_answers_are_bounded() -> None:
    jobs = Jobs({("ns", f"j{i}"): job(f"u{i}", shard="b") for i in range(50)})
    o = Ownership(True, [], "shard=a", lookup=jobs, max_remembered=10)
    for i in range(50):
        owned(o, event("ns", f"u{i}", f"j{i}"))
    assert len(o.remembered) == 10 and list(o.remembered)[-1] == "u49"


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--selector", "shard=a"], "--selector needs --shard"),
        (["--shard", "Team_A"], "shard"),
        (["--shard", "a", "--selector", "team>1"], "unsupported requirement"),
        (["--shard", "a", "--peering", "z", "-n", "team-*"], "name one namespace literally"),
    ],
)
def test_the_cli_refuses_a_bad_shard_before_starting(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ZIMAGE_SHARD", raising=False)
    monkeypatch.delenv("ZIMAGE_SHARD_SELECTOR", raising=False)
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--metrics-port", "0"])
    assert exc.value.code == 2
    assert complaint in capsys.readouterr().err
