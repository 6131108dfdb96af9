"""bench/crs.py's short form on the test bed: 100 ImageJobs through the CR path and 100 jobs on the queue path
with one no-op worker. Every job succeeds, the figures are there and consistent with each other (the API
server's counters agree with what the bench itself sent), the deletes by label leave no ImageJob, and once the
retention has elapsed Redis holds no record, no stream entry and no more keys than when idle. One run serves
every check. The retention part (the 60 s minimum job retention, waited out once) runs with ZIMAGE_LONG_TESTS=1;
by default the run does not wait for it (tests/integration/test_bench_soak.py checks Redis after the retention)."""

from __future__ import annotations

import os

import pytest

from bench import crs
from conftest import Kube

pytestmark = pytest.mark.kube

JOBS = 100
LONG = os.environ.get("ZIMAGE_LONG_TESTS") == "1"
needs_retention = pytest.mark.skipif(not LONG, reason="waits out the retention: ZIMAGE_LONG_TESTS=1")


@pytest.fixture(scope="module")
def report(crds: Kube, tmp_path_factory: pytest.TempPathFactory) -> crs.Report:
    plan = crs.Plan(
        jobs=JOBS,
        workers=1,
        bulk=("queue",),
        settle="end" if LONG else "none",  # one retention wait for both paths, or none
        idle_window_seconds=2.0,
        stall_seconds=60.0,
        state_dir=tmp_path_factory.mktemp("crs"),
    )
    rep = crs.run(plan, kube=crds)
    print(rep.format())
    return rep


def _row(rows: list[crs.RequestRow], verb: str, resource: str, sub: str = "") -> crs.RequestRow:
    found = [r for r in rows if (r.verb, r.resource, r.subresource) == (verb, resource, sub)]
    assert found, f"no {verb} {resource}/{sub} in {[r.label for r in rows]}"
    return found[0]


def test_every_job_succeeded_on_both_paths(report: crs.Report) -> None:
    (cr,) = report.cr
    assert len(report.bulk) == 1
    queue = report.bulk[0]
    assert (cr.path, queue.path) == ("CR path", "queue path")
    assert (cr.succeeded, cr.failed) == (JOBS, 0)
    assert (queue.succeeded, queue.failed) == (JOBS, 0)


@pytest.mark.parametrize("path", [0, 1], ids=["cr", "queue"])
def test_rates_latencies_and_lags_are_consistent(report: crs.Report, path: int) -> None:
    res = [*report.cr, *report.bulk][path]
    assert res.creation_per_s > 0 and res.jobs_per_s > 0
    # The end-to-end window contains the submit window, so it can never be the faster one.
    assert res.e2e_seconds >= res.create_seconds > 0
    assert res.jobs_per_s <= res.creation_per_s
    assert res.lag_p50 is not None and res.lag_p99 is not None and res.lag_max is not None
    assert 0 <= res.lag_p50 <= res.lag_p99 <= res.lag_max < 60
    assert res.latency_p50 is not None and res.latency_p99 is not None
    assert 0 < res.latency_p50 <= res.latency_p99 < 120
    assert res.lag_fallbacks == 0  # every finish time came from the job's Redis record
    assert 0 < res.rss_start_kb <= res.rss_peak_kb


def test_the_api_servers_counters_agree_with_the_bench(report: crs.Report) -> None:
    (cr,) = report.cr
    creates = _row(cr.requests, "POST", "imagejobs")
    assert creates.bench == JOBS + cr.create_retries
    assert creates.total - creates.errors == JOBS  # the API server counted exactly the creates that went in
    assert creates.per_job == 0  # and none of them is the operator's
    # The operator writes each job's status at least once (Succeeded), and not an unbounded number of times.
    status = _row(cr.requests, "PATCH", "imagejobs", "status")
    assert status.bench == 0
    assert 1 <= status.per_job <= 10, status
    assert cr.operator_per_job() >= status.per_job
    assert cr.api_total_per_job() >= 1 + cr.operator_per_job() - 0.01  # every job's create is in the total
    # The delete by label is one request; the queue path creates no ImageJob.
    assert _row(cr.delete_requests, "DELETE", "imagejobs").bench >= 1
    assert all(r.total == 0 for r in report.bulk[0].requests if (r.verb, r.resource) == ("POST", "imagejobs"))


def test_deleting_by_label_removed_every_imagejob(report: crs.Report) -> None:
    (cr,) = report.cr
    assert cr.delete_seconds is not None and cr.delete_seconds > 0
    assert cr.delete_method == "deletecollection"


@needs_retention
def test_redis_holds_nothing_of_the_jobs_after_the_retention(report: crs.Report) -> None:
    idle = report.redis_idle
    assert idle is not None
    for res in [*report.cr, *report.bulk]:
        after = res.redis_after
        assert after is not None, res.path
        assert after.records_left == 0, res.path
        assert after.job_records == 0, res.path
        assert sum(after.streams.values()) == 0, (res.path, after.streams)
        assert after.dbsize <= idle.dbsize + 2, (res.path, idle.dbsize, after.dbsize)


def test_the_table_and_the_json_carry_the_figures(report: crs.Report) -> None:
    text = report.format()
    for needle in ("end-to-end jobs/s", "status lag p99", "API requests per job, operator's", "Event POSTs"):
        assert needle in text
    data = report.to_json()
    assert data["cr"][0]["jobs_per_s"] == pytest.approx(report.cr[0].jobs_per_s)
    assert data["cr"][0]["operator_requests_per_job"] == pytest.approx(report.cr[0].operator_per_job())
    if LONG:
        assert data["bulk"][0]["redis_after"]["records_left"] == 0


def test_the_ceiling_phase_created_every_job_with_no_operator_watching(report: crs.Report) -> None:
    ceiling = report.ceiling
    assert ceiling is not None and ceiling.jobs == JOBS and ceiling.seconds > 0
    assert ceiling.creates_per_s > 0 and "API server alone" in report.format()
    if "kube-apiserver" in ceiling.cpu_ms_per_create:  # a local test bed: its CPU is measured
        assert ceiling.cpu_ms_per_create["kube-apiserver"] > 0
