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
