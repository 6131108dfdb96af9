"""`helm install` on the test bed, then the operator and the API running with the chart's ServiceAccounts.

Each runs with a kubeconfig holding its ServiceAccount's own token (not the admin's), so the chart's RBAC is
what they get: a full job through the operator and the API's store calls must work, and beyond that nothing.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config

from conftest import REPO, Kube, Processes, start_operator, start_worker, wait_for
from zimage_api.kube_store import KubeJobStore
from zimage_operator import workload
from zimage_queue import keys
from zimage_queue.server import RedisServer

pytestmark = pytest.mark.kube
NS = f"zimage-chart-{os.getpid()}"
REL = "rel"
OPERATOR_SA = f"{REL}-zimage-operator-operator"
API_SA = f"{REL}-zimage-operator-api"


def sa_token(kube: Kube, sa: str) -> str:
    """A token for the ServiceAccount: through TokenRequest (every cluster since 1.24 has no token Secrets),
    else the token Secret that Kubernetes < 1.24 makes by itself (where TokenRequest is not configured)."""
    requested = kube.kubectl("create", "token", sa, "-n", NS, "--duration=1h", check=False)
    if requested.returncode == 0 and requested.stdout.strip():
        return requested.stdout.strip()
    secret = wait_for(
        lambda: next(
            (
                s
                for s in json.loads(kube.kubectl("get", "secrets", "-n", NS, "-o", "json").stdout)["items"]
                if s["type"] == "kubernetes.io/service-account-token"
                and (s["metadata"].get("annotations") or {}).get("kubernetes.io/service-account.name") == sa
                and (s.get("data") or {}).get("token")
            ),
            None,
        ),
        what=f"a token for {sa} (TokenRequest failed: {requested.stderr.strip()})",
    )
    return base64.b64decode(secret["data"]["token"]).decode()


def sa_kubeconfig(kube: Kube, sa: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount with its own token."""
    token = sa_token(kube, sa)
    admin = yaml.safe_load(Path(kube.env["KUBECONFIG"]).read_text())
    cluster = admin["clusters"][0]["cluster"]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": cluster}],
                "users": [{"name": sa, "user": {"token": token}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": sa, "namespace": NS}}],
                "current-context": "c",
            }
        )
    )
    return path


def can_i(kube: Kube, sa: str, verb: str, resource: str, *extra: str) -> bool:
    out = kube.kubectl(
        "auth", "can-i", verb, resource, "-n", NS, f"--as=system:serviceaccount:{NS}:{sa}", *extra, check=False
    )
    return out.stdout.strip() == "yes"


# What each component's tests need (left), and a sample of what they must not be able to do (right).
OPERATOR_NEEDS = [
    ("watch", "imagejobs.zimage.dev"), ("delete", "imagejobs.zimage.dev"), ("watch", "modeldeployments.zimage.dev"),
    ("create", "imagejobs.zimage.dev"),  # a workflow's step jobs
    ("watch", "imageworkflows.zimage.dev"), ("patch", "imageworkflows.zimage.dev", "--subresource=status"),
    ("patch", "imagejobs.zimage.dev", "--subresource=status"),
    ("patch", "modeldeployments.zimage.dev", "--subresource=status"),
    ("create", "deployments.apps"), ("patch", "deployments.apps"), ("create", "services"),
    ("create", "poddisruptionbudgets.policy"), ("create", "persistentvolumeclaims"), ("create", "jobs.batch"),
    ("list", "pods"), ("patch", "pods"), ("create", "events"),
    ("watch", "customresourcedefinitions.apiextensions.k8s.io"), ("watch", "namespaces"),  # kopf's observation
]  # fmt: skip
OPERATOR_DENIED = [
    ("patch", "imagejobs.zimage.dev"), ("patch", "modeldeployments.zimage.dev"), ("patch", "imageworkflows.zimage.dev"),
    ("get", "secrets"), ("list", "secrets"), ("create", "pods"), ("delete", "pods"), ("delete", "deployments.apps"),
    ("create", "roles.rbac.authorization.k8s.io"), ("list", "imagejobs.zimage.dev", "-n", "default"),
    ("create", "pods", "--subresource=exec"), ("create", "customresourcedefinitions.apiextensions.k8s.io"),
    ("delete", "namespaces"),
]  # fmt: skip
API_NEEDS = [
    ("create", "imagejobs.zimage.dev"), ("get", "imagejobs.zimage.dev"), ("list", "imagejobs.zimage.dev"),
    ("patch", "imagejobs.zimage.dev", "--subresource=status"),
    ("get", "modeldeployments.zimage.dev"), ("list", "modeldeployments.zimage.dev"),
    ("create", "imageworkflows.zimage.dev"), ("patch", "imageworkflows.zimage.dev"),
]  # fmt: skip
API_DENIED = [
    ("get", "secrets"), ("delete", "imagejobs.zimage.dev"), ("patch", "imagejobs.zimage.dev"),
    ("create", "modeldeployments.zimage.dev"), ("patch", "modeldeployments.zimage.dev", "--subresource=status"),
    ("create", "deployments.apps"), ("list", "pods"), ("list", "imagejobs.zimage.dev", "-n", "default"),
]  # fmt: skip


def test_helm_install_and_run_with_the_charts_permissions(crds: Kube, tmp_path: Path, processes: Processes) -> None:
    kube = crds
    helm = shutil.which("helm", path=kube.env.get("PATH"))
    if helm is None:
        pytest.skip("no helm binary on the test bed's PATH")
    kube.kubectl("create", "namespace", NS)
    ps = processes
    try:
        with RedisServer() as srv:
            install = subprocess.run(
                [helm, "install", REL, str(REPO / "charts" / "zimage-operator"), "-n", NS,
                 "--set", "redis.bundled=false", "--set", f"redis.externalUrl={srv.url}"],
                env=kube.env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert install.returncode == 0, install.stderr
            objects = set(
                kube.kubectl("get", "deploy,svc,sa,role,rolebinding,secret", "-n", NS, "-o", "name").stdout.split()
            )
            assert {
                f"deployment.apps/{REL}-zimage-operator-operator",
                f"deployment.apps/{REL}-zimage-operator-api",
                f"service/{REL}-zimage-operator-api",
                f"serviceaccount/{OPERATOR_SA}",
                f"serviceaccount/{API_SA}",
                f"role.rbac.authorization.k8s.io/{OPERATOR_SA}",
                f"rolebinding.rbac.authorization.k8s.io/{API_SA}",
                f"secret/{REL}-zimage-operator-url-signing",
            } <= objects

            for sa, needs, denied in ((OPERATOR_SA, OPERATOR_NEEDS, OPERATOR_DENIED), (API_SA, API_NEEDS, API_DENIED)):
                missing = [n for n in needs if not can_i(kube, sa, *n)]
                extra = [d for d in denied if can_i(kube, sa, *d)]
                assert (missing, extra) == ([], []), sa

            # The operator as its ServiceAccount: a pool's objects and a job all the way through.
            operator_kc = sa_kubeconfig(kube, OPERATOR_SA, tmp_path / "operator.kubeconfig")
            start_operator(ps, kube, srv.url, NS, KUBECONFIG=str(operator_kc))
            kube.kubectl("apply", "-n", NS, "-f", str(REPO / "docs" / "examples" / "modeldeployment.yaml"))
            start_worker(ps, srv.url, keys.queue_name(NS, "z-image-turbo"), tmp_path / "images")
            job = {"apiVersion": "zimage.dev/v1alpha1", "kind": "ImageJob", "metadata": {"name": "fox"},
                   "spec": {"model": "z-image-turbo", "prompt": "a fox", "width": 64, "height": 64, "steps": 2,
                            "ttlSecondsAfterFinished": 1}}  # fmt: skip
            kube.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(job))
            kube.kubectl("wait", "-n", NS, "--for=condition=Succeeded", "ij/fox", "--timeout=120s", timeout=130)
            for kind, name in (
                ("deployment", workload.worker_name("z-image-turbo")),
                ("service", workload.metrics_service_name("z-image-turbo")),
                ("poddisruptionbudget", workload.worker_name("z-image-turbo")),
            ):
                kube.kubectl("get", kind, name, "-n", NS)
            wait_for(  # ttlSecondsAfterFinished: deleted by the operator, with its delete permission
                lambda: kube.kubectl("get", "ij", "fox", "-n", NS, check=False).returncode != 0, what="fox deleted"
            )
            md = json.loads(kube.kubectl("get", "md", "z-image-turbo", "-n", NS, "-o", "json").stdout)
            assert md["status"]["conditions"]
            # GitOps: nothing but status was written on the user's object (no drift for Argo CD or Flux to see).
            assert md["metadata"]["generation"] == 1 and not md["metadata"].get("finalizers")
            assert not [a for a in md["metadata"].get("annotations") or {} if "kopf" in a or "zimage" in a]

            # The API's store calls as the API's ServiceAccount.
            api_client = config.new_client_from_config(str(sa_kubeconfig(kube, API_SA, tmp_path / "api.kubeconfig")))
            store = KubeJobStore(NS, api_client)
            store.ready()
            created = store.create_job("api-job", {"model": "z-image-turbo", "prompt": "x"}, {"a": "b"}, {})
            assert store.get_job("api-job") and store.patch_job_status("api-job", {"message": "admitted"})
            assert [j["metadata"]["name"] for j in store.list_jobs({"a": "b"}, 10, None)[0]] == ["api-job"]
            assert [m["metadata"]["name"] for m in store.list_models()] == ["z-image-turbo"]
            with pytest.raises(client.ApiException) as denied:
                client.CoreV1Api(api_client).list_namespaced_secret(NS)
            assert denied.value.status == 403 and created["metadata"]["uid"]

            logs = ps.logs()
            assert "Forbidden" not in logs and " 403" not in logs, logs
    finally:
        ps.stop_all()  # before the namespace and Redis go; the fixture shows the logs if the test failed
        kube.kubectl("delete", "namespace", NS, "--wait=false", check=False)
