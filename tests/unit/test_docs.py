"""Generated documentation stays generated: the committed files equal what the generators write now."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from zimage_api import openapi
from zimage_operator import crddoc, crdgen

REPO = Path(__file__).resolve().parents[2]


def test_reference_is_generated_from_the_crds() -> None:
    committed = (REPO / "docs" / "reference.md").read_text()
    assert committed == crddoc.render(), f"docs/reference.md is stale: run {crddoc.COMMAND}"


def test_reference_covers_every_field_and_links_resolve() -> None:
    reference = crddoc.render()

    def fields(prefix: str, node: dict[str, Any]) -> list[str]:
        out = []
        for name, child in node.get("properties", {}).items():
            out.append(f"{prefix}.{name}")
            items = child.get("items") or {}
            out += fields(f"{prefix}.{name}", child) + fields(f"{prefix}.{name}[]", items)
        return out

    for doc in crdgen.crds().values():
        root = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
        for top in ("spec", "status"):
            for field in fields(top, root[top]):
                assert f"| `{field}` |" in reference, field
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', reference))
    links = set(re.findall(r"\]\(#([^)]+)\)", reference))
    assert links and links <= anchors, links - anchors


def test_openapi_json_is_generated_from_the_app() -> None:
    committed = (REPO / "docs" / "openapi.json").read_text()
    assert committed == openapi.render(), f"docs/openapi.json is stale: run {openapi.COMMAND}"
    assert "/v1/jobs" in json.loads(committed)["paths"]
