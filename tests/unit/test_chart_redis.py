"""The chart points every process at an external Redis Cluster or Sentinel setup by values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_chart import CHART, helm, run
from zimage_queue.clients import parse

__all__ = ["helm"]  # the fixture, shared with test_chart


def redis_urls(helm: list[str], tmp_path: Path, values: dict[str, Any]) -> set[str]:
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values))
    out = run([*helm, "template", "rel", str(CHART), "-n", "zimage", "-f", str(f)]).stdout
    urls = set()
    for doc in (d for d in yaml.safe_load_all(out) if d):
        for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            urls |= {e["value"] for e in c.get("env", []) if e["name"] == "ZIMAGE_REDIS_URL"}
    return urls


@pytest.mark.parametrize(
    ("redis", "kind"),
    [
        ({"bundled": False, "cluster": {"nodes": ["r-0.r:6379", "r-1.r:6379"], "waitReplicas": 1}}, "cluster"),
        ({"bundled": False, "sentinel": {"nodes": ["s-0.s:26379"], "master": "mymaster"}}, "sentinel"),
        ({"bundled": False, "externalUrl": "redis+cluster://r:6379/"}, "cluster"),
        ({"bundled": False, "externalUrl": "redis://r:6379/0"}, "single"),
    ],
)
def test_external_redis_by_values(helm: list[str], tmp_path: Path, redis: dict[str, Any], kind: str) -> None:
    [url] = redis_urls(helm, tmp_path, {"redis": redis})  # the operator and the API get the same one
    t = parse(url)
    assert t.kind == kind
    if kind == "cluster" and "cluster" in redis:
        assert t.nodes == (("r-0.r", 6379), ("r-1.r", 6379)) and t.wait_replicas == 1
    if kind == "sentinel":
        assert (t.nodes, t.service) == ((("s-0.s", 26379),), "mymaster")


def test_a_sentinel_without_its_master_name_is_refused(helm: list[str], tmp_path: Path) -> None:
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump({"redis": {"bundled": False, "sentinel": {"nodes": ["s:26379"]}}}))
    out = run([*helm, "template", "rel", str(CHART), "-f", str(f)], check=False)
    assert out.returncode != 0 and "/redis" in out.stderr


# -- a locked Redis: password, TLS, NetworkPolicies ---------------------------------------------------------
REL = "rel-zimage-operator"
TLS_VALUES = CHART / "ci" / "redis-tls-values.yaml"


def docs_for(helm: list[str], tmp_path: Path, values: dict[str, Any], *files: Path) -> list[dict[str, Any]]:
    f = tmp_path / "locked.yaml"
    f.write_text(yaml.safe_dump(values))
    args = [a for v in (*files, f) for a in ("-f", str(v))]
    out = run([*helm, "template", "rel", str(CHART), "-n", "zimage", *args]).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }


def kubelet_env(container: dict[str, Any], secrets: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The container's environment as the kubelet resolves it, with the rendered Secrets."""
    import base64

    out = {}
    for e in container.get("env", []):
        if "value" in e:
            out[e["name"]] = e["value"]
        elif ref := e.get("valueFrom", {}).get("secretKeyRef"):
            out[e["name"]] = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
    return out


def test_the_bundled_redis_requires_the_generated_password(
    helm: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import base64

    from zimage_api.settings import ApiSettings
    from zimage_operator.settings import OperatorSettings

    docs = docs_for(helm, tmp_path, {})
    secrets = by_kind(docs, "Secret")
    auth = secrets[f"{REL}-redis-auth"]
    password = base64.b64decode(auth["data"]["redis-password"]).decode()
    assert len(password) == 32 and password.isalnum()
    # The password is in its Secret and nowhere else: every pod refers to it.
    others = [d for d in docs if d is not auth]
    assert password not in yaml.safe_dump_all(others) and auth["data"]["redis-password"] not in str(others)
    pods = containers(docs)
    redis_c = pods[f"{REL}-redis"]
    assert redis_c["args"][-2:] == ["--requirepass", "$(REDISCLI_AUTH)"]
    ref = {"secretKeyRef": {"name": f"{REL}-redis-auth", "key": "redis-password"}}
    assert {e["name"]: e.get("valueFrom") for e in redis_c["env"]} == {"REDISCLI_AUTH": ref}
    assert "PONG" in " ".join(redis_c["readinessProbe"]["exec"]["command"])
    for name in (f"{REL}-operator", f"{REL}-api"):
        env = {e["name"]: e for e in pods[name]["env"]}
        assert env["ZIMAGE_REDIS_PASSWORD"] == {"name": "ZIMAGE_REDIS_PASSWORD", "valueFrom": ref}, name
        assert "@" not in env["ZIMAGE_REDIS_URL"]["value"]
    # What each process reads: the operator and the API connect with it; the operator hands workers the Secret.
    for name, settings in ((f"{REL}-operator", OperatorSettings), (f"{REL}-api", ApiSettings)):
        with monkeypatch.context() as m:
            for k, v in kubelet_env(pods[name], secrets).items():
                m.setenv(k, v)
            cfg = settings()
            assert cfg.redis_credentials.password == password, name
            if isinstance(cfg, OperatorSettings):
                assert (cfg.worker_redis_secret, cfg.worker_redis_secret_key) == (f"{REL}-redis-auth", "redis-password")


@pytest.mark.parametrize(
    ("redis", "secret", "key"),
    [
        ({"auth": {"existingSecret": "mine", "existingSecretKey": "pw"}}, "mine", "pw"),
        ({"bundled": False, "externalUrl": "redis://r:6379/0", "auth": {"existingSecret": "ext"}}, "ext", None),
        ({"bundled": False, "externalUrl": "redis://r:6379/0"}, None, None),  # an external Redis: no password
        ({"auth": {"enabled": False}}, None, None),
    ],
)
def test_where_the_password_comes_from(
    helm: list[str], tmp_path: Path, redis: dict[str, Any], secret: str | None, key: str | None
) -> None:
    docs = docs_for(helm, tmp_path, {"redis": redis})
    assert f"{REL}-redis-auth" not in by_kind(docs, "Secret")
    pods = containers(docs)
    for name in (f"{REL}-operator", f"{REL}-api"):
        env = {e["name"]: e for e in pods[name]["env"]}
        if secret is None:
            assert "ZIMAGE_REDIS_PASSWORD" not in env
        else:
            assert env["ZIMAGE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
                "name": secret,
                "key": key or "redis-password",
            }
    if f"{REL}-redis" in pods:
        assert ("--requirepass" in pods[f"{REL}-redis"]["args"]) == (secret is not None)


def test_the_bundled_redis_over_tls(helm: list[str], tmp_path: Path) -> None:
    import base64

    from cryptography import x509

    docs = docs_for(helm, tmp_path, {}, TLS_VALUES)
    tls = by_kind(docs, "Secret")[f"{REL}-redis-tls"]
    assert tls["type"] == "kubernetes.io/tls" and set(tls["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    cert = x509.load_pem_x509_certificate(base64.b64decode(tls["data"]["tls.crt"]))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    urls = redis_urls(helm, tmp_path, yaml.safe_load(TLS_VALUES.read_text()))
    [url] = urls
    host = parse(url).url.split("//")[1].split(":")[0]
    assert url.startswith("rediss://") and host in names  # what the clients check the certificate against
    pods = containers(docs)
    args = pods[f"{REL}-redis"]["args"]
    assert args[args.index("--port") + 1] == "0" and args[args.index("--tls-port") + 1] == "6379"
    for name in (f"{REL}-operator", f"{REL}-api"):
        env = {e["name"]: e for e in pods[name]["env"]}
        assert env["ZIMAGE_REDIS_CA_CERT"]["valueFrom"]["secretKeyRef"] == {"name": f"{REL}-redis-tls", "key": "ca.crt"}
    # The chart's own certificate works with the existingSecret form too (cert-manager's Secret layout).
    docs = docs_for(helm, tmp_path, {"redis": {"tls": {"enabled": True, "existingSecret": "cm-redis"}}})
    assert f"{REL}-redis-tls" not in by_kind(docs, "Secret")
    [sts] = by_kind(docs, "StatefulSet").values()
    assert sts["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"] == "cm-redis"


@pytest.mark.parametrize(
    ("redis", "scheme"),
    [
        ({"bundled": False, "externalUrl": "rediss://r:6380/0", "tls": {"enabled": True}}, "rediss"),
        (
            {"bundled": False, "cluster": {"nodes": ["r-0.r:6379"]}, "tls": {"enabled": True, "caSecret": "ca"}},
            "rediss+cluster",
        ),
        (
            {"bundled": False, "sentinel": {"nodes": ["s-0.s:26379"], "master": "m"}, "tls": {"enabled": True}},
            "rediss+sentinel",
        ),
    ],
)
def test_external_redis_over_tls(helm: list[str], tmp_path: Path, redis: dict[str, Any], scheme: str) -> None:
    [url] = redis_urls(helm, tmp_path, {"redis": redis})
    assert url.startswith(f"{scheme}://") and parse(url).ssl
    docs = docs_for(helm, tmp_path, {"redis": redis})
    env = {e["name"]: e for e in containers(docs)[f"{REL}-api"]["env"]}
    ca = redis["tls"].get("caSecret")
    assert ("ZIMAGE_REDIS_CA_CERT" in env) == bool(ca)  # else the system's trust store
    assert not by_kind(docs, "StatefulSet")


def test_tls_with_a_plain_external_url_is_refused(helm: list[str], tmp_path: Path) -> None:
    f = tmp_path / "values.yaml"
    f.write_text(
        yaml.safe_dump({"redis": {"bundled": False, "externalUrl": "redis://r:6379/0", "tls": {"enabled": True}}})
    )
    out = run([*helm, "template", "rel", str(CHART), "-f", str(f)], check=False)
    assert out.returncode != 0 and "rediss://" in out.stderr


def _secret_rules(docs: list[dict[str, Any]]) -> dict[tuple[str, str | None], list[str]]:
    return {
        (d["kind"], d["metadata"].get("namespace")): r["verbs"]
        for d in docs
        if d["kind"] in ("Role", "ClusterRole") and d["metadata"]["name"] == f"{REL}-operator"
        for r in d["rules"]
        if "secrets" in r["resources"]
    }


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, {}),  # every pool in the release namespace: the chart's Secret, no copies
        ({"rbac": {"clusterWide": True}}, {("ClusterRole", None): ["get", "create", "patch"]}),
        ({"rbac": {"clusterWide": True}, "redis": {"auth": {"enabled": False}}}, {}),  # nothing to copy
        (
            {"operator": {"shards": [{"name": "a", "namespaces": ["zimage", "team-a"]}]}},
            {("Role", "team-a"): ["get", "create", "patch"]},  # not in the release namespace
        ),
    ],
)
def test_the_operator_may_write_secrets_only_where_it_copies_credentials(
    helm: list[str], tmp_path: Path, values: dict[str, Any], expected: dict[Any, list[str]]
) -> None:
    assert _secret_rules(docs_for(helm, tmp_path, values)) == expected


def _policies(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n.removeprefix(f"{REL}-"): d["spec"] for n, d in by_kind(docs, "NetworkPolicy").items()}


def test_network_policies_by_default(helm: list[str], tmp_path: Path) -> None:
    from zimage_operator import workload

    docs = docs_for(helm, tmp_path, {})
    np = _policies(docs)
    assert set(np) == {"redis", "api", "operator", "workers"}
    assert all(p["policyTypes"] == ["Ingress"] for p in np.values())  # egress is not limited
    # Redis: its port, from the operator and the API of this release and the worker pods of the namespace.
    [rule] = np["redis"]["ingress"]
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    release, workers = rule["from"]
    exprs = {e["key"]: e["values"] for e in release["podSelector"]["matchExpressions"]}
    assert exprs["app.kubernetes.io/component"] == ["operator", "api"] and exprs["app.kubernetes.io/instance"] == [
        "rel"
    ]
    worker_labels = workload.labels("turbo", "worker")
    assert workers["podSelector"]["matchLabels"].items() <= worker_labels.items()  # what the operator puts on them
    assert "namespaceSelector" not in workers
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if "template" in d.get("spec", {})
    }
    for component in ("operator", "api"):
        labels = pods[f"{REL}-{component}"]
        assert all(labels.get(k) in v for k, v in exprs.items()), component
        assert np[component]["podSelector"]["matchLabels"].items() <= labels.items()
    assert np["redis"]["podSelector"]["matchLabels"].items() <= pods[f"{REL}-redis"].items()
    # The API: its port, from anywhere. The operator and the workers: nothing (no ServiceMonitor).
    assert np["api"]["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]
    api_ports = {p["name"] for p in containers(docs)[f"{REL}-api"]["ports"]}
    assert "http" in api_ports
    assert np["operator"]["ingress"] == [] and np["workers"]["ingress"] == []
    assert not by_kind(docs_for(helm, tmp_path, {"networkPolicy": {"enabled": False}}), "NetworkPolicy")


def test_network_policies_for_prometheus_and_other_namespaces(helm: list[str], tmp_path: Path) -> None:
    monitoring = {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    values = {
        "rbac": {"clusterWide": True},
        "metrics": {"serviceMonitor": {"enabled": True}},
        "networkPolicy": {"metricsNamespaceSelector": monitoring},
    }
    np = _policies(docs_for(helm, tmp_path, values))
    for component in ("operator", "workers"):
        assert np[component]["ingress"] == [
            {"ports": [{"port": "metrics", "protocol": "TCP"}], "from": [{"namespaceSelector": monitoring}]}
        ]
    # Every namespace's workers (the operator serves them all), narrowed by workerNamespaceSelector.
    anywhere = np["redis"]["ingress"][0]["from"][2]
    assert anywhere["namespaceSelector"] == {} and anywhere["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "zimage-worker",
        "app.kubernetes.io/component": "worker",
    }
    shards = {"operator": {"shards": [{"name": "a", "namespaces": ["team-a", "zimage", "team-b"]}]}}
    np = _policies(docs_for(helm, tmp_path, shards))
    [expr] = np["redis"]["ingress"][0]["from"][2]["namespaceSelector"]["matchExpressions"]
    assert expr == {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}


@pytest.mark.parametrize(
    "values",
    [[TLS_VALUES], [CHART / "ci" / "all-options-values.yaml"], [CHART / "ci" / "shards-values.yaml", TLS_VALUES]],
    ids=["tls", "all-options", "shards+tls"],
)
def test_locked_manifests_lint_and_validate(helm: list[str], tmp_path: Path, values: list[Path]) -> None:
    from conftest import BIN
    from tests.unit.test_chart import CUSTOM_GROUPS, render

    run([*helm, "lint", "--strict", str(CHART), *[a for v in values for a in ("-f", str(v))]])
    docs = render(helm, *values)
    assert by_kind(docs, "NetworkPolicy")
    manifests = tmp_path / "rendered.yaml"
    manifests.write_text(yaml.safe_dump_all([d for d in docs if not d["apiVersion"].startswith(CUSTOM_GROUPS)]))
    out = run([str(BIN / "kubernetes-validate"), "--strict", "-k", "1.30.0", str(manifests)], check=False)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    ("bad", "complaint"),
    [
        ({"redis": {"auth": {"existingSecretKey": ""}}}, "/redis/auth/existingSecretKey"),
        ({"redis": {"auth": {"password": "in-values"}}}, "password"),  # no place for a password in values
        ({"redis": {"tls": {"enabled": "yes"}}}, "/redis/tls/enabled"),
        ({"networkPolicy": {"enable": False}}, "enable"),
        ({"networkPolicy": {"workerNamespaceSelector": []}}, "/networkPolicy/workerNamespaceSelector"),
    ],
)
def test_bad_redis_and_network_values_are_rejected(
    helm: list[str], tmp_path: Path, bad: dict[str, Any], complaint: str
) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    out = run([*helm, "template", "rel", str(CHART), "-f", str(f)], check=False)
    assert out.returncode != 0 and "schema" in out.stderr and complaint in out.stderr, out.stderr
