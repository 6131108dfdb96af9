"""The operator and dev mode find the cluster in KUBECONFIG as it is when they connect, not when the kubernetes
client was imported (it reads its default path once, at import)."""

from __future__ import annotations

from pathlib import Path

import kubernetes.config  # noqa: F401  (imported before KUBECONFIG is set, as in a test session)
import pytest
import yaml

from zimage_operator.k8s import load_configuration


def test_kubeconfig_set_after_import_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:16443"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(path))
    assert load_configuration().host == "https://127.0.0.1:16443"
