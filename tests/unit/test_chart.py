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
SHARDS = CHART / "ci" / "shards-values.yaml"
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


@pytest.mark.parametrize(
    "values",
    [[], [ALL_OPTIONS], [SHARDS], [ALL_OPTIONS, SHARDS]],
    ids=["defaults", "all-options", "shards", "all+shards"],
)
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
    for values in ([], [ALL_OPTIONS], [SHARDS]):
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
                if "secrets" in rule["resources"]:  # the API reads its keys from a mounted volume; the operator only
                    # keeps the Redis credentials' copy for pools in other namespaces (test_chart_redis.py)
                    assert role["metadata"]["name"] == "rel-zimage-operator-operator", role["metadata"]["name"]
                    assert rule["resources"] == ["secrets"] and rule["verbs"] == ["get", "create", "patch"]
        api = roles["rel-zimage-operator-api"]
        assert api["kind"] == "Role"  # the API never needs more than its namespace
        # The operator writes our resources' status only: no update/patch on the objects themselves. It creates
        # ImageJobs, but only a workflow's own step jobs (owned by the workflow), never changes a user's.
        for rule in roles["rel-zimage-operator-operator"]["rules"]:
            if "zimage.dev" in rule["apiGroups"] and not all(r.endswith("/status") for r in rule["resources"]):
                allowed = {"create"} if rule["resources"] == ["imagejobs"] else set()
                assert not ({"patch", "update", "create"} - allowed) & set(rule["verbs"]), rule


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


def _write(tmp_path: Path, name: str, values: dict[str, Any]) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


def _operators(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    }


def _parse_operator_args(args: list[str]) -> Any:
    """The container's args through the operator's own parser (not run): every flag the chart passes exists."""
    import argparse

    from zimage_operator import __main__ as entry

    seen: dict[str, Any] = {}

    def capture(self: argparse.ArgumentParser, argv: list[str] | None = None, *_: Any) -> argparse.Namespace:
        seen["ns"] = original(self, argv)
        raise SystemExit(0)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture  # type: ignore[assignment,method-assign]
    try:
        with pytest.raises(SystemExit):
            entry.main(args)
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    return seen["ns"]


def test_no_shards_render_the_one_operator_of_before(helm: list[str], tmp_path: Path) -> None:
    """An empty shard list is today's install: one Deployment, its Role, its peering object, no shard flags."""
    docs = render(helm, _write(tmp_path, "empty.yaml", {"operator": {"shards": []}}))

    def same(ds: list[dict[str, Any]]) -> list[str]:  # the URL-signing Secret holds a random key per render
        return [json.dumps(d, sort_keys=True) for d in ds if d["kind"] != "Secret"]

    assert same(docs) == same(render(helm))
    [(name, dep)] = _operators(docs).items()
    assert name == "rel-zimage-operator-operator"
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not any(a.startswith(("--shard", "--selector")) for a in args)


def test_each_shard_gets_its_operator_peering_and_rbac(helm: list[str]) -> None:
    from zimage_operator.shards import parse_selector, peering_name

    docs = render(helm, SHARDS)
    ops = _operators(docs)
    assert set(ops) == {f"rel-zimage-operator-operator-{s}" for s in ("a", "b", "gold")}
    flags = {}
    for name, dep in ops.items():
        shard = name.rsplit("-", 1)[1]
        spec = dep["spec"]
        pod = spec["template"]["spec"]
        assert spec["selector"]["matchLabels"]["zimage.dev/shard"] == shard  # the Deployments' pods never mix
        assert pod["serviceAccountName"] == f"rel-zimage-operator-operator-{shard}"
        ns = _parse_operator_args(pod["containers"][0]["args"])
        assert ns.shard == shard and ns.peering == "rel-zimage-operator"
        parse_selector(ns.selector or "")
        flags[shard] = (ns.namespace, ns.selector, spec["replicas"])
    assert flags == {
        "a": (["team-a", "team-b"], "zimage.dev/shard notin (gold)", 2),
        "b": (["team-c"], None, 1),
        "gold": (["team-b"], "zimage.dev/shard=gold", 2),
    }
    assert ops["rel-zimage-operator-operator-b"]["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "50m", "memory": "128Mi"}
    }
    metrics = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service" and "metrics" in d["metadata"]["name"]}
    assert {n: m["spec"]["selector"]["zimage.dev/shard"] for n, m in metrics.items()} == {
        f"rel-zimage-operator-operator-{s}-metrics": s for s in ("a", "b", "gold")
    }
    # The operator meets its replicas in peering_name(--peering, --shard), in every namespace it names.
    peerings = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs if d["kind"] == "KopfPeering"}
    assert peerings == {
        ("team-a", peering_name("rel-zimage-operator", "a")),
        ("team-b", peering_name("rel-zimage-operator", "a")),
        ("team-c", peering_name("rel-zimage-operator", "b")),
        ("team-b", peering_name("rel-zimage-operator", "gold")),
    }
    # A Role in each namespace a shard serves, bound to the shards serving it and to no other.
    bindings = {
        d["metadata"]["namespace"]: sorted(s["name"].rsplit("-", 1)[1] for s in d["subjects"])
        for d in docs
        if d["kind"] == "RoleBinding" and d["metadata"]["name"] == "rel-zimage-operator-operator"
    }
    assert bindings == {"team-a": ["a"], "team-b": ["a", "gold"], "team-c": ["b"]}
    roles = {d["metadata"]["namespace"] for d in docs if d["kind"] == "Role" and "operator-operator" in str(d)}
    assert roles == {"team-a", "team-b", "team-c"}
    assert not [
        d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "rel-zimage-operator-operator"
    ]
    [observer] = [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    assert len(observer["subjects"]) == 3


def test_cluster_wide_label_shards(helm: list[str], tmp_path: Path) -> None:
    values = {
        "rbac": {"clusterWide": True},
        "operator": {
            "shards": [
                {"name": "a", "selector": "zimage.dev/shard=a"},
                {"name": "rest", "selector": "zimage.dev/shard!=a"},
                {"name": "teams", "namespaces": ["team-*", "ops"], "selector": "tier=gold"},
            ]
        },
    }
    docs = render(helm, _write(tmp_path, "cw.yaml", values))
    args = {
        n: _parse_operator_args(d["spec"]["template"]["spec"]["containers"][0]["args"])
        for n, d in _operators(docs).items()
    }
    assert args["rel-zimage-operator-operator-a"].all_namespaces
    assert args["rel-zimage-operator-operator-teams"].namespace == ["team-*", "ops"]
    peerings = {
        (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs if "Peering" in d["kind"]
    }
    assert peerings == {
        ("ClusterKopfPeering", None, "rel-zimage-operator-a"),
        ("ClusterKopfPeering", None, "rel-zimage-operator-rest"),
        ("KopfPeering", "ops", "rel-zimage-operator-teams"),  # a pattern's namespaces get theirs by hand
    }
    [role] = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "rel-zimage-operator-operator"]
    assert {"clusterkopfpeerings", "kopfpeerings"} <= {r for rule in role["rules"] for r in rule["resources"]}
    [binding] = [
        d for d in docs if d["kind"] == "ClusterRoleBinding" and d["metadata"]["name"] == "rel-zimage-operator-operator"
    ]
    assert [s["name"] for s in binding["subjects"]] == [
        f"rel-zimage-operator-operator-{s}" for s in ("a", "rest", "teams")
    ]


@pytest.mark.parametrize(
    ("shards", "cluster_wide", "complaint"),
    [
        ([{"name": "Team_A"}], False, "/operator/shards/0/name"),  # the schema
        ([{"name": "a", "zone": "x"}], False, "zone"),
        ([{"name": "a", "namespaces": []}], False, "/operator/shards/0/namespaces"),
        ([{"name": "a", "namespaces": ["ns-x"]}, {"name": "a", "namespaces": ["ns-y"]}], False, "used twice"),
        ([{"name": "a", "namespaces": ["x"]}, {"name": "b"}], True, "needs namespaces or a selector"),
        ([{"name": "a", "namespaces": ["team-*"]}], False, "needs rbac.clusterWide"),
        (
            [{"name": "a", "namespaces": ["x"]}, {"name": "b", "namespaces": ["x"], "selector": "s=b"}],
            False,
            'owns all of namespace "x"',
        ),
    ],
)
def test_shards_that_cannot_work_are_refused(
    helm: list[str], tmp_path: Path, shards: list[dict[str, Any]], cluster_wide: bool, complaint: str
) -> None:
    values = _write(tmp_path, "bad.yaml", {"rbac": {"clusterWide": cluster_wide}, "operator": {"shards": shards}})
    out = run([*helm, "template", "rel", str(CHART), "-f", str(values)], check=False)
    assert out.returncode != 0 and complaint in out.stderr, out.stderr


def _deployment(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    [dep] = [
        d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    return dep


def test_default_storage_is_one_volume_for_the_api_the_operator_and_its_workers(
    helm: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default install stores images where the API reads them: the chart's claim, mounted by the API and the
    operator, and by every worker the operator renders for a pool in the release namespace."""
    from zimage_api.settings import ApiSettings
    from zimage_operator.workload import desired_objects

    docs = render(helm)
    [claim] = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    name = claim["metadata"]["name"]
    api, op = (_deployment(docs, c)["spec"]["template"]["spec"] for c in ("api", "operator"))
    for spec in (api, op):
        assert {"name": "images", "persistentVolumeClaim": {"claimName": name}} in spec["volumes"]
        assert {"name": "images", "mountPath": "/var/lib/zimage/images"} in spec["containers"][0]["volumeMounts"]
    with monkeypatch.context() as m:
        for e in api["containers"][0]["env"]:
            if "value" in e:
                m.setenv(e["name"], e["value"])
        assert ApiSettings().storage_url == "file:///var/lib/zimage/images"
    env = op["containers"][0]["env"]
    assert {"name": "ZIMAGE_OPERATOR_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}} in env
    with monkeypatch.context() as m:
        cfg = _operator_settings(env, m)
    assert (cfg.worker_storage_claim, cfg.storage_url) == (name, "file:///var/lib/zimage/images")
    assert cfg.image_retention_seconds == cfg.upload_retention_seconds == 7 * 86400
    pool = {"metadata": {"name": "turbo", "namespace": "zimage", "uid": "u"}, "spec": {}}
    worker = desired_objects(
        pool,
        redis_url="redis://r:6379/0",
        replicas=1,
        operator_namespace="zimage",
        storage_claim=cfg.worker_storage_claim,
        storage_mount_path=cfg.worker_storage_mount_path,
    )["deployment"]["spec"]["template"]["spec"]
    assert {"name": "images", "persistentVolumeClaim": {"claimName": name}} in worker["volumes"]
    wenv = {e["name"]: e.get("value") for e in worker["containers"][0]["env"]}
    assert wenv["ZIMAGE_STORAGE_URL"] == "file:///var/lib/zimage/images"


def test_s3_storage_reaches_every_component(helm: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "storage": {
            "mode": "s3",
            "retentionDays": 0,
            "s3": {
                "bucket": "images",
                "prefix": "/zimage/",
                "endpoint": "http://minio.minio:9000",
                "existingSecret": "s3-creds",
                "serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/z"},
            },
        }
    }
    docs = render(helm, _write(tmp_path, "s3.yaml", values))
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    url = "s3://images/zimage?endpoint=http%3A%2F%2Fminio.minio%3A9000"
    from zimage_worker.storage import S3Store, open_store

    store = open_store(url)
    assert isinstance(store, S3Store) and (store.bucket, store.prefix) == ("images", "zimage")
    assert store.s3.meta.endpoint_url == "http://minio.minio:9000"
    for component in ("api", "operator"):
        c = _deployment(docs, component)["spec"]["template"]["spec"]["containers"][0]
        assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
        assert {"name": "ZIMAGE_STORAGE_URL", "value": url} in c["env"]
    op_env = _deployment(docs, "operator")["spec"]["template"]["spec"]["containers"][0]["env"]
    with monkeypatch.context() as m:
        cfg = _operator_settings(op_env, m)
    assert (cfg.worker_storage_url, cfg.worker_storage_secret, cfg.worker_storage_claim) == (url, "s3-creds", "")
    assert cfg.image_retention_seconds is None and cfg.upload_retention_seconds == 7 * 86400
    accounts = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert len(accounts) == 2
    assert all(a["metadata"]["annotations"] == values["storage"]["s3"]["serviceAccountAnnotations"] for a in accounts)
    bad = _write(tmp_path, "bad.yaml", {"storage": {"mode": "s3"}})
    out = run([*helm, "template", "rel", str(CHART), "-f", str(bad)], check=False)
    assert out.returncode != 0 and "bucket" in out.stderr
