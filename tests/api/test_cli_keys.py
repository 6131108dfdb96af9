"""`zimage keys create`'s command on a real API server: it adds the key's entry whether the Secret is there or
not, and keeps the entries already in it."""

from __future__ import annotations

import base64
import json
import subprocess

import pytest

from conftest import BIN, Kube
from zimage_api.apikeys import KeyRing, parse_entry

pytestmark = [pytest.mark.kube, pytest.mark.timeout(120)]


def create_key(kid: str, tenant: str, namespace: str) -> tuple[str, str]:
    """The key, and the command printed to add it to the Secret."""
    out = subprocess.run(
        [str(BIN / "zimage"), "keys", "create", "--tenant", tenant, "--id", kid, "-n", namespace],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return out.stdout.strip(), out.stderr[out.stderr.index("kubectl apply") :]


def entries(kube: Kube, namespace: str) -> dict[str, str]:
    data = json.loads(kube.kubectl("get", "secret", "zimage-api-keys", "-n", namespace, "-o", "json").stdout)["data"]
    return {k: base64.b64decode(v).decode() for k, v in data.items()}


def test_the_printed_command_adds_an_entry_whether_or_not_the_secret_exists(kube: Kube, namespace: str) -> None:
    assert kube.kubectl("get", "secret", "zimage-api-keys", "-n", namespace, check=False).returncode != 0
    key1, add1 = create_key("k1", "team-a", namespace)
    key2, add2 = create_key("k2", "team-b", namespace)
    for command in (add1, add2, add1):  # absent, present, and a repeat
        done = subprocess.run(["sh", "-c", command], env=kube.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    # An entry someone else added meanwhile (the way the docs used to say) stays too.
    kube.kubectl("patch", "secret", "zimage-api-keys", "-n", namespace, "-p", '{"stringData": {"other": "{}"}}')
    key3, add3 = create_key("k3", "team-c", namespace)
    assert subprocess.run(["sh", "-c", add3], env=kube.env, capture_output=True, timeout=60).returncode == 0

    found = entries(kube, namespace)
    assert sorted(found) == ["k1", "k2", "k3", "other"]
    ring = KeyRing({kid: parse_entry(kid, found[kid]) for kid in ("k1", "k2", "k3")})
    for key, tenant in ((key1, "team-a"), (key2, "team-b"), (key3, "team-c")):
        who = ring.authenticate(key)
        assert who is not None and who.tenant == tenant
