"""Bulk jobs (no ImageJob, state in Redis) through the HTTP API, with a real Redis and a real no-op worker process.

No operator and no event applier run here: a bulk job's status is read from the API's own record and the
queue's record of the job only, so these jobs finish with nothing else around.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis
import yaml

from conftest import Processes, start_worker, wait_for
from tests.api.conftest import sse_events
from zimage_api.apikeys import entry_json, new_key
from zimage_api.app import create_app
from zimage_api.local import local_model, serve_in_thread
from zimage_api.redis_store import (
    BULK_LABEL,
    QueueRecord,
    RedisJobStore,
    derive_status,
    page_token,
    parse_page_token,
    parse_record,
)
from zimage_api.settings import ApiSettings
from zimage_api.store import TENANT_LABEL, MemoryJobStore
from zimage_operator.conditions import iso
from zimage_queue import JobEvent, JobQueue, ResultImage, keys
from zimage_queue.server import RedisServer

pytestmark = pytest.mark.timeout(120)
NS = "bulk"
MODEL = "z-image-turbo"
IDLE = "idle-model"  # no worker serves it: its jobs stay queued
LIST_MAX = 4
REQUEST = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 2}
KEYS = {
    "bulk": {"tenant": "team-bulk", "bulk": True},
    "plain": {"tenant": "team-plain"},
    "other": {"tenant": "team-other", "bulk": True},
}


@dataclass
class Bulk:
    url: str
    r: redis.Redis
    keys: dict[str, str]
    store: MemoryJobStore

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.keys[key]}"}, timeout=30)


@pytest.fixture(scope="module")
def bulk(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bulk]:
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    tmp = tmp_path_factory.mktemp("bulk")
    (keys_dir := tmp / "keys").mkdir()
    api_keys = {}
    for name, spec in KEYS.items():
        api_keys[name] = new_key(name)
        (keys_dir / name).write_text(entry_json(api_keys[name], **spec))  # type: ignore[arg-type]
    images = tmp / "images"
    images.mkdir()
    store = MemoryJobStore(NS, [local_model(MODEL, "turbo"), local_model(IDLE, "turbo")])
    settings = ApiSettings(
        redis_url=redis_server.url,
        namespace=NS,
        keys_dir=str(keys_dir),
        storage_url=images.as_uri(),
        default_model=MODEL,
        rate_per_second=1000,
        rate_burst=1000,
        bulk_list_max=LIST_MAX,
    )
    ps = Processes(tmp)
    start_worker(ps, redis_server.url, keys.queue_name(NS, MODEL), images, ZIMAGE_MODEL_SOURCE="noop")
    try:
        with serve_in_thread(create_app(settings, store)) as url:
            yield Bulk(url, r, api_keys, store)
    except BaseException:
        print(ps.logs())
        raise
    finally:
        ps.stop_all()


def finished(client: httpx.Client, jid: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/v1/jobs/{jid}").raise_for_status().json()
        return job if job["phase"] in ("Succeeded", "Failed", "Cancelled") else None

    out: dict[str, Any] = wait_for(done, timeout=30, what=f"job {jid} to finish")
    return out


def events_of(r: redis.Redis, uid: str) -> list[JobEvent]:
    out = []
    for _id, fields in r.xrange(keys.EVENTS_STREAM):
        ev = JobEvent.model_validate_json(fields[keys.EVENT_FIELD.encode()])
        if ev.uid == uid:
            out.append(ev)
    return out


def uid_of(r: redis.Redis, name: str) -> str:
    raw = r.hget(keys.bulk_job(NS, name), "object")
    assert raw is not None, f"{name} is not a bulk job"
    return str(json.loads(raw)["metadata"]["uid"])


# -- through the HTTP API --------------------------------------------------------------------------------------
def test_a_bulk_key_submits_bulk_jobs_that_run_to_their_results(bulk: Bulk) -> None:
    with bulk.client("bulk") as client:
        resp = client.post("/v1/jobs", json={**REQUEST, "numImages": 2})
        assert resp.status_code == 202, resp.text
        job = resp.json()
        assert (job["mode"], job["phase"], job["model"]) == ("bulk", "Queued", MODEL)
        assert job["seed"] is not None  # admitted by the operator's admission: seed and steps resolved
        jid = job["id"]
        assert bulk.store.get_job(jid) is None  # no ImageJob (here: no job in the cluster's store)
        done = finished(client, jid)
        assert (done["phase"], done["reason"], done["mode"]) == ("Succeeded", "Completed", "bulk")
        assert done["attempts"] == 1 and len(done["images"]) == 2 and done["finishedAt"] and done["startedAt"]
        assert done["seed"] == job["seed"] and done["request"]["steps"] == 2
        for i, image in enumerate(done["images"]):
            signed = httpx.get(image["url"])  # the signed link, no key
            assert signed.status_code == 200 and signed.content.startswith(b"\x89PNG")
            assert client.get(f"/v1/jobs/{jid}/images/{i}").content == signed.content  # with the key
        assert client.get(f"/v1/jobs/{jid}/images/2").status_code == 404
        # The worker copied the message's marker into every event: the operator can skip them unread.
        events = events_of(bulk.r, uid_of(bulk.r, jid))
        assert {e.type for e in events} >= {"started", "succeeded"} and all(e.bulk for e in events)


def test_mode_per_request_either_way(bulk: Bulk) -> None:
    with bulk.client("plain") as plain, bulk.client("bulk") as bulky:
        as_bulk = plain.post("/v1/jobs", json={**REQUEST, "mode": "bulk"}).raise_for_status().json()
        as_cr = bulky.post("/v1/jobs", json={**REQUEST, "mode": "imagejob"}).raise_for_status().json()
        default = plain.post("/v1/jobs", json=REQUEST).raise_for_status().json()
        assert (as_bulk["mode"], as_cr["mode"], default["mode"]) == ("bulk", "imagejob", "imagejob")
        assert bulk.store.get_job(as_cr["id"]) is not None and bulk.store.get_job(default["id"]) is not None
        assert bulk.store.get_job(as_bulk["id"]) is None
        assert bulk.r.exists(keys.bulk_job(NS, as_bulk["id"])) and not bulk.r.exists(keys.bulk_job(NS, as_cr["id"]))
        assert finished(plain, as_bulk["id"])["phase"] == "Succeeded"
        # The ImageJob's events carry no marker: those are the operator's to apply.
        cr_uid = bulk.store.get_job(as_cr["id"])["metadata"]["uid"]  # type: ignore[index]
        wait_for(lambda: any(e.type == "succeeded" for e in events_of(bulk.r, cr_uid)), what="the CR job's run")
        assert not any(e.bulk for e in events_of(bulk.r, cr_uid))
        bad = plain.post("/v1/jobs", json={**REQUEST, "mode": "fast"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "mode"


def test_openai_route_follows_the_keys_mode(bulk: Bulk) -> None:
    with bulk.client("bulk") as client:
        resp = client.post("/v1/images/generations", json={"prompt": "a fox", "size": "64x64", "mode": "imagejob"})
        assert resp.status_code == 200, resp.text
        url = resp.json()["data"][0]["url"]
        assert httpx.get(url).status_code == 200
        name = url.split("/v1/jobs/", 1)[1].split("/")[0]
        assert bulk.r.exists(keys.bulk_job(NS, name))  # the body's `mode` is ignored there: the key's holds
        assert bulk.store.get_job(name) is None


def test_events_stream_of_a_bulk_job(bulk: Bulk) -> None:
    with bulk.client("bulk") as client:
        job = client.post("/v1/jobs", json=REQUEST).raise_for_status().json()
        events = sse_events(client, f"/v1/jobs/{job['id']}/events")
        kinds = [k for k, _ in events]
        # The first event is named by the job's phase when the stream opened (it may have started, or ended).
        assert kinds[0] in ("queued", "started", "succeeded") and kinds[-1] == "succeeded", kinds
        final = events[-1][1]
        assert final["phase"] == "Succeeded" and final["mode"] == "bulk" and len(final["images"]) == 1
        # A finished job's stream: one event, how it ended.
        assert [k for k, _ in sse_events(client, f"/v1/jobs/{job['id']}/events")] == ["succeeded"]


def test_cancel_a_queued_bulk_job(bulk: Bulk) -> None:
    with bulk.client("bulk") as client:
        job = client.post("/v1/jobs", json={**REQUEST, "model": IDLE}).raise_for_status().json()
        jid = job["id"]
        assert client.get(f"/v1/jobs/{jid}").json()["phase"] == "Queued"
        resp = client.delete(f"/v1/jobs/{jid}")
        assert resp.status_code == 200 and (resp.json()["phase"], resp.json()["reason"]) == ("Cancelled", "Cancelled")
        again = client.get(f"/v1/jobs/{jid}").json()
        assert (again["phase"], again["images"], again["mode"]) == ("Cancelled", [], "bulk")
        assert JobQueue(bulk.r).is_cancelled(uid_of(bulk.r, jid))  # a worker that takes it will not run it
        assert client.delete(f"/v1/jobs/{jid}").json()["phase"] == "Cancelled"  # idempotent
        # The quota counts it no more: the slot is free again.
        assert client.post("/v1/jobs", json=REQUEST).status_code == 202


def test_idempotency_key_finds_the_bulk_job(bulk: Bulk) -> None:
    with bulk.client("bulk") as client:
        first = client.post("/v1/jobs", json=REQUEST, headers={"Idempotency-Key": "k-1"})
        again = client.post("/v1/jobs", json=REQUEST, headers={"Idempotency-Key": "k-1"})
        assert (first.status_code, again.status_code) == (202, 200)
        assert first.json()["id"] == again.json()["id"] and again.json()["mode"] == "bulk"
        other = client.post("/v1/jobs", json={**REQUEST, "prompt": "x"}, headers={"Idempotency-Key": "k-1"})
        assert other.status_code == 422


def test_listing_is_per_tenant_newest_first_bounded_and_pages(bulk: Bulk) -> None:
    with bulk.client("other") as other, bulk.client("plain") as plain:
        submitted = [
            other.post("/v1/jobs", json={**REQUEST, "model": IDLE}).raise_for_status().json()["id"] for _ in range(6)
        ]
        cr = other.post("/v1/jobs", json={**REQUEST, "mode": "imagejob", "model": IDLE}).raise_for_status().json()
        listed = other.get("/v1/jobs", params={"limit": 100}).json()
        ids = [j["id"] for j in listed["data"]]
        # The index keeps the newest LIST_MAX bulk jobs, newest first; then the tenant's ImageJobs.
        assert ids == [*reversed(submitted[-LIST_MAX:]), cr["id"]], ids
        assert "nextPageToken" not in listed or listed["nextPageToken"] is None
        assert bulk.r.zcard(keys.bulk_index(NS, "team-other")) == LIST_MAX
        # An older one is no longer listed, but still there by its id.
        assert other.get(f"/v1/jobs/{submitted[0]}").json()["mode"] == "bulk"

        paged, token = [], None
        while True:
            page = other.get("/v1/jobs", params={"limit": 3, **({"page_token": token} if token else {})}).json()
            assert len(page["data"]) <= 3
            paged += [j["id"] for j in page["data"]]
            token = page.get("nextPageToken")
            if not token:
                break
        assert paged == ids  # every job once, in the same order
        assert [j["id"] for j in other.get("/v1/jobs", params={"phase": "Queued", "limit": 2}).json()["data"]] == ids[
            :2
        ]

        # Another tenant sees none of it, and cannot read or cancel it.
        assert not {j["id"] for j in plain.get("/v1/jobs", params={"limit": 100}).json()["data"]} & set(ids)
        assert plain.get(f"/v1/jobs/{ids[0]}").status_code == 404
        assert plain.delete(f"/v1/jobs/{ids[0]}").status_code == 404
        assert plain.get(f"/v1/jobs/{ids[0]}/events").status_code == 404
        assert plain.get("/v1/jobs", params={"page_token": "bulk.x"}).status_code == 400
        for jid in ids:  # free team-other's quota
            other.delete(f"/v1/jobs/{jid}")


# -- the store -----------------------------------------------------------------------------------------------
def test_retention_bounds_the_records_and_the_index(redis_server: RedisServer, bulk: Bulk) -> None:
    r = redis.Redis.from_url(redis_server.url)
    store = RedisJobStore(r, JobQueue(r), "ret", bulk.store, retention_seconds=1, max_listed=3)
    labels = {TENANT_LABEL: "team-r"}
    for i in range(5):
        store.create_job(f"job-{i}", {"model": MODEL, "prompt": "x"}, labels, {})
    assert store.listed("team-r") == 3
    assert [j["metadata"]["name"] for j in store.list_jobs(labels, 10, None)[0]] == ["job-4", "job-3", "job-2"]
    assert 0 < r.pttl(keys.bulk_job("ret", "job-0")) <= 1000 and 0 < r.pttl(keys.bulk_index("ret", "team-r")) <= 1000
    wait_for(lambda: not r.exists(keys.bulk_job("ret", "job-4")), timeout=5, what="the retention to pass")
    assert store.get_job("job-4") is None and store.list_jobs(labels, 10, None) == ([], None)
    store.create_job("job-5", {"model": MODEL, "prompt": "x"}, labels, {})
    assert r.zrange(keys.bulk_index("ret", "team-r"), 0, -1) == [b"job-5"]  # the expired ones trimmed


def test_page_tokens_round_trip_and_refuse_strangers() -> None:
    assert parse_page_token(page_token(1722000000123.0, "team-a-0123")) == (1722000000123, "team-a-0123")
    for bad in ("bulk.", "bulk.12", "bulk.x.name", "imagejobs.", "12.name"):
        with pytest.raises(ValueError):
            parse_page_token(bad)


# -- derive_status (pure) --------------------------------------------------------------------------------------
T0 = datetime(2025, 1, 1, tzinfo=UTC)
META = {"name": "j", "namespace": NS, "uid": "u1", "creationTimestamp": iso(T0), "labels": {BULK_LABEL: "true"}}
QUEUED = {"phase": "Queued", "queuedAt": iso(T0), "seed": 1, "steps": 2, "progress": {"step": 0, "totalSteps": 2}}
CANCELLED = {**QUEUED, "phase": "Cancelled", "finishedAt": iso(T0 + timedelta(seconds=1)), "message": "by API"}
IMAGE = ResultImage(uri="file:///x/0.png", width=64, height=64, seed=1, sha256="0" * 64, bytes=10)


def final(type_: str, **kw: Any) -> JobEvent:
    return JobEvent(type=type_, uid="u1", namespace=NS, name="j", worker="w1", attempt=1, ts=T0.timestamp() + 5, **kw)


@pytest.mark.parametrize(
    ("stored", "record", "spec", "want"),
    [
        (QUEUED, QueueRecord(), {}, {"phase": "Queued"}),
        (QUEUED, QueueRecord(state="queued"), {}, {"phase": "Queued", "attempts": None}),
        (
            QUEUED,
            QueueRecord(state="running", attempts=1, worker="w1"),
            {},
            {"phase": "Running", "worker": "w1", "attempts": 1},
        ),
        (QUEUED, QueueRecord(state="queued", attempts=2), {}, {"phase": "Queued", "attempts": 2}),
        (
            QUEUED,
            QueueRecord(
                state="succeeded",
                attempts=1,
                final=final("succeeded", results=[IMAGE], run_seconds=2.0),
                results=[IMAGE],
            ),
            {},
            {
                "phase": "Succeeded",
                "finishedAt": iso(T0 + timedelta(seconds=5)),
                "startedAt": iso(T0 + timedelta(seconds=3)),
                "runSeconds": 2.0,
                "results": [IMAGE.wire()],
                "progress": {"step": 2, "totalSteps": 2, "summary": "2/2"},
            },
        ),
        # A final event without its results (an older worker): the record's results.
        (
            QUEUED,
            QueueRecord(state="succeeded", final=final("succeeded"), results=[IMAGE]),
            {},
            {"phase": "Succeeded", "results": [IMAGE.wire()]},
        ),
        (
            QUEUED,
            QueueRecord(state="failed", attempts=4, final=final("failed", reason="WorkerError", message="boom")),
            {},
            {"phase": "Failed", "message": "boom"},
        ),
        (QUEUED, QueueRecord(state="cancelled", final=final("cancelled")), {}, {"phase": "Cancelled"}),
        # The API's cancel stands, whatever the worker reports after it.
        (CANCELLED, QueueRecord(state="succeeded", final=final("succeeded", results=[IMAGE])), {}, CANCELLED),
        # Past timeoutSeconds: Failed/Timeout from the deadline on (the same answer on every read).
        (
            QUEUED,
            QueueRecord(state="running", attempts=1, worker="w1"),
            {"timeoutSeconds": 10},
            {"phase": "Failed", "finishedAt": iso(T0 + timedelta(seconds=10))},
        ),
        (QUEUED, QueueRecord(), {"timeoutSeconds": 3600}, {"phase": "Queued"}),
    ],
)
def test_derive_status(stored: dict[str, Any], record: QueueRecord, spec: dict[str, Any], want: dict[str, Any]) -> None:
    now = T0 + timedelta(seconds=60)
    status = derive_status(stored, record, spec, META, now)
    assert {k: status.get(k) for k in want} == want
    assert stored is not status and stored == (CANCELLED if stored is CANCELLED else QUEUED)  # not mutated
    phase = status["phase"]
    if phase in ("Succeeded", "Failed", "Cancelled") and stored is QUEUED:
        [cond] = [c for c in status["conditions"] if c["type"] == phase]
        assert cond["status"] == "True"
        if spec.get("timeoutSeconds"):
            assert cond["reason"] == "Timeout"


def test_unreadable_queue_record_reads_as_unfinished() -> None:
    rec = parse_record([b"succeeded", b"1", b"w1", b"{not json", b"[]", None])
    assert rec == QueueRecord(state="succeeded", attempts=1, worker="w1")


# -- the CLI ---------------------------------------------------------------------------------------------------
def test_cli_lists_gets_and_cancels_bulk_jobs(bulk: Bulk) -> None:
    from tests.api.test_cli import zimage

    env = {"ZIMAGE_API_KEY": bulk.keys["bulk"], "ZIMAGE_API_URL": bulk.url}
    with bulk.client("bulk") as client:
        queued = client.post("/v1/jobs", json={**REQUEST, "model": IDLE}).raise_for_status().json()["id"]
    out = zimage("jobs", "list", "--limit", "2", "--all", env=env)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    assert rows[0][:3] == [queued, "bulk", "Queued"]  # newest first
    modes = [r[1] for r in rows]
    assert len(rows) > 2 and modes == sorted(modes), modes  # followed the pages: bulk jobs, then the ImageJobs
    got = zimage("jobs", "get", queued, "-o", "json", env=env)
    assert got.returncode == 0 and json.loads(got.stdout)["mode"] == "bulk"
    cancelled = zimage("jobs", "cancel", queued, "-o", "json", env=env)
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["phase"] == "Cancelled"
    other = zimage("jobs", "get", queued, env={**env, "ZIMAGE_API_KEY": bulk.keys["plain"]})
    assert other.returncode == 2 and other.stderr == f"zimage: error: no job {queued!r}\n"  # another tenant's
    key = zimage("keys", "create", "--tenant", "team-x", "--id", "kb", "--bulk")
    manifest = yaml.safe_load((key.stdout + key.stderr).split("<<'EOF'\n", 1)[1].split("\nEOF", 1)[0])
    entry = json.loads(manifest["stringData"]["kb"])
    assert entry["bulk"] is True
