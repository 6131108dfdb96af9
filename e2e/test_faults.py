"""The quick fault table in CI: zero lost, zero duplicated and zero stuck in every row (e2e/faults.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Kube
from e2e.faults import OLD_RELEASE, SCENARIOS
from e2e.report import QUICK

pytestmark = [pytest.mark.kube, pytest.mark.timeout(400)]


@pytest.mark.parametrize("scenario", list(QUICK))
def test_fault(crds: Kube, tmp_path: Path, scenario: str) -> None:
    row = SCENARIOS[scenario](crds, tmp_path, **QUICK[scenario])
    print(row)
    assert row.lost == 0 and row.duplicated == 0 and row.stuck == 0, row
    assert row.succeeded + row.expected_failed == row.submitted, row
    if scenario == "poison":
        assert row.expected_failed == 1 and "dead-lettered: 1" in row.note, row
    if scenario == "oom":
        assert "worker alive: True" in row.note and f"{QUICK['oom']['jobs'] // 2} retried" in row.note, row
    if scenario == "redis-down":
        assert "3/3 processes alive" in row.note and "green after: True" in row.note, row
        assert "operator 0," not in row.note and "workers 0" not in row.note, row  # they backed off
    if scenario == "poison-events":
        assert "dead-lettered: 5 (3 events, 2 job)" in row.note and "its job succeeded" in row.note, row
        assert "newer-release entries dead-lettered: 0" in row.note, row
    if scenario == "rolling-upgrade":
        assert f"from the {OLD_RELEASE} tree" in row.note and "succeeded by old 0," not in row.note, row
        assert "new 0;" not in row.note and "entries left in job streams: 0" in row.note, row
    if scenario == "leader-failover":
        assert f"Completed Events: {row.submitted}/{row.submitted} jobs exactly one" in row.note, row
