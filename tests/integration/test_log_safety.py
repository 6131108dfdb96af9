"""Hostile input and credentials against the real processes' logs: every line one JSON object, control
characters escaped (never raw), and no key, password or signature in any line."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import httpx

from conftest import Processes, json_log_lines, start_worker, wait_for
from zimage_api.local import DEV_KEY, local_api, serve_in_thread
from zimage_queue import GenerationParams, JobMessage, JobQueue

Q = "ns/m"
# Allowed by the schema (a URI may hold anything but a newline; a prompt anything at all).
HOSTILE_URI = 'file:///in\r{"level":"CRITICAL","msg":"forged"}\x1b[2J\x1b[31m\x00\u2028.png'
HOSTILE_PROMPT = 'a fox\n{"level":"CRITICAL","msg":"forged"}\x1b]0;title\x07\u2029'


def test_worker_process_logs_hostile_input_escaped_and_no_credentials(
    redis_url: str, tmp_path: Path, processes: Processes
) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    # The test Redis has no password: its default user takes any, so the worker really runs with this URL.
    with_password = redis_url.replace("redis://", f"redis://default:{password}@")
    aws_secret = f"aws-{uuid.uuid4().hex}"
    proc = start_worker(processes, with_password, Q, tmp_path / "images", AWS_SECRET_ACCESS_KEY=aws_secret)
    q = JobQueue.from_url(redis_url)
    bad = GenerationParams(prompt=HOSTILE_PROMPT, task="image-to-image", input_image=HOSTILE_URI, width=64, height=64)
    good = GenerationParams(prompt=HOSTILE_PROMPT, width=64, height=64, steps=1, seed=1)
    jobs = [
        JobMessage(uid=str(uuid.uuid4()), namespace="ns", name=n, queue=Q, params=p.model_copy(update={"seed": 1}))
        for n, p in (("bad", bad), ("good", good))
    ]
    for m in jobs:
        q.enqueue(m)
    wait_for(lambda: q.result(jobs[1].uid) is not None and len(q.dead_letters()) == 1, 120, what="both jobs")
    proc.terminate()
    assert proc.wait(timeout=60) == 0
    log = processes.procs[0][2].read_text()
    records = json_log_lines(log)
    failed = [r for r in records if "failed on its input" in str(r["msg"])]
    assert len(failed) == 1 and HOSTILE_URI.replace("\x00", "") in str(failed[0]["msg"]).replace("\x00", "")
    assert password not in log and aws_secret not in log


def test_api_access_and_error_logs_hold_no_keys_or_signatures(tmp_path: Path, captured_logs: io.StringIO) -> None:
    wrong_key = DEV_KEY.rsplit("_", 1)[0] + "_" + uuid.uuid4().hex
    with (
        local_api("noop", images_dir=tmp_path / "images") as la,
        serve_in_thread(la.app, log_config=None, log_level="info") as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        auth = {"Authorization": f"Bearer {DEV_KEY}"}
        assert http.get("/v1/jobs", headers={"Authorization": f"Bearer {wrong_key}"}).status_code == 401
        assert http.get(f"/v1/jobs?api_key={wrong_key}").status_code == 401
        r = http.post("/v1/jobs", headers=auth, json={"prompt": HOSTILE_PROMPT, "width": 64, "height": 64})
        assert r.status_code in (200, 202), r.text
        name = r.json()["id"]
        wait_for(lambda: http.get(f"/v1/jobs/{name}", headers=auth).json()["phase"] == "Succeeded", 60, what="job")
        link = http.get(f"/v1/jobs/{name}", headers=auth).json()["images"][0]["url"]
        assert http.get(link).status_code == 200  # the signed link, no key
        assert http.get(f"/v1/jobs/%0d%0a{HOSTILE_PROMPT[:5]}%1b[31m", headers=auth).status_code in (400, 404)
    text = captured_logs.getvalue()
    records = json_log_lines(text)
    access = [str(r["msg"]) for r in records if r["logger"] == "uvicorn.access"]
    assert any("/images/0?expires=" in m and "signature=***" in m for m in access), access
    signature = httpx.URL(link).params["signature"]
    for secret in (DEV_KEY.rsplit("_", 1)[1], wrong_key.rsplit("_", 1)[1], signature):
        assert secret not in text
