"""kill -9 the operator while a job is queued: the restarted one neither loses nor re-enqueues it."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml

from conftest import REPO, Kube, Processes, entries_added, start_operator, start_worker, wait_for
from zimage_queue import JobQueue, keys

pytestmark = pytest.mark.kube


def test_operator_sigkill_and_restart_converges_without_duplicates(
    crds: Kube, namespace: str, redis_url: str, processes: Processes, tmp_path: Path
) -> None:
    kube = crds
    model = yaml.safe_load((REPO / "docs/examples/modeldeployment.yaml").read_text())
    job = {
        "apiVersion": "zimage.dev/v1alpha1",
        "kind": "ImageJob",
        "metadata": {"name": "survivor"},
        "spec": {"model": "z-image-turbo", "prompt": "a red fox", "width": 64, "height": 64, "seed": 1},
    }
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all([model, job]))
    operator = start_operator(processes, kube, redis_url, namespace)

    def phase() -> str:
        out = kube.kubectl("get", "ij", "survivor", "-n", namespace, "-o", "jsonpath={.status.phase}")
        return out.stdout

    wait_for(lambda: phase() == "Queued", what="Queued")
    operator.send_signal(signal.SIGKILL)
    operator.wait()

    start_operator(processes, kube, redis_url, namespace)  # resumes the job: enqueue again is a no-op
    start_worker(processes, redis_url, keys.queue_name(namespace, "z-image-turbo"), tmp_path / "images")
    kube.kubectl("wait", "-n", namespace, "--for=condition=Succeeded", "ij/survivor", "--timeout=120s", timeout=130)

    q = JobQueue.from_url(redis_url)
    stream = keys.stream(keys.queue_name(namespace, "z-image-turbo"), "normal")
    assert entries_added(q.r, [stream]) == 1  # enqueued exactly once across both operators
    assert q.r.xlen(stream) == 0  # and the acked entry left the stream
    status = json.loads(kube.kubectl("get", "ij", "survivor", "-n", namespace, "-o", "json").stdout)["status"]
    assert status["attempts"] == 1 and len(status["results"]) == 1
