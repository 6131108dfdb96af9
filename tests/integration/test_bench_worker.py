"""bench/worker.py stays runnable (its figures are not checked: benchmarks are not timed tests)."""

from __future__ import annotations

import pytest

from bench import worker as bench

pytest.importorskip("diffusers")


def test_worker_benchmark_runs_both_sides(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--requests", "4", "--batch-sizes", "1,2", "--steps", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| naive") or "worker b=" in line]
    assert [r.split("|")[1].strip() for r in rows] == ["naive", "worker b=1", "worker b=2"]


def test_stand_in_device_measures_the_workers_idle_time(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "stand-in", "--device-ms", "20", "--size", "128", "--requests", "4", "--batch-sizes", "2"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "no device (20 ms per image, slept)" in out
    rows = {r.split("|")[1].strip(): r.split("|") for r in out.splitlines() if r.startswith("| naive") or "b=2" in r}
    # 4 images at 20 ms each: the engine column is the slept time, whatever the machine
    assert [float(rows[name][5]) for name in ("naive", "worker b=2")] == [pytest.approx(0.08, abs=0.02)] * 2
