"""Usage and job history over HTTP, on a real PostgreSQL and a real Redis: a key sees its own tenant's usage and
finished jobs (an admin key everyone's), jobs past their TTL are still readable with their images, a tenant's
history can be erased (its images with it, the billing sums kept), and the store being off or down answers
404/503. ``zimage usage`` and ``zimage jobs list --history`` against the same API."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from PIL import Image
from sqlalchemy import text

from conftest import BIN
from zimage_api.apikeys import entry_json, new_key
from zimage_api.local import LOCAL_NAMESPACE, local_api, serve_in_thread
from zimage_history import db
from zimage_history.rows import HistoryRow
from zimage_worker.engine import NoopEngine

pytestmark = pytest.mark.timeout(180)

NOW = time.time()
HOUR = 3600.0
ROOMY = {"ratePerSecond": 1000, "burst": 1000}
KEYS = {"a": ("team-a", {}), "b": ("team-b", {}), "admin": ("ops", {"admin": True})}


@dataclass
class HistoryApi:
    url: str
    keys: dict[str, str]
    images: Path
    engine: Any  # an Engine on the history store, for the tests' own rows (None: the API has no store)

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.keys[key]}"}, timeout=30)


def png_bytes(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def history_db(postgres_server: Any) -> str:
    """A database of the module's own, migrated (the operator migrates; here the test does)."""
    name = f"api_{os.getpid()}"
    with psycopg.connect(postgres_server.url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    url = str(postgres_server.url.rsplit("/", 1)[0] + "/" + name)
    engine = db.connect(url)
    db.migrate(engine)
    engine.dispose()
    return url


def key_dir(tmp: Path) -> dict[str, str]:
    keys = {}
    for name, (tenant, extra) in KEYS.items():
        key = new_key(name)
        keys[name] = key
        (tmp / name).write_text(entry_json(key, tenant, **ROOMY, **extra))
    return keys


@pytest.fixture(scope="module")
def hapi(history_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HistoryApi]:
    keys_dir = tmp_path_factory.mktemp("history-keys")
    keys = key_dir(keys_dir)
    images = tmp_path_factory.mktemp("history-images").resolve()
    engine = db.connect(history_db)
    with (
        local_api(engine=NoopEngine(), images_dir=images, keys_dir=str(keys_dir), history_url=history_db) as la,
        serve_in_thread(la.app) as url,
    ):
        yield HistoryApi(url, keys, images, engine)
    engine.dispose()


def result(images: Path, tenant: str, name: str, uid: str, color: tuple[int, int, int]) -> dict[str, Any]:
    """A real PNG in the API's storage where a worker would have put the job's first image."""
    path = images / "tenants" / tenant / "jobs" / LOCAL_NAMESPACE / name / uid / "0.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = png_bytes(color)
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    return {"uri": path.as_uri(), "width": 64, "height": 64, "seed": 7, "sha256": digest, "bytes": len(data)}


def row(tenant: str, name: str, outcome: str, ago_hours: float, prompt: str, **kw: Any) -> HistoryRow:
    finished = NOW - ago_hours * HOUR
    data: dict[str, Any] = {
        "uid": f"uid-{name}", "attempt": 1, "tenant": tenant, "namespace": LOCAL_NAMESPACE, "name": name,
        "model": "z-image-turbo", "deployment": "z-image-turbo", "worker": "w-0", "task": "text-to-image",
        "width": 64, "height": 64, "steps": 8, "num_images": 1, "seed": 7, "prompt": prompt,
        "queued_at": finished - 5, "started_at": finished - 3, "finished_at": finished, "queue_seconds": 2.0,
        "run_seconds": 3.0, "gpus": 1.0, "gpu_seconds": 3.0, "cost": 0.25, "currency": "USD", "outcome": outcome,
        "reason": {"succeeded": "Completed", "failed": "WorkerError", "cancelled": "Cancelled"}.get(outcome),
    }  # fmt: skip
    return HistoryRow(**{**data, **kw})


@pytest.fixture
def rows(hapi: HistoryApi) -> dict[str, HistoryRow]:
    """A fresh history: team-a's four jobs (one retried before it failed), team-b's one; two PNGs on disk."""
    with hapi.engine.begin() as conn:
        conn.execute(text("TRUNCATE job_history, usage_hourly RESTART IDENTITY"))
    made = {
        "a-old": row("team-a", "team-a-old", "succeeded", 72, "an old lighthouse"),
        "a-fox": row(
            "team-a", "team-a-fox", "succeeded", 3, "a red fox in the snow", images=1,
            results=[result(hapi.images, "team-a", "team-a-fox", "uid-team-a-fox", (200, 30, 30))],
        ),
        "a-retry": row("team-a", "team-a-whale", "retrying", 2.5, "a blue whale", gpu_seconds=1.0, cost=0.1),
        "a-whale": row("team-a", "team-a-whale", "failed", 2, "a blue whale", attempt=2),
        "a-run": row("team-a", "team-a-run", "cancelled", 1, "red fox running", run_seconds=None, gpu_seconds=0.0,
                     cost=0.0),
        "b-fox": row(
            "team-b", "team-b-fox", "succeeded", 2, "a red fox, team b's secret", images=1,
            results=[result(hapi.images, "team-b", "team-b-fox", "uid-team-b-fox", (30, 30, 200))],
        ),
    }  # fmt: skip
    with hapi.engine.begin() as conn:
        assert len(db.insert_rows(conn, list(made.values()))) == len(made)
    return made


def ids(page: dict[str, Any]) -> list[str]:
    return [j["id"] for j in page["data"]]


def error(r: httpx.Response, status: int, code: str, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return str(err["message"])


# -- usage ----------------------------------------------------------------------------------------------------
def test_a_key_sees_its_own_tenants_usage_and_an_admin_everyones(hapi: HistoryApi, rows: Any) -> None:
    a, b, admin = hapi.client("a"), hapi.client("b"), hapi.client("admin")
    report = a.get("/v1/usage").json()
    assert report["object"] == "list" and report["groupBy"] == "tenant" and report["currency"] == "USD"
    assert report["data"] == [
        {
            "key": "team-a", "attempts": 5, "jobs": 4, "succeeded": 2, "images": 1, "gpuSeconds": 10.0,
            "cost": pytest.approx(0.85),
        }
    ]  # fmt: skip
    start, end = (datetime.fromisoformat(report[k]) for k in ("from", "to"))
    assert timedelta(days=7) - timedelta(seconds=5) <= end - start <= timedelta(days=7)
    assert abs(end.timestamp() - time.time()) < 60
    assert [r["key"] for r in b.get("/v1/usage").json()["data"]] == ["team-b"]
    by_day = a.get("/v1/usage", params={"group_by": "day"}).json()["data"]
    days = {
        datetime.fromtimestamp(r.finished_at, UTC).strftime("%Y-%m-%d") for r in rows.values() if r.tenant == "team-a"
    }
    assert {d["key"] for d in by_day} == days and sum(d["jobs"] for d in by_day) == 4
    by_model = a.get("/v1/usage", params={"group_by": "model"}).json()["data"]
    assert [(m["key"], m["attempts"]) for m in by_model] == [("z-image-turbo", 5)]
    # Only since two days ago: the old job is not counted.
    recent = a.get("/v1/usage", params={"from": datetime.fromtimestamp(NOW - 48 * HOUR, UTC).isoformat()}).json()
    assert recent["data"][0]["jobs"] == 3

    assert "team-a" in error(a.get("/v1/usage", params={"tenant": "team-b"}), 403, "forbidden", "tenant")
    assert a.get("/v1/usage", params={"tenant": "team-a"}).status_code == 200  # its own: fine
    everyone = admin.get("/v1/usage").json()["data"]
    assert [(r["key"], r["jobs"]) for r in everyone] == [("team-a", 4), ("team-b", 1)]
    only_b = admin.get("/v1/usage", params={"tenant": "team-b"}).json()["data"]
    assert [(r["key"], r["images"]) for r in only_b] == [("team-b", 1)]


def test_bad_from_and_to_are_400_with_the_reason(hapi: HistoryApi) -> None:
    a = hapi.client("a")
    msg = error(a.get("/v1/usage", params={"from": "2025-02-01", "to": "2025-01-01"}), 400, "invalid_value", "from")
    assert "must be before to" in msg and "2025-02-01T00:00:00Z" in msg
    msg = error(a.get("/v1/usage", params={"from": "2023-01-01", "to": "2025-01-01"}), 400, "invalid_value", "from")
    assert "at most 400 days" in msg and "731 days" in msg
    msg = error(a.get("/v1/usage", params={"to": "yesterday"}), 400, "invalid_value", "to")
    assert "ISO 8601" in msg and "yesterday" in msg
    error(a.get("/v1/usage", params={"group_by": "week"}), 400, "invalid_value", "group_by")
    # Dates, date-times with and without an offset: all taken, as UTC.
    r = a.get("/v1/usage", params={"from": "2025-01-01T10:30:00+02:00", "to": "2025-01-02"})
    assert r.status_code == 200, r.text
    assert (r.json()["from"], r.json()["to"]) == ("2025-01-01T08:30:00Z", "2025-01-02T00:00:00Z")


# -- finished jobs -------------------------------------------------------------------------------------------
def test_history_lists_the_tenants_finished_jobs_newest_first(hapi: HistoryApi, rows: Any) -> None:
    a, b, admin = hapi.client("a"), hapi.client("b"), hapi.client("admin")
    page = a.get("/v1/jobs", params={"source": "history"}).json()
    assert ids(page) == ["team-a-run", "team-a-whale", "team-a-fox", "team-a-old"]  # no retrying attempt, no b
    assert page["nextPageToken"] is None
    by_id = {j["id"]: j for j in page["data"]}
    fox = by_id["team-a-fox"]
    assert fox["phase"] == "Succeeded" and fox["reason"] == "Completed" and fox["seed"] == 7
    assert (fox["gpuSeconds"], fox["cost"], fox["currency"]) == (3.0, 0.25, "USD")
    assert fox["runSeconds"] == 3.0 and fox["finishedAt"].endswith("Z") and fox["attempts"] == 1
    assert fox["request"]["prompt"] == "a red fox in the snow" and fox["model"] == "z-image-turbo"
    assert len(fox["images"]) == 1 and fox["images"][0]["sha256"] == rows["a-fox"].results[0]["sha256"]
    assert by_id["team-a-whale"]["phase"] == "Failed" and by_id["team-a-whale"]["attempts"] == 2
    assert by_id["team-a-whale"]["reason"] == "WorkerError"
    assert by_id["team-a-run"]["phase"] == "Cancelled" and by_id["team-a-run"]["images"] == []

    # Text search in the prompts: both of a's foxes, never b's.
    assert ids(a.get("/v1/jobs", params={"source": "history", "q": "red fox"}).json()) == ["team-a-run", "team-a-fox"]
    assert ids(a.get("/v1/jobs", params={"source": "history", "q": "secret"}).json()) == []
    assert ids(a.get("/v1/jobs", params={"source": "history", "phase": "Failed"}).json()) == ["team-a-whale"]
    since = datetime.fromtimestamp(NOW - 2.5 * HOUR, UTC).isoformat()
    until = datetime.fromtimestamp(NOW - 1.5 * HOUR, UTC).isoformat()
    assert ids(a.get("/v1/jobs", params={"source": "history", "since": since, "until": until}).json()) == [
        "team-a-whale"
    ]
    assert ids(a.get("/v1/jobs", params={"source": "history", "model": "other"}).json()) == []

    # Paging: two at a time, the last id as the token; the pages add up to the whole list.
    seen: list[str] = []
    params: dict[str, str | int] = {"source": "history", "limit": 2}
    pages = 0
    while True:
        pages += 1
        got = a.get("/v1/jobs", params=params).json()
        seen += ids(got)
        if not got["nextPageToken"]:
            break
        params["page_token"] = got["nextPageToken"]
    assert seen == ["team-a-run", "team-a-whale", "team-a-fox", "team-a-old"] and pages == 2
    error(a.get("/v1/jobs", params={"source": "history", "page_token": "bulk.1.x"}), 400, "invalid_page_token")
    error(a.get("/v1/jobs", params={"source": "history", "phase": "Running"}), 400, "invalid_value", "phase")
    error(a.get("/v1/jobs", params={"q": "fox"}), 400, "invalid_value", "q")  # live jobs: no text search

    assert ids(b.get("/v1/jobs", params={"source": "history"}).json()) == ["team-b-fox"]
    error(a.get("/v1/jobs", params={"source": "history", "tenant": "team-b"}), 403, "forbidden", "tenant")
    everyone = ids(admin.get("/v1/jobs", params={"source": "history"}).json())  # newest row first
    assert everyone == ["team-b-fox", "team-a-run", "team-a-whale", "team-a-fox", "team-a-old"]
    assert ids(admin.get("/v1/jobs", params={"source": "history", "tenant": "team-b", "q": "fox"}).json()) == [
        "team-b-fox"
    ]


def test_a_job_gone_past_its_ttl_is_read_from_the_history_with_its_images(hapi: HistoryApi, rows: Any) -> None:
    a, b = hapi.client("a"), hapi.client("b")
    r = a.get("/v1/jobs/team-a-fox")  # only in the history: the live store never had it
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["phase"] == "Succeeded" and job["links"]["self"] == "/v1/jobs/team-a-fox"
    link = job["images"][0]["url"]
    assert "signature=" in link
    image = httpx.get(link)  # no key: the signed link opens it
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == Path(rows["a-fox"].results[0]["uri"].removeprefix("file://")).read_bytes()
    assert Image.open(io.BytesIO(image.content)).getpixel((0, 0)) == (200, 30, 30)
    assert a.get("/v1/jobs/team-a-fox/images/0").content == image.content  # with the key
    error(a.get("/v1/jobs/team-a-fox/images/1"), 404, "image_not_found", "index")
    assert httpx.get(link.replace("signature=", "signature=0")).status_code == 401

    # Another tenant's finished job is as missing as one that never was.
    for path in ("/v1/jobs/team-a-fox", "/v1/jobs/team-a-fox/images/0"):
        error(b.get(path), 404, "job_not_found", "id")
    error(a.get("/v1/jobs/team-b-fox"), 404, "job_not_found", "id")
    error(a.get("/v1/jobs/never-was"), 404, "job_not_found", "id")


def test_erasing_a_tenants_history_deletes_its_rows_and_images_and_keeps_usage(hapi: HistoryApi, rows: Any) -> None:
    a, b, admin = hapi.client("a"), hapi.client("b"), hapi.client("admin")
    a_png = Path(rows["a-fox"].results[0]["uri"].removeprefix("file://"))
    b_png = Path(rows["b-fox"].results[0]["uri"].removeprefix("file://"))
    usage_before = a.get("/v1/usage").json()["data"]

    error(a.delete("/v1/history", params={"tenant": "team-b"}), 403, "forbidden", "tenant")
    assert "required" in error(admin.delete("/v1/history"), 400, "invalid_value", "tenant")
    r = a.delete("/v1/history")
    assert r.status_code == 200, r.text
    assert r.json() == {"tenant": "team-a", "deletedJobs": 5, "deletedImages": 1, "complete": True}
    assert not a_png.exists() and b_png.exists()
    assert ids(a.get("/v1/jobs", params={"source": "history"}).json()) == []
    error(a.get("/v1/jobs/team-a-fox"), 404, "job_not_found")
    assert a.get("/v1/usage").json()["data"] == usage_before  # the billing sums stay
    assert ids(b.get("/v1/jobs", params={"source": "history"}).json()) == ["team-b-fox"]
    assert a.delete("/v1/history").json()["deletedJobs"] == 0  # again: nothing left

    assert admin.delete("/v1/history", params={"tenant": "team-b"}).json()["deletedJobs"] == 1
    assert not b_png.exists()


# -- the store off, or down -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def no_history_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HistoryApi]:
    keys_dir = tmp_path_factory.mktemp("no-history-keys")
    keys = key_dir(keys_dir)
    images = tmp_path_factory.mktemp("no-history-images")
    with (
        local_api(engine=NoopEngine(), images_dir=images, keys_dir=str(keys_dir)) as la,
        serve_in_thread(la.app) as url,
    ):
        yield HistoryApi(url, keys, images, None)


def test_without_a_history_store_the_routes_say_how_to_set_one(no_history_api: HistoryApi) -> None:
    for key in ("a", "admin"):
        c = no_history_api.client(key)
        for method, path, params in (
            ("GET", "/v1/usage", {}),
            ("GET", "/v1/jobs", {"source": "history"}),
            ("DELETE", "/v1/history", {"tenant": "team-a"}),
        ):
            msg = error(c.request(method, path, params=params), 404, "history_disabled")
            assert "ZIMAGE_API_HISTORY_URL" in msg
        assert c.get("/v1/jobs").status_code == 200  # the live jobs need no history
        error(c.get("/v1/jobs/never-was"), 404, "job_not_found", "id")
    assert httpx.get(f"{no_history_api.url}/v1/usage").status_code == 401  # the key first


def test_postgres_down_is_503_and_the_live_api_goes_on(hapi: HistoryApi, rows: Any, postgres_server: Any) -> None:
    a = hapi.client("a")
    assert a.get("/v1/usage").status_code == 200  # the pool holds a connection to the server about to go
    postgres_server.stop()
    try:
        for path, params in (("/v1/usage", {}), ("/v1/jobs", {"source": "history"}), ("/v1/jobs/team-a-fox", {})):
            t0 = time.monotonic()
            msg = error(a.get(path, params=params), 503, "history_unavailable")
            assert time.monotonic() - t0 < 10, path
            assert "PostgreSQL" in msg and "retry" in msg
        r = a.get("/v1/jobs")
        assert r.status_code == 200, r.text
        assert hapi.client("a").get("/readyz").status_code == 200  # the history is not the API's readiness
    finally:
        postgres_server.start()
        postgres_server.wait_ready()
    r = a.get("/v1/usage")  # back: the pool reconnects
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["key"] == "team-a"


# -- the CLI --------------------------------------------------------------------------------------------------
def zimage(hapi: HistoryApi, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ZIMAGE_API_URL": "", "ZIMAGE_API_KEY": ""}
    return subprocess.run(
        [str(BIN / "zimage"), *args, "--api", hapi.url, "--api-key", hapi.keys[key]],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def test_zimage_usage_and_jobs_list_history(hapi: HistoryApi, rows: Any) -> None:
    out = zimage(hapi, "a", "usage")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["TENANT", "ATTEMPTS", "JOBS", "SUCCEEDED", "IMAGES", "GPU-SECONDS", "COST", "(USD)"]
    assert lines[1].split() == ["team-a", "5", "4", "2", "1", "10.0", "0.8500"]
    assert lines[-1].split() == ["TOTAL", "5", "4", "2", "1", "10.0", "0.8500"]
    assert "usage from " in out.stderr

    out = zimage(hapi, "admin", "usage", "--since", "2d", "--group-by", "tenant")
    assert out.returncode == 0, out.stderr
    table = [line.split() for line in out.stdout.splitlines()]
    assert [r[:3] for r in table[1:]] == [["team-a", "4", "3"], ["team-b", "1", "1"], ["TOTAL", "5", "4"]]

    out = zimage(hapi, "admin", "usage", "--tenant", "team-b", "--group-by", "model", "-o", "json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["groupBy"] == "model" and [r["key"] for r in report["data"]] == ["z-image-turbo"]
    assert report["data"][0]["images"] == 1

    out = zimage(hapi, "a", "usage", "--from", "2025-02-01", "--to", "2025-01-01")
    assert out.returncode == 2 and "zimage: error: --from: must be before to" in out.stderr, out.stderr
    out = zimage(hapi, "a", "usage", "--tenant", "team-b")
    assert out.returncode == 2 and "may not" in out.stderr, out.stderr
    out = zimage(hapi, "a", "usage", "--since", "a week")
    assert out.returncode == 2 and "--since: a duration" in out.stderr, out.stderr

    out = zimage(hapi, "a", "jobs", "list", "--history", "--q", "red fox", "-o", "name")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["job/team-a-run", "job/team-a-fox"]
    out = zimage(hapi, "a", "jobs", "list", "--history", "--since", "150m")
    assert out.returncode == 0, out.stderr
    assert [line.split()[0] for line in out.stdout.splitlines()[1:]] == ["team-a-run", "team-a-whale"]
    out = zimage(hapi, "a", "jobs", "list", "--q", "fox")
    assert out.returncode == 2 and "--history" in out.stderr, out.stderr


def test_keys_create_admin_makes_an_admin_key(capsys: pytest.CaptureFixture[str]) -> None:
    from zimage_api import cli
    from zimage_api.apikeys import KeyRing, parse_entry

    assert cli.main(["keys", "create", "--tenant", "ops", "--id", "ops1", "--admin"]) == 0
    out, err = capsys.readouterr()
    entry = json.loads(err[err.index("'ops1': '") + len("'ops1': '") : err.rindex("'")])
    assert entry["admin"] is True
    who = KeyRing({"ops1": parse_entry("ops1", json.dumps(entry))}).authenticate(out.strip())
    assert who is not None and who.admin and who.tenant == "ops"
    assert not parse_entry("x", json.dumps({**entry, "admin": "true"})).principal.admin  # only a JSON true
    assert not parse_entry("x", json.dumps({k: v for k, v in entry.items() if k != "admin"})).principal.admin
