"""Supervised loops, the worker's watchdog, and the operator's bounded in-memory books (no I/O)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from zimage_operator.housekeeping import Deadlines, next_deadline
from zimage_operator.resync import next_resync, settling_event
from zimage_queue import JobEvent, ResultImage
from zimage_queue.queue import Final
from zimage_queue.supervise import Health, backoff_seconds, run_async
from zimage_worker.watchdog import Watchdog, call_budget

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("failures", "jitter", "expected"),
    [(1, 0.0, 0.25), (1, 1.0, 0.5), (2, 1.0, 1.0), (4, 0.5, 3.0), (10, 1.0, 30.0), (50, 0.0, 15.0)],
)
def test_backoff_is_exponential_capped_and_jittered(failures: int, jitter: float, expected: float) -> None:
    assert backoff_seconds(failures, base=0.5, cap=30.0, jitter=jitter) == pytest.approx(expected)


def test_health_turns_red_on_repeated_failures_and_on_a_stuck_loop() -> None:
    h = Health(max_failures=3)
    h.register("events", now=0.0, stall_seconds=100)
    h.register("pools", now=0.0, stall_seconds=100)
    assert h.problems(1.0) == []
    for t in (1.0, 2.0):
        h.failed("events", t, "ConnectionError: down")
    assert h.problems(3.0) == []  # two in a row: still backing off, still live
    h.failed("events", 3.0, "ConnectionError: down")
    [problem] = h.problems(4.0)
    assert problem.startswith("events: 3 passes failed in a row") and "down" in problem
    h.ok("events", 5.0)  # one good pass clears it
    h.ok("pools", 5.0)
    assert h.problems(6.0) == []
    assert [p.split(":")[0] for p in h.problems(106.0)] == ["events", "pools"]  # no pass for 101 s


def test_a_failing_pass_is_retried_and_the_loop_recovers() -> None:
    h = Health(max_failures=5)
    calls: list[str] = []
    recovered = asyncio.Event()

    async def one_pass() -> None:
        calls.append("x")
        if len(calls) <= 2:
            raise RuntimeError("boom")
        recovered.set()

    async def scenario() -> None:
        task = asyncio.create_task(run_async(h, "loop", one_pass, lambda: 0.0, backoff_base=0.01))
        await asyncio.wait_for(recovered.wait(), 5)
        await asyncio.sleep(0)  # let the loop book the good pass
        task.cancel()

    asyncio.run(scenario())
    assert len(calls) >= 3 and h.loops["loop"].failures == 0 and h.loops["loop"].passes >= 1


def test_watchdog_budget_grows_with_steps_and_fails_a_stuck_call() -> None:
    assert call_budget(8, base_seconds=60, step_seconds=5) == 100
    assert call_budget(0, base_seconds=60, step_seconds=5) == 65
    t = [0.0]
    wd = Watchdog(Health(), base_seconds=60, step_seconds=5, clock=lambda: t[0])
    assert wd.live()
    wd.call_started(total_steps=8)
    t[0] = 99.0
    assert wd.live()
    t[0] = 101.0
    assert not wd.live() and "past its budget of 100s" in wd.problems()[0]
    wd.call_ended()
    assert wd.live()


def _job(uid: str, **status: object) -> dict[str, object]:
    return {
        "metadata": {"uid": uid, "namespace": "ns", "name": uid, "creationTimestamp": "2026-12-01T11:00:00Z"},
        "spec": {"timeoutSeconds": 7200},
        "status": status,
    }


def test_finished_jobs_get_the_default_ttl_unless_they_set_their_own() -> None:
    done = _job("a", phase="Succeeded", finishedAt="2026-12-01T11:30:00Z")
    assert next_deadline(done, default_ttl=None) is None
    assert next_deadline(done, default_ttl=3600) == (NOW - timedelta(minutes=30) + timedelta(hours=1), "expire")
    own = {**done, "spec": {"ttlSecondsAfterFinished": 0}}
    assert next_deadline(own, default_ttl=3600) == (NOW - timedelta(minutes=30), "expire")


def test_the_deadline_heap_stays_bounded_on_a_replica_that_never_pops() -> None:
    book = Deadlines()
    for i in range(2000):  # each job's deadline moves twice (timeout, then none once finished), never popped
        book.observe(_job(f"u{i}"))
        book.observe(_job(f"u{i}", phase="Running"))
        book.observe(_job(f"u{i}", phase="Succeeded", finishedAt="2026-12-01T11:30:00Z"))
    assert len(book) == 0 and book.heap_size <= 64
    book.observe(_job("live"))
    assert [d.uid for d in book.due(NOW + timedelta(hours=2))] == ["live"]


def test_resync_runs_soon_after_becoming_leader_and_then_periodically() -> None:
    never = float("inf")
    assert next_resync(10.0, never, leader=True, was_leader=False, first_delay=3.0) == 13.0
    assert next_resync(11.0, 13.0, leader=True, was_leader=True, first_delay=3.0) == 13.0
    assert next_resync(11.0, never, leader=False, was_leader=False, first_delay=3.0) == never
    assert next_resync(50.0, 80.0, leader=True, was_leader=False, first_delay=3.0) == 53.0  # took over


def test_a_settling_event_carries_the_results_kept_beside_it() -> None:
    img = ResultImage(uri="file:///x.png", width=64, height=64, seed=1, sha256="0" * 64, bytes=10)
    ev = JobEvent(type="succeeded", uid="u", namespace="ns", name="a")
    assert settling_event(Final(ev, [img])).results == [img]
    failed = JobEvent(type="failed", uid="u", namespace="ns", name="a", reason="Timeout")
    assert settling_event(Final(failed, None)) == failed


def test_the_worker_health_endpoint_reports_a_stuck_call() -> None:
    import urllib.error
    import urllib.request

    from zimage_worker.health import serve

    t = [0.0]
    wd = Watchdog(Health(), base_seconds=10, step_seconds=1, clock=lambda: t[0])
    server = serve(0, live=wd.live, ready=lambda: True)
    url = f"http://127.0.0.1:{server.server_address[1]}/healthz"
    try:
        wd.call_started(total_steps=4)
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200
        t[0] = 15.0
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=5)
        assert err.value.code == 503
    finally:
        server.shutdown()
