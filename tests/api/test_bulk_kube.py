"""Bulk jobs in cluster mode: the API on the real test-bed API server, the real operator and a no-op worker.

Bulk jobs complete through the API with the operator running beside them, and no ImageJob stands behind them
(``kubectl get ij`` lists only the ImageJobs submitted next to them). The test also times both paths, the
same jobs submitted one after another through the same API; ``-s`` prints the figures.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from kubernetes import config as kube_config

from conftest import REPO, Kube, operator_stack, start_worker, wait_for
from zimage_api.app import create_app
from zimage_api.kube_store import KubeJobStore
from zimage_api.settings import ApiSettings
from zimage_queue import JobEvent, keys

pytestmark = [pytest.mark.kube, pytest.mark.timeout(120)]
NS = f"zimage-bulk-{os.getpid()}"
MODEL = "z-image-turbo"
TENANT = "team-bulk"
JOBS = 20
REQUEST = {"model": MODEL, "prompt": "a red fox", "width": 64, "height": 64, "steps": 2}


def apiserver_requests(kube: Kube) -> dict[str, int]:
    """What the API server has served so far: writes of ImageJobs and of Events (of any object: the operator's
    scaling Events of the ModelDeployment too), and ImageJob GETs it answered with 404 (the operator looking up
    a job that has no ImageJob)."""
    out = {"imagejob_writes": 0, "event_writes": 0, "imagejob_404s": 0}
    for line in kube.kubectl("get", "--raw", "/metrics").stdout.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels, value = line.rsplit(" ", 1)
        write = any(f'verb="{v}"' in labels for v in ("POST", "PATCH", "PUT", "DELETE", "APPLY"))
        if 'resource="imagejobs"' in labels:
            out["imagejob_writes"] += int(float(value)) if write else 0
            out["imagejob_404s"] += int(float(value)) if 'code="404"' in labels else 0
        elif 'resource="events"' in labels and write:
            out["event_writes"] += int(float(value))
    return out


def events_about(kube: Kube) -> set[str]:
    """The ImageJob names the namespace's Kubernetes Events are about."""
    events = json.loads(kube.kubectl("get", "events", "-n", NS, "-o", "json").stdout)["items"]
    return {e["involvedObject"]["name"] for e in events if e["involvedObject"]["kind"] == "ImageJob"}


def operator_caught_up(r: redis.Redis) -> bool:
    """The operator's consumer group has read and acked every event so far."""
    groups = [g for g in r.xinfo_groups(keys.EVENTS_STREAM) if g["name"].decode().startswith(keys.OPERATOR_GROUP)]
    return bool(groups) and all(not g["lag"] and not g["pending"] for g in groups)


def submit(client: TestClient, mode: str) -> tuple[list[str], list[float]]:
    ids, seconds = [], []
    for _ in range(JOBS):
        t0 = time.perf_counter()
        resp = client.post("/v1/jobs", json={**REQUEST, "mode": mode})
        seconds.append(time.perf_counter() - t0)
        assert resp.status_code == 202, resp.text
        assert resp.json()["mode"] == mode
        ids.append(resp.json()["id"])
    return ids, seconds


def all_succeeded(client: TestClient, ids: list[str]) -> bool:
    return all(client.get(f"/v1/jobs/{i}").json()["phase"] == "Succeeded" for i in ids)


def test_bulk_jobs_complete_with_the_operator_running_and_kubectl_does_not_list_them(
    crds: Kube, tmp_path: Path
) -> None:
    kube = crds
    images = tmp_path / "images"
    # Normal Events too (Started, Completed), so that there are Events about every job to look at.
    with operator_stack(kube, tmp_path, NS, ZIMAGE_NORMAL_EVENTS="true") as (ps, url):
        kube.kubectl("apply", "-n", NS, "-f", str(REPO / "docs" / "examples" / "modeldeployment.yaml"))
        dev_key = f"zk_test_{secrets.token_urlsafe(24)}"
        settings = ApiSettings(
            redis_url=url, namespace=NS, dev_key=dev_key, dev_tenant=TENANT, rate_per_second=1000, rate_burst=1000,
            storage_url=images.as_uri(), max_concurrent_jobs=1000,
        )  # fmt: skip
        api_client = kube_config.new_client_from_config(config_file=kube.env["KUBECONFIG"])
        r = redis.Redis.from_url(url)
        figures: dict[str, Any] = {}
        try:
            with TestClient(
                create_app(settings, KubeJobStore(NS, api_client)), headers={"Authorization": f"Bearer {dev_key}"}
            ) as client:
                start_worker(ps, url, keys.queue_name(NS, MODEL), images, ZIMAGE_MODEL_SOURCE="noop")
                for mode in ("bulk", "imagejob"):
                    before = apiserver_requests(kube)
                    t0 = time.perf_counter()
                    ids, seconds = submit(client, mode)
                    wait_for(lambda ids=ids: all_succeeded(client, ids), timeout=45, interval=0.2, what=mode)
                    figures[mode] = {
                        "ids": ids,
                        "submit_ms_median": round(1000 * sorted(seconds)[len(seconds) // 2], 1),
                        "submit_ms_max": round(1000 * max(seconds), 1),
                        "all_done_s": round(time.perf_counter() - t0, 2),
                    }
                    wait_for(lambda: operator_caught_up(r), timeout=30, what="the operator to read every event")
                    after = apiserver_requests(kube)
                    figures[mode]["apiserver"] = {k: after[k] - before[k] for k in after}
                bulk_ids, cr_ids = figures["bulk"]["ids"], figures["imagejob"]["ids"]
                # Results through the API for both, the bulk ones with the same images a job has.
                for jid in (bulk_ids[0], cr_ids[0]):
                    job = client.get(f"/v1/jobs/{jid}").json()
                    assert len(job["images"]) == 1 and job["attempts"] == 1, job
                    assert client.get(f"/v1/jobs/{jid}/images/0").content.startswith(b"\x89PNG")
                listed = {j["id"]: j["mode"] for j in client.get("/v1/jobs", params={"limit": 500}).json()["data"]}
                assert listed == {**dict.fromkeys(bulk_ids, "bulk"), **dict.fromkeys(cr_ids, "imagejob")}
        except BaseException:
            print(ps.logs())
            raise
        finally:
            api_client.close()

        # kubectl sees the ImageJobs only.
        names = kube.kubectl("get", "ij", "-n", NS, "-o", "name").stdout.split()
        assert sorted(names) == sorted(f"imagejob.zimage.dev/{n}" for n in cr_ids)
        # Every bulk event is marked for the operator to skip; none of them was dead-lettered by it.
        bulk_events = [
            ev
            for _id, f in r.xrange(keys.EVENTS_STREAM)
            if (ev := JobEvent.model_validate_json(f[keys.EVENT_FIELD.encode()])).name in set(bulk_ids)
        ]
        assert len(bulk_events) >= 2 * JOBS and all(ev.bulk for ev in bulk_events)
        assert r.xlen(keys.DEAD_LETTER_STREAM) == 0
        assert ps.procs[0][1].poll() is None, "the operator died"
        for mode in ("bulk", "imagejob"):
            f = {k: v for k, v in figures[mode].items() if k != "ids"}
            print(f"\n{mode}: {JOBS} jobs, submit median {f['submit_ms_median']} ms, max {f['submit_ms_max']} ms, "
                  f"all succeeded after {f['all_done_s']} s; API server requests {f['apiserver']}")  # fmt: skip
        # A bulk job writes nothing to the API server (at most the operator looks up ImageJobs that are not
        # there, until it skips marked events); an ImageJob costs its create, its status writes and its Events.
        bulk, cr = figures["bulk"]["apiserver"], figures["imagejob"]["apiserver"]
        assert bulk["imagejob_writes"] == 0 and cr["imagejob_writes"] >= 3 * JOBS and cr["imagejob_404s"] == 0
        # Kubernetes Events about the ImageJobs, none about a bulk job.
        about = wait_for(lambda: events_about(kube), timeout=20, what="Events about the ImageJobs")
        assert about <= set(cr_ids), about - set(cr_ids)
