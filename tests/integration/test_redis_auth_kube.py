"""A locked Redis on the test bed: the chart's Secrets, NetworkPolicies and RBAC on a real API server, and the
operator keeping a pool's copy of the Redis password in the pool's namespace.

No kubelet runs here, so no pod starts: what is checked is what the API server accepts and stores, and what the
running operator writes.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, Kube, Processes, start_operator, wait_for
from zimage_operator import workload
from zimage_queue.server import RedisServer

pytestmark = pytest.mark.kube
CHART = REPO / "charts" / "zimage-operator"
REL = "rel"
FULL = f"{REL}-zimage-operator"


def helm_bin(kube: Kube) -> str:
    helm = shutil.which("helm", path=kube.env.get("PATH"))
    if helm is None:
        pytest.skip("no helm binary on the test bed's PATH")
    return helm


def helm(kube: Kube, *args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([helm_bin(kube), *args], env=kube.env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def secret_data(kube: Kube, ns: str, name: str) -> dict[str, str]:
    got = json.loads(kube.kubectl("get", "secret", name, "-n", ns, "-o", "json").stdout)
    return {k: base64.b64decode(v).decode() for k, v in got["data"].items()}


def test_helm_install_locks_redis_and_an_upgrade_keeps_its_secrets(namespace: str, crds: Kube) -> None:
    kube = crds
    tls = CHART / "ci" / "redis-tls-values.yaml"
    args = ["-n", namespace, "-f", str(tls), "--set", "metrics.serviceMonitor.enabled=false"]
    helm(kube, "install", REL, str(CHART), *args)
    try:
        password = secret_data(kube, namespace, f"{FULL}-redis-auth")["redis-password"]
        certs = secret_data(kube, namespace, f"{FULL}-redis-tls")
        assert len(password) == 32 and certs["ca.crt"].startswith("-----BEGIN CERTIFICATE-----")
        policies = set(kube.kubectl("get", "networkpolicy", "-n", namespace, "-o", "name").stdout.split())
        assert policies == {
            f"networkpolicy.networking.k8s.io/{FULL}-{c}" for c in ("redis", "api", "operator", "workers")
        }
        sts = json.loads(kube.kubectl("get", "statefulset", f"{FULL}-redis", "-n", namespace, "-o", "json").stdout)
        stored = json.dumps(sts) + kube.kubectl("get", "deploy", "-n", namespace, "-o", "json").stdout
        assert password not in stored  # the pod specs name the Secret only
        # An upgrade renders again: lookup keeps the generated password and certificates.
        helm(kube, "upgrade", REL, str(CHART), *args)
        assert secret_data(kube, namespace, f"{FULL}-redis-auth")["redis-password"] == password
        assert secret_data(kube, namespace, f"{FULL}-redis-tls") == certs
    finally:
        helm(kube, "uninstall", REL, "-n", namespace, "--wait=false")


VALUE_SETS: list[dict[str, Any]] = [
    {},
    {"rbac": {"clusterWide": True}, "metrics": {"serviceMonitor": {"enabled": True}}},
    {"operator": {"shards": [{"name": "a", "namespaces": ["team-a", "team-b"]}]}, "redis": {"tls": {"enabled": True}}},
]


def test_network_policies_pass_strict_server_side_validation(namespace: str, crds: Kube, tmp_path: Path) -> None:
    for values in VALUE_SETS:  # defaults, cluster-wide with metrics, shards with TLS
        f = tmp_path / "values.yaml"
        f.write_text(yaml.safe_dump(values))
        out = helm(crds, "template", REL, str(CHART), "-n", namespace, "-f", str(f)).stdout
        docs = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "NetworkPolicy"]
        assert len(docs) == 4, values
        dry = crds.kubectl(
            "apply", "--dry-run=server", "--validate=strict", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs)
        )
        assert dry.stdout.count("created (server dry run)") == 4, dry.stdout


def test_the_operator_copies_the_password_for_a_pool_outside_its_namespace(
    namespace: str, crds: Kube, processes: Processes
) -> None:
    """The operator runs (here) as if in namespace zimage-system, so the pool's namespace gets the copy."""
    kube = crds
    password = "pw-" + uuid.uuid4().hex
    with RedisServer(password=password) as srv:
        start_operator(
            processes,
            kube,
            srv.url,
            namespace,
            ZIMAGE_REDIS_PASSWORD=password,
            ZIMAGE_OPERATOR_NAMESPACE="zimage-system",
            ZIMAGE_WORKER_REDIS_SECRET=f"{FULL}-redis-auth",  # the chart's, in zimage-system: not referable here
            ZIMAGE_DRIFT_CHECK_SECONDS="1",
        )
        md = {
            "apiVersion": "zimage.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "locked"},
            "spec": {"model": {"source": "tiny-random"}, "image": "example.org/zimage-worker:test"},
        }
        kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(md))
        name = workload.redis_secret_name("locked")
        wait_for(
            lambda: kube.kubectl("get", "secret", name, "-n", namespace, check=False).returncode == 0,
            60,
            what="the pool's Redis Secret",
        )
        assert secret_data(kube, namespace, name) == {"redis-password": password}
        secret = json.loads(kube.kubectl("get", "secret", name, "-n", namespace, "-o", "json").stdout)
        [owner] = secret["metadata"]["ownerReferences"]
        assert owner["kind"] == "ModelDeployment" and owner["name"] == "locked"
        dep = json.loads(kube.kubectl("get", "deploy", "locked-worker", "-n", namespace, "-o", "json").stdout)
        env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["ZIMAGE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "redis-password"}
        assert password not in json.dumps(dep)
        # Someone overwrites the copy: the operator puts the password back.
        patch = {"data": {"redis-password": base64.b64encode(b"tampered").decode()}}
        kube.kubectl("patch", "secret", name, "-n", namespace, "--type=merge", "-p", json.dumps(patch))
        wait_for(lambda: secret_data(kube, namespace, name)["redis-password"] == password, 30, what="the copy restored")
        assert password not in processes.logs()
