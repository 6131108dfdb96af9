"""bench/soak.py's short form on the test bed: after the drain and the retentions Redis holds no job-stream
entries, the events stream is trimmed, the deleted ImageJobs left no records and the key count is back at the
idle baseline. One soak run (about 90 s: most of it the 60 s minimum job retention) serves every check."""

from __future__ import annotations

import pytest

from bench import soak
from conftest import Kube

pytestmark = pytest.mark.kube


@pytest.fixture(scope="module")
def report(crds: Kube, tmp_path_factory: pytest.TempPathFactory) -> soak.Report:
    plan = soak.Plan(
        jobs=300,
        cr_share=0.2,
        waves=3,
        warmup_share=0.0,  # baseline: the idle system, so only one retention wait
        state_dir=tmp_path_factory.mktemp("soak"),
    )
    rep = soak.run(plan, kube=crds)
    print(rep.format())
    return rep


def test_every_job_ran_and_every_imagejob_went_by_its_ttl(report: soak.Report) -> None:
    assert (report.cr_jobs, report.queue_jobs) == (60, 240)
    assert report.end is not None and report.end.jobs_done == 300
    assert report.end.imagejobs == 0
    assert report.end.dead_letter == 0


def test_job_streams_hold_nothing_once_drained(report: soak.Report) -> None:
    """Acked entries are deleted on ack: drained streams are empty after every wave, not only at the end."""
    drained = [s for s in report.samples if "drained" in s.label]
    assert len(drained) == 3
    assert [s.job_stream_entries for s in [*drained, report.end]] == [0, 0, 0, 0]


def test_events_are_trimmed_once_acked_and_past_their_retention(report: soak.Report) -> None:
    assert report.end is not None
    assert max(s.events for s in report.samples) > 0  # there were events to trim
    assert report.end.events == 0


def test_deleted_imagejobs_leave_no_job_records_after_the_retention(report: soak.Report) -> None:
    assert report.leftover_deleted_job_records == 0, report.leftover_ttl_range
    assert report.leftover_queue_job_records == 0


def test_key_count_returns_to_the_baseline(report: soak.Report) -> None:
    assert report.baseline is not None and report.end is not None
    assert report.end.job_records == 0
    assert report.end.dbsize <= report.baseline.dbsize + 2, (report.baseline.dbsize, report.end.dbsize)
