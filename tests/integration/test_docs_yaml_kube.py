"""The YAML the feature docs show is what the API server accepts: every ``yaml`` block of them, applied with a
server-side dry run against the CRDs (schema, CEL and field validation), so a doc cannot drift from the CRDs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import Kube

pytestmark = pytest.mark.kube
DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("doc", ["variants.md", "adapters.md"])
def test_doc_yaml_passes_a_server_side_dry_run(crds: Kube, doc: str) -> None:
    blocks = re.findall(r"^```yaml\n(.*?)^```", (DOCS / doc).read_text(), flags=re.S | re.M)
    objects = [d for block in blocks for d in yaml.safe_load_all(block) if d]
    assert objects, f"no yaml in docs/{doc}"
    for obj in objects:
        proc = crds.kubectl(
            "apply", "--dry-run=server", "--validate=strict", "-n", "default", "-f", "-",
            input=json.dumps(obj), check=False,
        )  # fmt: skip
        assert proc.returncode == 0, f"docs/{doc}: {obj['kind']} {obj['metadata']['name']}: {proc.stderr}"
