"""A cluster without CEL stores an ImageJob spec edit; the running operator reports it and runs the job as admitted.

The test bed (1.34) has CEL, so for this test the CRD's immutability rule is taken off (and put back after,
checked both ways with a server-side dry run): the API server then behaves as one before 1.25 does.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, Kube, Processes, operator_stack, start_worker, wait_for
from zimage_operator.crdgen import IMMUTABLE_SPEC_MESSAGE
from zimage_operator.types import API_VERSION
from zimage_queue import JobQueue, keys

pytestmark = pytest.mark.kube
NS = f"zimage-edits-{os.getpid()}"
CRD = "imagejobs.zimage.dev"
RULES = "/spec/versions/0/schema/openAPIV3Schema/properties/spec/x-kubernetes-validations"


def job(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "ImageJob",
        "metadata": {"name": name},
        "spec": {"model": "pool", "prompt": "a red fox", "width": 64, "height": 64, "steps": 2, **spec},
    }


def apply(kube: Kube, obj: dict[str, Any], *extra: str) -> tuple[int, str]:
    out = kube.kubectl("apply", "-n", NS, *extra, "-f", "-", input=json.dumps(obj), check=False)
    return out.returncode, out.stdout + out.stderr


def edit_refused(kube: Kube, probe: dict[str, Any]) -> bool | None:
    """Whether the API server refuses a spec edit now (a dry run: nothing is stored); None: some other error."""
    rc, out = apply(kube, {**probe, "spec": {**probe["spec"], "prompt": uuid.uuid4().hex}}, "--dry-run=server")
    if rc == 0:
        return False
    return True if IMMUTABLE_SPEC_MESSAGE in out else None


@pytest.fixture
def stack(crds: Kube, tmp_path: Path) -> Iterator[tuple[Kube, Processes, str]]:
    """The operator watching NS (with its own Redis), and the CRD without its immutability rule meanwhile."""
    with operator_stack(crds, tmp_path, NS) as (ps, url):
        probe = job("probe", model="no-such-pool")
        assert apply(crds, probe)[0] == 0
        assert edit_refused(crds, probe) is True
        crds.kubectl("patch", "crd", CRD, "--type=json", "-p", json.dumps([{"op": "remove", "path": RULES}]))
        try:
            wait_for(lambda: edit_refused(crds, probe) is False, what="the API server to take spec edits")
            yield crds, ps, url
        finally:
            crds.kubectl("apply", "-f", str(REPO / "crds" / "imagejob.yaml"))
            wait_for(lambda: edit_refused(crds, probe) is True, what="the immutability rule back")


def get(kube: Kube, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(kube.kubectl("get", "ij", name, "-n", NS, "-o", "json").stdout)
    return obj


def spec_changed_events(kube: Kube, name: str) -> list[dict[str, Any]]:
    out = kube.kubectl(
        "get", "events", "-n", NS, "-o", "json",
        f"--field-selector=involvedObject.name={name},reason=SpecChanged",
    )  # fmt: skip
    items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return items


def test_an_edit_is_reported_and_the_job_runs_as_admitted(stack: tuple[Kube, Processes, str], tmp_path: Path) -> None:
    kube, ps, url = stack
    queue_name = keys.queue_name(NS, "pool")
    md = {"apiVersion": API_VERSION, "kind": "ModelDeployment", "metadata": {"name": "pool"}, "spec": {}}
    assert apply(kube, md)[0] == 0
    created = job("fox")
    assert apply(kube, created)[0] == 0
    # admitted: queued, with the digest of the spec it was admitted with (what an edit is compared with)
    wait_for(
        lambda: (
            (st := get(kube, "fox").get("status") or {}).get("phase") == "Queued"
            and st.get("specDigest", {}).get("prompt")
        ),
        what="fox admitted",
    )
    queue = JobQueue.from_url(url)
    assert queue.stats(queue_name).queued == 1

    kube.kubectl("label", "ij", "fox", "-n", NS, "team=a")  # metadata: no report
    rc, out = apply(kube, job("fox", prompt="a blue fox", steps=3))
    assert rc == 0, out  # no CEL: the API server stores the edit
    [event] = wait_for(lambda: spec_changed_events(kube, "fox"), what="a SpecChanged event")
    assert event["type"] == "Warning" and event["involvedObject"]["uid"] == get(kube, "fox")["metadata"]["uid"]
    assert "spec.prompt, spec.steps changed" in event["message"] and "admitted" in event["message"], event
    assert queue.stats(queue_name).queued == 1  # nothing enqueued again

    start_worker(ps, url, queue_name, tmp_path / "images")
    kube.kubectl("wait", "-n", NS, "--for=condition=Succeeded", "ij/fox", "--timeout=120s", timeout=130)
    st = get(kube, "fox")["status"]
    # the admitted spec ran: 2 steps (the edit asked for 3), once
    assert st["steps"] == 2 and st["progress"]["totalSteps"] == 2 and st["attempts"] == 1, st
    assert queue.stats(queue_name) == type(queue.stats(queue_name))(queued=0, in_flight=0)
    assert len(spec_changed_events(kube, "fox")) == 1
