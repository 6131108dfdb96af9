"""The REST API in cluster mode against the real test-bed API server, the operator and a tiny-model worker.

The API admits its jobs itself (ImageJob CR, Queued status, XADD) and the operator admits the same CR from its
watch: the queue must drop the second enqueue, and the status the operator writes must be what clients read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import redis
from fastapi.testclient import TestClient
from kubernetes import config as kube_config
from PIL import Image

from conftest import REPO, Kube, Processes, entries_added, operator_stack, start_worker, wait_for
from zimage_api.app import create_app
from zimage_api.kube_store import KubeJobStore
from zimage_api.settings import ApiSettings
from zimage_api.store import MODEL_LABEL, TENANT_LABEL
from zimage_queue import JobQueue, QueueStats, keys

pytestmark = pytest.mark.kube
NS = f"zimage-api-{os.getpid()}"
MODEL = "z-image-turbo"
TENANT = "team-a"
JOBS = 5
REQUEST = {"model": MODEL, "prompt": "a red fox", "width": 64, "height": 64, "steps": 2}


def cr(kube: Kube, name: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(kube.kubectl("get", "ij", name, "-n", NS, "-o", "json").stdout)
    return out


def enqueue_calls(r: redis.Redis) -> int:
    """JobQueue.enqueue calls so far, by anyone: its script's HSETNX (the only other one records results)."""
    stats: dict[str, Any] = r.info("commandstats")
    return int(stats.get("cmdstat_hsetnx", {}).get("calls", 0))


def test_api_jobs_become_imagejobs_run_once_and_cancel(crds: Kube, tmp_path: Path) -> None:
    kube = crds
    with operator_stack(kube, tmp_path, NS) as (ps, url):
        try:
            run(kube, ps, url, tmp_path)
        except BaseException:
            print(ps.logs())
            raise


def run(kube: Kube, ps: Processes, url: str, tmp: Path) -> None:
    kube.kubectl("apply", "-n", NS, "-f", str(REPO / "docs" / "examples" / "modeldeployment.yaml"))
    dev_key = f"zk_test_{secrets.token_urlsafe(24)}"
    settings = ApiSettings(
        redis_url=url, namespace=NS, dev_key=dev_key, dev_tenant=TENANT, rate_per_second=1000, rate_burst=1000
    )
    api_client = kube_config.new_client_from_config(config_file=kube.env["KUBECONFIG"])
    app = create_app(settings, KubeJobStore(NS, api_client))
    try:
        with TestClient(app, headers={"Authorization": f"Bearer {dev_key}"}) as client:
            scenario(kube, ps, client, redis.Redis.from_url(url), url, tmp)
    finally:
        api_client.close()


def scenario(kube: Kube, ps: Processes, client: TestClient, r: redis.Redis, url: str, tmp: Path) -> None:
    q = JobQueue(r)
    queue = keys.queue_name(NS, MODEL)
    assert client.get("/readyz").json() == {"status": "ready"}

    # -- a job cancelled while queued (no worker yet) never runs --------------------------------------
    resp = client.post("/v1/jobs", json=REQUEST)
    assert resp.status_code == 202, resp.text
    victim = resp.json()["id"]
    assert resp.json()["phase"] == "Queued"
    victim_uid = cr(kube, victim)["metadata"]["uid"]
    # The operator admits the same CR from its watch and enqueues it again: the queue keeps one entry.
    wait_for(lambda: enqueue_calls(r) >= 2, what="the operator's admission of the API's job")
    assert enqueue_calls(r) == 2 and entries_added(r, keys.streams(queue)) == 1
    # GET /v1/models: the ModelDeployment with its queue (no worker has taken the job).
    [model] = [m for m in client.get("/v1/models").json()["data"] if m["alias_of"] is None]  # not the aliases
    assert (model["id"], model["queue_length"], model["in_flight"]) == (MODEL, 1, 0)
    assert model["variant"] == "turbo" and model["ready"] is False

    resp = client.delete(f"/v1/jobs/{victim}")
    assert resp.status_code == 200, resp.text
    assert (resp.json()["phase"], resp.json()["reason"]) == ("Cancelled", "Cancelled")
    kube.kubectl("wait", "-n", NS, "--for=condition=Cancelled", f"ij/{victim}", "--timeout=30s")
    assert cr(kube, victim)["status"]["phase"] == "Cancelled"
    assert q.is_cancelled(victim_uid)

    # -- jobs submitted while a worker runs: the worker races the operator's own admission -------------
    start_worker(ps, url, queue, tmp / "images")
    names = []
    for _ in range(JOBS):
        resp = client.post("/v1/jobs", json=REQUEST)
        assert resp.status_code == 202, resp.text
        names.append(resp.json()["id"])
    kube.kubectl(
        "wait", "-n", NS, "--for=condition=Succeeded", *(f"ij/{n}" for n in names), "--timeout=50s", timeout=55
    )
    # The operator's own admissions of these jobs write only onto the version they decided on, so whatever it
    # still does with them cannot move a finished status back.

    listed = kube.kubectl("get", "ij", "-n", NS, "-l", f"{TENANT_LABEL}={TENANT}", "-o", "name").stdout.split()
    assert sorted(listed) == sorted(f"imagejob.zimage.dev/{n}" for n in [victim, *names])
    for name in names:
        obj = cr(kube, name)
        labels = obj["metadata"]["labels"]
        assert labels[TENANT_LABEL] == TENANT and labels[MODEL_LABEL] == MODEL
        st = obj["status"]
        assert st["phase"] == "Succeeded" and st["attempts"] == 1 and len(st["results"]) == 1, st
        assert st["worker"] and st["runSeconds"] >= 0
        # Exactly once: one run in the queue's own book, whoever enqueued first.
        uid = obj["metadata"]["uid"]
        assert r.hget(keys.job(uid), keys.F_ATTEMPTS) == b"1"
        view = client.get(f"/v1/jobs/{name}").json()
        assert (view["phase"], view["attempts"], len(view["images"])) == ("Succeeded", 1, 1)

    # One stream entry ever added per API job: no second XADD by the operator.
    assert entries_added(r, keys.streams(queue)) == JOBS + 1
    listing = client.get("/v1/jobs", params={"phase": "Succeeded"}).json()["data"]
    assert sorted(j["id"] for j in listing) == sorted(names)

    # The worker took the cancelled job first (FIFO) and dropped it without an attempt.
    wait_for(lambda: q.stats(queue) == QueueStats(queued=0, in_flight=0), what="queue drained")
    assert r.hget(keys.job(victim_uid), keys.F_ATTEMPTS) is None
    assert q.result(victim_uid) is None
    st = cr(kube, victim)["status"]
    assert st["phase"] == "Cancelled" and "startedAt" not in st and not st.get("results"), st
    [model] = [m for m in client.get("/v1/models").json()["data"] if m["alias_of"] is None]
    assert (model["queue_length"], model["in_flight"]) == (0, 0)


GENERATIONS = 16  # enough to hit the race (the answer before the status) many times over


def test_generated_image_urls_are_servable_at_once(crds: Kube, tmp_path: Path) -> None:
    """Every URL POST /v1/images/generations returns answers at once: the API answers on the worker's event,
    often before the operator has written the job's status.results, and serves the image all the same."""
    kube, ns = crds, f"{NS}-urls"
    images = tmp_path / "images"
    with operator_stack(kube, tmp_path, ns) as (ps, url):
        kube.kubectl("apply", "-n", ns, "-f", str(REPO / "docs" / "examples" / "modeldeployment.yaml"))
        start_worker(ps, url, keys.queue_name(ns, MODEL), images)
        dev_key = f"zk_test_{secrets.token_urlsafe(24)}"
        settings = ApiSettings(
            redis_url=url, namespace=ns, dev_key=dev_key, dev_tenant=TENANT, rate_per_second=1000, rate_burst=1000,
            storage_url=images.as_uri(),
        )  # fmt: skip
        api_client = kube_config.new_client_from_config(config_file=kube.env["KUBECONFIG"])
        served: dict[str, list[str]] = {}  # job -> sha256 of each image, as fetched
        try:
            with TestClient(create_app(settings, KubeJobStore(ns, api_client))) as client:
                for i in range(GENERATIONS):
                    n = 1 + i % 2
                    body = {"model": MODEL, "prompt": f"a red fox {i}", "size": "64x64", "steps": 2, "n": n}
                    r = client.post("/v1/images/generations", json=body, headers={"Authorization": f"Bearer {dev_key}"})
                    assert r.status_code == 200, r.text
                    links = [d["url"] for d in r.json()["data"]]
                    assert len(links) == n
                    for link in links:  # at once, and without the key: the signed link is all a client has
                        img = client.get(link)
                        assert img.status_code == 200, (i, link, img.text)
                        assert Image.open(io.BytesIO(img.content)).size == (64, 64)
                        name = urlparse(link).path.split("/")[3]
                        served.setdefault(name, []).append(hashlib.sha256(img.content).hexdigest())
        except BaseException:
            print(ps.logs())
            raise
        finally:
            api_client.close()

        # What was served is what the operator then wrote into each job's status.
        def written(name: str) -> list[str]:
            obj = json.loads(kube.kubectl("get", "ij", name, "-n", ns, "-o", "json").stdout)
            return [r["sha256"] for r in (obj.get("status") or {}).get("results") or []]

        assert len(served) == GENERATIONS
        for name, digests in served.items():
            wait_for(lambda name=name, digests=digests: written(name) == digests, what=f"{name}'s status.results")
