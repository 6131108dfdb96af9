"""The quick fault table in CI: zero lost and zero duplicated in every row (e2e/faults.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Kube
from e2e.faults import SCENARIOS
from e2e.report import QUICK

pytestmark = [pytest.mark.kube, pytest.mark.timeout(400)]


@pytest.mark.parametrize("scenario", list(QUICK))
def test_fault(crds: Kube, tmp_path: Path, scenario: str) -> None:
    row = SCENARIOS[scenario](crds, tmp_path, QUICK[scenario])
    print(row)
    assert row.lost == 0 and row.duplicated == 0, row
    assert row.succeeded + row.expected_failed == row.submitted, row
    if scenario == "poison":
        assert row.expected_failed == 1 and "dead-lettered: 1" in row.note, row
    if scenario == "oom":
        assert "worker alive: True" in row.note and f"{QUICK['oom'] // 2} retried" in row.note, row
