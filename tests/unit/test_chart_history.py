"""The chart's history store (history.*: an external PostgreSQL or the bundled one) and tenants' GPU-second quotas
(quotas.tenants): what the operator and the API are told, the bundled server's objects, what values are refused,
and the dashboard's history panels."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import BIN
from tests.unit.test_chart import CHART, helm, run
from tests.unit.test_chart_redis import by_kind, containers, docs_for, kubelet_env

__all__ = ["helm"]  # the fixture, shared with test_chart

REL = "rel-zimage-operator"
OPERATOR, API, POSTGRES = f"{REL}-operator", f"{REL}-api", f"{REL}-postgresql"
EXTERNAL = "postgresql://zimage@pg.db.svc:5432/zimage?sslmode=require"
BUNDLED = {"history": {"enabled": True, "bundled": {"enabled": True}}}
QUOTAS = {
    "team-a": {"gpuSecondsPerDay": 3600, "gpuSecondsPerMonth": 60000},
    "team-b": {"gpuSecondsPerMonth": 1.5},
    "*": {"gpuSecondsPerDay": 600},  # every tenant not named
}


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def settings(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch, **extra: str) -> Any:
    """What the process reads: the container's values (and ``extra``, e.g. what a secretKeyRef gives)."""
    from zimage_api.settings import ApiSettings
    from zimage_operator.settings import OperatorSettings

    with monkeypatch.context() as m:
        for e in container["env"]:
            if "value" in e:
                m.setenv(e["name"], e["value"])
        for k, v in extra.items():
            m.setenv(k, v)
        return ApiSettings() if container["name"] == "api" else OperatorSettings()


def test_the_default_install_has_no_history_and_no_quotas(helm: list[str], tmp_path: Path) -> None:
    docs = docs_for(helm, tmp_path, {})
    for name, c in containers(docs).items():
        assert not [n for n in env_of(c) if "HISTORY" in n or "QUOTAS" in n], name
    assert not [d for d in docs if d["metadata"]["labels"].get("app.kubernetes.io/component") == "postgresql"]


@pytest.mark.parametrize(("secret", "key"), [("pg-credentials", "pw"), ("", None)])
def test_an_external_store_reaches_the_operator_and_the_api(
    helm: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secret: str, key: str | None
) -> None:
    history = {"enabled": True, "url": EXTERNAL, "existingSecret": secret, "retentionDays": 30, "usageRetentionDays": 0}
    if key:
        history["passwordKey"] = key
    docs = docs_for(helm, tmp_path, {"history": history})
    pods = containers(docs)
    assert POSTGRES not in pods and not by_kind(docs, "Secret").keys() & {f"{POSTGRES}-auth"}
    assert f"{REL}-postgresql" not in by_kind(docs, "NetworkPolicy")
    ref = {"secretKeyRef": {"name": secret, "key": key}}
    for name, prefix in ((OPERATOR, "ZIMAGE_"), (API, "ZIMAGE_API_")):
        env = env_of(pods[name])
        assert env[f"{prefix}HISTORY_URL"] == {"name": f"{prefix}HISTORY_URL", "value": EXTERNAL}, name
        if secret:  # the password only from the Secret, never a value
            assert env[f"{prefix}HISTORY_PASSWORD"] == {"name": f"{prefix}HISTORY_PASSWORD", "valueFrom": ref}, name
        else:
            assert f"{prefix}HISTORY_PASSWORD" not in env, name
    assert "ZIMAGE_API_HISTORY_RETENTION_DAYS" not in env_of(pods[API])  # the operator's leader deletes rows
    cfg = settings(pods[OPERATOR], monkeypatch, ZIMAGE_HISTORY_PASSWORD="s3cret")
    assert (cfg.history_url, cfg.history_password) == (EXTERNAL, "s3cret")
    assert (cfg.history_retention_days, cfg.history_usage_retention_days) == (30, None)  # 0: kept forever
    api = settings(pods[API], monkeypatch, ZIMAGE_API_HISTORY_PASSWORD="s3cret")
    assert (api.history_url, api.history_password) == (EXTERNAL, "s3cret")


def test_the_chart_defaults_are_the_operators(helm: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zimage_operator.settings import OperatorSettings

    values = yaml.safe_load((CHART / "values.yaml").read_text())["history"]
    defaults = OperatorSettings()
    assert values["retentionDays"] == defaults.history_retention_days
    assert values["usageRetentionDays"] == defaults.history_usage_retention_days
    docs = docs_for(helm, tmp_path, {"history": {"enabled": True, "url": EXTERNAL}})
    cfg = settings(containers(docs)[OPERATOR], monkeypatch)
    assert (cfg.history_retention_days, cfg.history_usage_retention_days) == (90, 400)


def test_the_bundled_postgresql(helm: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zimage_history.db import database_url

    docs = docs_for(helm, tmp_path, BUNDLED)
    secrets = by_kind(docs, "Secret")
    auth = secrets[f"{POSTGRES}-auth"]
    assert auth["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"  # initdb took it: outlive the release
    password = base64.b64decode(auth["data"]["password"]).decode()
    assert len(password) == 32 and password.isalnum()
    others = [d for d in docs if d is not auth]
    assert password not in yaml.safe_dump_all(others) and auth["data"]["password"] not in str(others)

    sts = by_kind(docs, "StatefulSet")[POSTGRES]
    pod = sts["spec"]["template"]["spec"]
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["serviceName"] == POSTGRES
    assert pod["automountServiceAccountToken"] is False and pod["securityContext"]["runAsNonRoot"]
    [c] = pod["containers"]
    assert c["image"] == "docker.io/library/postgres:17.5-alpine"
    assert c["securityContext"]["readOnlyRootFilesystem"] and c["resources"]["requests"]["memory"]
    assert "pg_isready" in c["readinessProbe"]["exec"]["command"]
    [claim] = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    server = kubelet_env(c, secrets)
    assert server["POSTGRES_PASSWORD"] == password
    assert server["PGDATA"].startswith(next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "data") + "/")

    svc = by_kind(docs, "Service")[POSTGRES]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    [port] = svc["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in c["ports"]}

    pods = containers(docs)
    for name, prefix in ((OPERATOR, "ZIMAGE_"), (API, "ZIMAGE_API_")):
        resolved = kubelet_env(pods[name], secrets)
        url = database_url(resolved[f"{prefix}HISTORY_URL"], resolved[f"{prefix}HISTORY_PASSWORD"])
        assert (url.host, url.port) == (f"{POSTGRES}.zimage.svc", port["port"]), name
        assert (url.username, url.password, url.database) == (
            server["POSTGRES_USER"],
            password,
            server["POSTGRES_DB"],
        ), name
    cfg = settings(pods[OPERATOR], monkeypatch)
    assert cfg.history_url.startswith(f"postgresql://zimage@{POSTGRES}.zimage.svc:5432/")

    # Only the operator and the API reach it.
    policy = by_kind(docs, "NetworkPolicy")[POSTGRES]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    [rule] = policy["ingress"]
    assert rule["ports"] == [{"port": "postgresql", "protocol": "TCP"}]
    [peer] = rule["from"]
    exprs = {e["key"]: e["values"] for e in peer["podSelector"]["matchExpressions"]}
    assert exprs["app.kubernetes.io/component"] == ["operator", "api"] and exprs["app.kubernetes.io/instance"] == [
        "rel"
    ]


def test_the_bundled_postgresql_with_its_users_secret(helm: list[str], tmp_path: Path) -> None:
    values = {"history": {**BUNDLED["history"], "existingSecret": "mine", "passwordKey": "pw"}}
    docs = docs_for(helm, tmp_path, values)
    assert f"{POSTGRES}-auth" not in by_kind(docs, "Secret")
    ref = {"secretKeyRef": {"name": "mine", "key": "pw"}}
    pods = containers(docs)
    assert env_of(pods[POSTGRES])["POSTGRES_PASSWORD"]["valueFrom"] == ref
    assert env_of(pods[OPERATOR])["ZIMAGE_HISTORY_PASSWORD"]["valueFrom"] == ref
    assert env_of(pods[API])["ZIMAGE_API_HISTORY_PASSWORD"]["valueFrom"] == ref


def test_the_bundled_postgresql_validates(helm: list[str], tmp_path: Path) -> None:
    """Lint, and Kubernetes' own schemas (all-options covers the user's-Secret form, test_chart.py)."""
    f = tmp_path / "bundled.yaml"
    f.write_text(yaml.safe_dump(BUNDLED))
    run([*helm, "lint", "--strict", str(CHART), "-f", str(f)])
    docs = docs_for(helm, tmp_path, BUNDLED)
    manifests = tmp_path / "rendered.yaml"
    manifests.write_text(yaml.safe_dump_all([d for d in docs if not d["apiVersion"].startswith("monitoring.")]))
    out = run([str(BIN / "kubernetes-validate"), "--strict", "-k", "1.30.0", str(manifests)], check=False)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("history", [{}, {"enabled": True, "url": EXTERNAL}], ids=["no-history", "history"])
def test_quotas_are_the_values_as_json(
    helm: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, history: dict[str, Any]
) -> None:
    """Quotas do not need the history store (usage is counted in Redis); every operator shard gets them."""
    shards = [{"name": "a", "namespaces": ["team-a"]}, {"name": "b", "namespaces": ["team-b"]}]
    docs = docs_for(helm, tmp_path, {"history": history, "quotas": {"tenants": QUOTAS}, "operator": {"shards": shards}})
    pods = containers(docs)
    for name, var in ((f"{OPERATOR}-a", "ZIMAGE_TENANT_QUOTAS"), (f"{OPERATOR}-b", "ZIMAGE_TENANT_QUOTAS")):
        assert json.loads(env_of(pods[name])[var]["value"]) == QUOTAS, name
    assert json.loads(env_of(pods[API])["ZIMAGE_API_TENANT_QUOTAS"]["value"]) == QUOTAS
    # ... and each process reads the same budgets from it.
    read = [settings(pods[n], monkeypatch).tenant_quotas for n in (f"{OPERATOR}-a", API)]
    assert read[0] == read[1] and read[0]["team-a"].gpu_seconds_per_month == 60000
    assert read[0]["*"].gpu_seconds_per_day == 600 and read[0]["team-b"].gpu_seconds_per_day is None


def test_all_options_values_render_their_history_and_quotas(helm: list[str], tmp_path: Path) -> None:
    values = yaml.safe_load((CHART / "ci" / "all-options-values.yaml").read_text())
    docs = docs_for(helm, tmp_path, {}, CHART / "ci" / "all-options-values.yaml")
    pods = containers(docs)
    assert pods[POSTGRES]["image"].endswith(":" + values["history"]["bundled"]["image"]["tag"])
    quotas = json.loads(env_of(pods[OPERATOR])["ZIMAGE_TENANT_QUOTAS"]["value"])
    assert quotas == values["quotas"]["tenants"]


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"history": {"enabled": True}}, "/history"),  # no URL and nothing bundled
        ({"history": {"enabled": True, "url": "postgresql://zimage:pw@db/zimage"}}, "/history/url"),
        ({"history": {"enabled": True, "url": "postgresql://zimage@db/zimage?password=pw"}}, "/history/url"),
        ({"history": {"enabled": True, "url": "mysql://zimage@db/zimage"}}, "/history/url"),
        ({"history": {"retentionDays": -1}}, "/history/retentionDays"),
        ({"history": {"bundled": {"enabled": True, "image": {"tag": "latest"}}}}, "/history/bundled/image/tag"),
        ({"history": {"password": "pw"}}, "password"),  # a plain password is not a value
        ({"quotas": {"tenants": {"team-a": {"gpuSecondsPerDay": -1}}}}, "/quotas/tenants/team-a/gpuSecondsPerDay"),
        ({"quotas": {"tenants": {"team-a": {"gpuSecondsPerWeek": 1}}}}, "gpuSecondsPerWeek"),
    ],
)
def test_bad_history_values_are_rejected_by_the_schema(
    helm: list[str], tmp_path: Path, values: dict[str, Any], complaint: str
) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(values))
    out = run([*helm, "template", "rel", str(CHART), "-f", str(f)], check=False)
    assert out.returncode != 0 and "schema" in out.stderr and complaint in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("history", "complaint"),
    [
        ({"bundled": {"enabled": True}}, "history.bundled.enabled needs history.enabled"),
        ({"enabled": True, "url": EXTERNAL, "bundled": {"enabled": True}}, "exclude each other"),
    ],
)
def test_history_values_that_cannot_work_are_refused(
    helm: list[str], tmp_path: Path, history: dict[str, Any], complaint: str
) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({"history": history}))
    out = run([*helm, "template", "rel", str(CHART), "-f", str(f)], check=False)
    assert out.returncode != 0 and complaint in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({}, "History: off"),
        ({"history": {"enabled": True, "url": EXTERNAL, "existingSecret": "pg"}}, f"{EXTERNAL}\n  Password: Secret pg"),
        (BUNDLED, f"the bundled PostgreSQL {POSTGRES}"),
        (
            {"quotas": {"tenants": QUOTAS}},
            'GPU-second budgets (quotas.tenants): team-a, team-b, and every other tenant ("*").',
        ),
    ],
)
def test_notes_say_where_history_goes(helm: list[str], tmp_path: Path, values: dict[str, Any], says: str) -> None:
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values))
    out = run([*helm, "install", "rel", str(CHART), "-n", "zimage", "--dry-run=client", "-f", str(f)]).stdout
    notes = out.split("NOTES:", 1)[1]
    assert says in notes, notes
    if values.get("history", {}).get("bundled"):
        assert "backups are yours" in notes


PANELS = {"GPU-seconds by tenant", "Cost by tenant and model", "History outbox / write lag"}


def test_the_dashboards_history_panels_query_metrics_the_code_defines() -> None:
    from prometheus_client.metrics import MetricWrapperBase

    from zimage_history import metrics

    defined = {
        f.name + ("_total" if f.type == "counter" else "")  # prometheus_client adds _total to a Counter's samples
        for m in vars(metrics).values()
        if isinstance(m, MetricWrapperBase)
        for f in m.describe()
    }
    dashboard = json.loads((CHART / "dashboards" / "zimage.json").read_text())
    panels = {p["title"]: p for p in dashboard["panels"]}
    assert panels.keys() >= PANELS
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for title in PANELS:
        exprs = " ".join(t["expr"] for t in panels[title]["targets"])
        used = set(re.findall(r"\bzimage_[a-z_]+", exprs))
        assert used and used <= defined, (title, used - defined)
    gpu = panels["GPU-seconds by tenant"]["targets"][0]["expr"]
    assert gpu == "sum by (tenant) (rate(zimage_gpu_seconds_total[5m]))"
    cost = panels["Cost by tenant and model"]["targets"][0]
    assert cost["expr"] == "sum by (tenant, model) (increase(zimage_cost_total[$__range]))" and cost["instant"]
    history = " ".join(t["expr"] for t in panels["History outbox / write lag"]["targets"])
    assert "zimage_history_outbox_rows" in history and "zimage_history_write_lag_seconds" in history
