"""An admitted ImageJob's spec cannot change: the CRD's CEL transition rule, on a real API server.

``kubectl apply`` of a changed spec is refused with the rule's message; labels, annotations and status stay
writable, and a ModelDeployment (whose spec is edited all the time: replicas, scaling) stays mutable.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from conftest import Kube
from zimage_operator.crdgen import IMMUTABLE_SPEC_MESSAGE
from zimage_operator.types import API_VERSION

pytestmark = pytest.mark.kube


def job(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "ImageJob",
        "metadata": {"name": name},
        "spec": {"model": "z-image-turbo", "prompt": "a red fox", **spec},
    }


def apply(kube: Kube, ns: str, obj: dict[str, Any]) -> tuple[int, str]:
    out = kube.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj), check=False)
    return out.returncode, out.stdout + out.stderr


def get(kube: Kube, ns: str, kind: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(kube.kubectl("get", kind, name, "-n", ns, "-o", "json").stdout)
    return obj


EDITS = [
    {"prompt": "a blue fox"},
    {"width": 512},
    {"seed": 7},  # a field that was not set
    {"priority": "high"},
    {"model": "other-pool"},
]


def test_a_changed_spec_is_refused_with_the_rules_message(crds: Kube, namespace: str) -> None:
    created = job("fox", negativePrompt="blurry")
    rc, out = apply(crds, namespace, created)
    assert rc == 0, out
    before = get(crds, namespace, "imagejob", "fox")
    for edit in EDITS:
        rc, out = apply(crds, namespace, {**created, "spec": {**created["spec"], **edit}})
        assert rc != 0 and IMMUTABLE_SPEC_MESSAGE in out, (edit, out)
    # taking a field away, as a JSON patch and as an apply without it: refused alike
    patch = crds.kubectl(
        "patch", "imagejob", "fox", "-n", namespace, "--type=json",
        "-p", json.dumps([{"op": "remove", "path": "/spec/negativePrompt"}]), check=False,
    )  # fmt: skip
    assert patch.returncode != 0 and IMMUTABLE_SPEC_MESSAGE in patch.stderr, patch.stderr
    rc, out = apply(crds, namespace, job("fox"))
    assert rc != 0 and IMMUTABLE_SPEC_MESSAGE in out, out
    after = get(crds, namespace, "imagejob", "fox")
    assert after["spec"] == before["spec"] and after["metadata"]["generation"] == 1


def test_metadata_and_status_stay_writable(crds: Kube, namespace: str) -> None:
    created = job("owl")
    assert apply(crds, namespace, created)[0] == 0
    labelled = {**created, "metadata": {"name": "owl", "labels": {"team": "a"}, "annotations": {"note": "x"}}}
    rc, out = apply(crds, namespace, labelled)
    assert rc == 0, out
    crds.kubectl("label", "imagejob", "owl", "-n", namespace, "stage=two")
    # what the operator, the API and kopf write: the status subresource
    crds.kubectl(
        "patch", "imagejob", "owl", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"phase": "Queued", "kopf": {"progress": {}}}}),
    )  # fmt: skip
    obj = get(crds, namespace, "imagejob", "owl")
    assert obj["metadata"]["labels"] == {"team": "a", "stage": "two"}
    assert obj["metadata"]["annotations"]["note"] == "x"
    assert obj["status"]["phase"] == "Queued" and obj["spec"]["prompt"] == "a red fox"
    # the same apply again (no change to spec) is fine: the rule refuses changes, not writes
    rc, out = apply(crds, namespace, labelled)
    assert rc == 0, out


def test_a_modeldeployment_spec_stays_mutable(crds: Kube, namespace: str) -> None:
    md = {"apiVersion": API_VERSION, "kind": "ModelDeployment", "metadata": {"name": "pool"}, "spec": {}}
    assert apply(crds, namespace, md)[0] == 0
    rc, out = apply(crds, namespace, {**md, "spec": {"scaling": {"maxReplicas": 2}}})
    assert rc == 0, out
    assert get(crds, namespace, "modeldeployment", "pool")["spec"]["scaling"]["maxReplicas"] == 2
