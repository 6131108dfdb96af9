"""bench/worker.py stays runnable (its figures are not checked: benchmarks are not timed tests)."""

from __future__ import annotations

import pytest

from bench import worker as bench

pytest.importorskip("diffusers")


def test_worker_benchmark_runs_both_sides(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--requests", "4", "--batch-sizes", "1,2", "--steps", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| naive") or "worker b=" in line]
    assert [r.split("|")[1].strip() for r in rows] == ["naive", "worker b=1", "worker b=2"]
