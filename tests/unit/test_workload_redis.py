"""Worker pods' Redis credentials: only ever a ``secretKeyRef``, never a value in the pod spec.

Pools in the operator's namespace refer to the chart's Secrets; a pool elsewhere gets a copy in a Secret of its own
namespace, owned by its ModelDeployment (a pod cannot refer to another namespace's Secret).
"""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest
from kubernetes import client as k8s

from tests.unit.test_workload import _unknown_fields, env_of, md, render, worker
from zimage_operator.pools import worker_redis_auth
from zimage_operator.workload import RedisAuth, drifted, redis_secret_name
from zimage_queue.clients import Credentials

PASSWORD = "pw-" + "x" * 29
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
CHART = RedisAuth(
    password=PASSWORD,
    ca_cert=PEM,
    secret="rel-zimage-operator-redis-auth",
    secret_key="redis-password",
    ca_secret="rel-zimage-operator-redis-tls",
    ca_secret_key="ca.crt",
)


def refs(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {k: v for k, v in env_of(worker(objs)).items() if k.startswith("ZIMAGE_REDIS_") and k != "ZIMAGE_REDIS_URL"}


def test_no_credentials_no_variables_and_no_secret() -> None:
    objs = render(redis_auth=None)
    assert refs(objs) == {} and "secret" not in objs
    assert refs(render(redis_auth=RedisAuth())) == {}


def test_a_pool_in_the_operators_namespace_refers_to_the_charts_secrets() -> None:
    objs = render(operator_namespace="team-a", redis_auth=CHART)
    assert refs(objs) == {
        "ZIMAGE_REDIS_PASSWORD": {"secretKeyRef": {"name": "rel-zimage-operator-redis-auth", "key": "redis-password"}},
        "ZIMAGE_REDIS_CA_CERT": {"secretKeyRef": {"name": "rel-zimage-operator-redis-tls", "key": "ca.crt"}},
    }
    assert "secret" not in objs  # nothing to copy, so no Secret RBAC needed in the operator's namespace
    assert PASSWORD not in json.dumps(objs)
    assert refs(render(operator_namespace=None, redis_auth=CHART)) == refs(objs)  # unknown: its own namespace


def test_a_pool_elsewhere_gets_a_copy_it_owns() -> None:
    objs = render(operator_namespace="zimage-system", redis_auth=CHART)
    name = redis_secret_name("turbo")
    assert next(iter(objs)) == "secret"  # created before the Deployment whose pods need it
    secret = objs["secret"]
    assert secret["metadata"]["namespace"] == "team-a" and secret["metadata"]["name"] == name
    [owner] = secret["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("ModelDeployment", "turbo", True)
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "redis-password": PASSWORD,
        "ca.crt": PEM,
    }
    assert refs(objs) == {
        "ZIMAGE_REDIS_PASSWORD": {"secretKeyRef": {"name": name, "key": "redis-password"}},
        "ZIMAGE_REDIS_CA_CERT": {"secretKeyRef": {"name": name, "key": "ca.crt"}},
    }
    # The password is in the Secret only: not in the Deployment, its hash annotation or any other child.
    rest = {k: v for k, v in objs.items() if k != "secret"}
    assert PASSWORD not in json.dumps(rest) and base64.b64encode(PASSWORD.encode()).decode() not in json.dumps(rest)
    api = k8s.ApiClient()
    assert _unknown_fields(secret, "V1Secret", "secret") == []
    api._ApiClient__deserialize(copy.deepcopy(secret), "V1Secret")


@pytest.mark.parametrize(
    ("auth", "operator_ns", "copied", "env"),
    [
        # An operator outside the chart (no Secret named): the workers get a copy, in any namespace.
        (RedisAuth(password=PASSWORD), "team-a", {"redis-password"}, {"ZIMAGE_REDIS_PASSWORD"}),
        # Only the password named: the CA is copied.
        (
            RedisAuth(password=PASSWORD, ca_cert=PEM, secret="s"),
            "team-a",
            {"ca.crt"},
            {"ZIMAGE_REDIS_PASSWORD", "ZIMAGE_REDIS_CA_CERT"},
        ),
        # TLS without a password (an external Redis with a private CA).
        (RedisAuth(ca_cert=PEM), "ops", {"ca.crt"}, {"ZIMAGE_REDIS_CA_CERT"}),
        # An ACL user is a value, not a secret.
        (RedisAuth(username="zimage", secret="s"), "team-a", None, {"ZIMAGE_REDIS_USERNAME", "ZIMAGE_REDIS_PASSWORD"}),
    ],
)
def test_what_is_copied_and_what_is_referred_to(
    auth: RedisAuth, operator_ns: str, copied: set[str] | None, env: set[str]
) -> None:
    objs = render(operator_namespace=operator_ns, redis_auth=auth)
    assert (set(objs["secret"]["data"]) if "secret" in objs else None) == copied
    got = refs(objs)
    assert set(got) == env
    for name, value in got.items():
        if name == "ZIMAGE_REDIS_USERNAME":
            assert value == "zimage"
        else:
            assert set(value) == {"secretKeyRef"}, name  # never a plain value
    assert PASSWORD not in json.dumps(objs["deployment"])


def test_spec_env_may_bring_its_own_password() -> None:
    """spec.env may name its own ZIMAGE_REDIS_PASSWORD (a Secret of the namespace): it replaces ours."""
    own = {"name": "ZIMAGE_REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "mine", "key": "pw"}}}
    objs = render(md(env=[own]), operator_namespace="zimage-system", redis_auth=CHART)
    passwords = [e for e in worker(objs)["env"] if e["name"] == "ZIMAGE_REDIS_PASSWORD"]
    assert passwords == [own]


def test_a_changed_password_is_drift_of_the_copy() -> None:
    desired = render(operator_namespace="zimage-system", redis_auth=CHART)["secret"]
    served = copy.deepcopy(desired)
    served["metadata"].update(uid="u", resourceVersion="1", creationTimestamp="2026-01-01T00:00:00Z")
    assert not drifted(desired, served)
    served["data"]["redis-password"] = base64.b64encode(b"old").decode()
    assert drifted(desired, served)
    # The pods refer to the Secret by name: a new password does not change the pod template.
    rotated = render(operator_namespace="zimage-system", redis_auth=RedisAuth(password="new", ca_cert=PEM))
    assert (
        rotated["deployment"]["spec"]["template"]
        == render(operator_namespace="zimage-system", redis_auth=CHART)["deployment"]["spec"]["template"]
    )


def test_the_operators_settings_become_the_workers_auth(tmp_path: Any) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text(PEM)
    auth = worker_redis_auth(Credentials(password=PASSWORD, ca_file=str(ca)), "sec", "k", "", "ca.crt")
    assert auth == RedisAuth(password=PASSWORD, ca_cert=PEM, secret="sec", secret_key="k", ca_secret=None)
    assert PASSWORD not in repr(auth)


def test_the_preload_job_gets_no_redis_credentials() -> None:
    objs = render(md(cache={"size": "10Gi", "preload": True}), operator_namespace="zimage-system", redis_auth=CHART)
    container = objs["job"]["spec"]["template"]["spec"]["containers"][0]
    assert not [e for e in container["env"] if e["name"].startswith("ZIMAGE_REDIS")]
