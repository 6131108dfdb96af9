"""The Helm chart: lint, render (defaults and every option), validate every manifest against Kubernetes' own
schemas, reject bad values through values.schema.json, and keep its CRDs and dashboard the repo's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import BIN, TESTBED

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "zimage-operator"
ALL_OPTIONS = CHART / "ci" / "all-options-values.yaml"
# Kinds Kubernetes' schemas do not cover: ours (checked against our CRD below) and the Prometheus operator's.
CUSTOM_GROUPS = ("zimage.dev/", "monitoring.coreos.com/")


@pytest.fixture(scope="module")
def helm() -> Iterator[list[str]]:
    """The helm binary from PATH, else the test bed's (``kube-testbed env``; no cluster is started)."""
    env = dict(os.environ)
    if not shutil.which("helm") and TESTBED.exists():
        out = subprocess.run([str(TESTBED), "env"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("export PATH="):
                env["PATH"] = line.removeprefix("export PATH=").strip("'\"").replace("$PATH", env["PATH"])
    found = shutil.which("helm", path=env["PATH"])
    if not found:
        pytest.skip("no helm binary (install the test bed: ../shared/testbed/kube-testbed install)")
    yield [found]


def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}:\n{out.stdout}\n{out.stderr}")
    return out


def render(helm: list[str], *values: Path, namespace: str = "zimage") -> list[dict[str, Any]]:
    args = [a for v in values for a in ("-f", str(v))]
    out = run([*helm, "template", "rel", str(CHART), "-n", namespace, *args]).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("values", [[], [ALL_OPTIONS]], ids=["defaults", "all-options"])
def test_lint_and_validate_every_manifest(helm: list[str], values: list[Path], tmp_path: Path) -> None:
    run([*helm, "lint", "--strict", str(CHART), *[a for v in values for a in ("-f", str(v))]])
    docs = render(helm, *values)
    builtin = [d for d in docs if not d["apiVersion"].startswith(CUSTOM_GROUPS)]
    assert len(builtin) >= 8
    manifests = tmp_path / "rendered.yaml"
    manifests.write_text(yaml.safe_dump_all(builtin))
    out = run([str(BIN / "kubernetes-validate"), "--strict", "-k", "1.30.0", str(manifests)], check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    import jsonschema

    for doc in docs:
        if doc["apiVersion"].startswith("zimage.dev/"):
            crd = yaml.safe_load((CHART / "crds" / f"{doc['kind'].lower()}.yaml").read_text())
            jsonschema.validate(
                doc["spec"], crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            )


def pods(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]


def test_every_pod_is_locked_down(helm: list[str]) -> None:
    for values in ([], [ALL_OPTIONS]):
        found = list(pods(render(helm, *values)))
        assert found
        for name, spec in found:
            pod = spec["securityContext"]
            assert pod["runAsNonRoot"] and pod["runAsUser"] > 0 and pod["seccompProfile"]["type"] == "RuntimeDefault"
            for c in spec["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"], name
                assert not sc["allowPrivilegeEscalation"], name
                assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], name


def test_rbac_is_least_privilege(helm: list[str]) -> None:
    for values, kind in (([], "Role"), ([ALL_OPTIONS], "ClusterRole")):
        roles = {d["metadata"]["name"]: d for d in render(helm, *values) if d["kind"] in ("Role", "ClusterRole")}
        assert roles["rel-zimage-operator-operator"]["kind"] == kind
        for role in roles.values():
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
                assert "secrets" not in rule["resources"]  # the API reads its keys from a mounted volume
        api = roles["rel-zimage-operator-api"]
        assert api["kind"] == "Role"  # the API never needs more than its namespace
        # The operator writes our resources' status only: no update/patch on the objects themselves.
        for rule in roles["rel-zimage-operator-operator"]["rules"]:
            if "zimage.dev" in rule["apiGroups"] and not all(r.endswith("/status") for r in rule["resources"]):
                assert not {"patch", "update", "create"} & set(rule["verbs"]), rule


@pytest.mark.parametrize(
    ("bad", "complaint"),
    [
        ({"operator": {"replicas": 0}}, "/operator/replicas"),
        ({"redis": {"bundled": False}}, "/redis"),
        ({"redis": {"image": {"tag": "latest"}}}, "/redis/image/tag"),
        ({"api": {"storageUrl": "ftp://x"}}, "/api/storageUrl"),
        ({"api": {"service": {"type": "ExternalName"}}}, "/api/service/type"),
        ({"metrics": {"prometheusRule": {"failureRatio": 2}}}, "/metrics/prometheusRule/failureRatio"),
        ({"replicaCount": 3}, "replicaCount"),  # a typo is an error, not a silently ignored value
    ],
)
def test_bad_values_are_rejected_by_the_schema(
    helm: list[str], tmp_path: Path, bad: dict[str, Any], complaint: str
) -> None:
    values = tmp_path / "bad.yaml"
    values.write_text(yaml.safe_dump(bad))
    out = run([*helm, "template", "rel", str(CHART), "-f", str(values)], check=False)
    assert out.returncode != 0 and "schema" in out.stderr and complaint in out.stderr, out.stderr


def test_chart_crds_and_dashboard_are_the_repos() -> None:
    for crd in (REPO / "crds").glob("*.yaml"):
        assert (CHART / "crds" / crd.name).read_text() == crd.read_text(), f"cp crds/{crd.name} {CHART}/crds/"
    dashboard = json.loads((CHART / "dashboards" / "zimage.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in (
        "zimage_queue_length",
        "zimage_ready_replicas",
        "zimage_operator_jobs_finished_total",
        "zimage_worker_inference_seconds_bucket",
        "zimage_api_request_duration_seconds_bucket",
    ):
        assert metric in exprs
    assert (REPO / "docs" / "grafana-dashboard.json").read_text() == (CHART / "dashboards" / "zimage.json").read_text()


def _operator_settings(env: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> Any:
    from zimage_operator.settings import OperatorSettings

    for e in env:
        if e["name"].startswith("ZIMAGE_") and "value" in e:
            monkeypatch.setenv(e["name"], e["value"])
    return OperatorSettings()


def test_operator_retention_and_peering_values_reach_the_operator(
    helm: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chart's defaults are the operator's own, and each value lands where the operator's settings read it."""
    from zimage_operator.settings import OperatorSettings

    values = yaml.safe_load((CHART / "values.yaml").read_text())["operator"]
    defaults = OperatorSettings()
    assert values["ttlSecondsAfterFinished"] == defaults.default_ttl_seconds_after_finished
    assert values["jobRetentionSeconds"] == defaults.job_retention_seconds
    assert values["peeringLifetimeSeconds"] == defaults.peering_lifetime_seconds
    keep = tmp_path / "keep.yaml"
    keep.write_text(yaml.safe_dump({"operator": {"ttlSecondsAfterFinished": None, "jobRetentionSeconds": 3600}}))
    for extra, ttl, retention in (([], 86400, 604800), ([keep], None, 3600)):
        docs = render(helm, *extra)
        [dep] = [
            d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "rel-zimage-operator-operator"
        ]
        container = dep["spec"]["template"]["spec"]["containers"][0]
        with monkeypatch.context() as m:
            cfg = _operator_settings(container["env"], m)
        assert (cfg.default_ttl_seconds_after_finished, cfg.job_retention_seconds) == (ttl, retention)
        assert "--peering=rel-zimage-operator" in container["args"]
        [peering] = [d for d in docs if d["kind"] == "KopfPeering"]
        assert peering["metadata"]["name"] == "rel-zimage-operator"
    crds = [yaml.safe_load((CHART / "crds" / f).read_text()) for f in ("kopf-peering.yaml", "kopf-clusterpeering.yaml")]
    assert {c["spec"]["names"]["kind"] for c in crds} == {"KopfPeering", "ClusterKopfPeering"}
