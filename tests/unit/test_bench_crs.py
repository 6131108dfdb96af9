"""bench/crs.py's pure figures: percentiles, the API server's request counters and what is left per job."""

from __future__ import annotations

import pytest

from bench.crs import RequestTotals, Window, parse_request_totals, percentile, request_rows


def _sample(code: int, resource: str, sub: str, verb: str, value: float, system: str = "") -> str:
    labels = (
        f'code="{code}",component="apiserver",dry_run="",group="",resource="{resource}",scope="resource",'
        f'subresource="{sub}",system_client="{system}",verb="{verb}",version="v1"'
    )
    return f"apiserver_request_total{{{labels}}} {value}"


METRICS = "\n".join(
    [
        "# HELP apiserver_request_total [STABLE] Counter of apiserver requests",
        "# TYPE apiserver_request_total counter",
        _sample(201, "imagejobs", "", "POST", 300),
        _sample(409, "imagejobs", "", "POST", 2),
        _sample(200, "imagejobs", "status", "PATCH", 600),
        _sample(201, "events", "", "POST", 7, system="kube-controller-manager"),
        _sample(200, "", "/readyz", "GET", 1),
        'apiserver_request_duration_seconds_bucket{verb="POST",le="0.1"} 5',
        'apiserver_request_total_other{verb="POST"} 9',
    ]
)


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 50, None),
        ([3.0], 99, 3.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
        ([float(i) for i in range(1, 101)], 99, 99.0),
        ([float(i) for i in range(1, 101)], 100, 100.0),
        ([5.0, 1.0, 3.0], 0, 1.0),
    ],
)
def test_percentile_is_nearest_rank(values: list[float], q: float, expected: float | None) -> None:
    assert percentile(values, q) == expected


def test_request_totals_split_the_control_plane_and_count_errors() -> None:
    t = parse_request_totals(METRICS)
    assert t.clients == {
        ("POST", "imagejobs", ""): 302.0,
        ("PATCH", "imagejobs", "status"): 600.0,
        ("GET", "", "/readyz"): 1.0,
    }
    assert t.errors == {("POST", "imagejobs", ""): 2.0}
    assert t.system == {("POST", "events", ""): 7.0}


def _window(at: float, clients: dict[tuple[str, str, str], float], own: dict[tuple[str, str, str], float]) -> Window:
    return Window(at, RequestTotals(clients, {}, {}), own)


def test_what_is_left_per_job_is_neither_the_benchs_nor_the_idle_rate() -> None:
    create, patch, get = ("POST", "imagejobs", ""), ("PATCH", "imagejobs", "status"), ("GET", "deployments", "")
    start = _window(100.0, {create: 10, patch: 5, get: 40}, {create: 10})
    end = _window(110.0, {create: 110, patch: 205, get: 58}, {create: 110})
    rows, seconds = request_rows(start, end, {get: 2.0}, jobs=100)
    assert seconds == 10.0
    by = {(r.verb, r.resource, r.subresource): r for r in rows}
    assert (by[create].total, by[create].bench, by[create].per_job) == (100, 100, 0.0)
    assert by[patch].per_job == 2.0
    # 18 reads in the window against 20 expected at the idle rate: nothing is the jobs' (never negative).
    assert (by[get].total, by[get].background, by[get].per_job) == (18, 20.0, 0.0)
