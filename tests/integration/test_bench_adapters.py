"""bench/adapters.py stays runnable (its figures are not checked: benchmarks are not timed tests)."""

from __future__ import annotations

import pytest

pytest.importorskip("peft")

from bench import adapters as bench


def test_adapter_benchmark_runs_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--jobs", "8", "--steps", "2", "--batch", "2"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "x |" in line]
    assert [r[1].strip() for r in rows] == ["naive", "resident", "worker b=2", "worker b=2, affinity"]
    loads = [int(r[5]) for r in rows]
    assert loads == [8, 4, 4, 4]  # a load per job, else each of the four adapters once
