"""What the chart and the docs tell people to type: NOTES.txt names no outside URL (its objects are inline, valid
for the CRDs' models), and the Helm commands in the docs use no flag Helm 4 deprecated."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from zimage_operator.types import ImageJobSpec, ModelDeploymentSpec

REPO = Path(__file__).resolve().parents[2]
NOTES = REPO / "charts" / "zimage-operator" / "templates" / "NOTES.txt"
# Helm 3 spellings Helm 4 deprecated or renamed: --wait is a strategy now (default hookOnly: no wait), --atomic
# is --rollback-on-failure, --force is --force-replace.
HELM3_FLAGS = re.compile(r"--wait=(false|true)\b|--atomic\b|--force(?![-\w])")


def test_notes_name_no_url_and_their_objects_are_valid() -> None:
    text = NOTES.read_text()
    assert not re.search(r"https?://", text), "NOTES.txt points outside the chart"
    objects = [yaml.safe_load(m) for m in re.findall(r"echo '([^']+)' \| kubectl apply", text)]
    assert [o["kind"] for o in objects] == ["ModelDeployment", "ImageJob"]
    pool, job = objects
    ModelDeploymentSpec.model_validate(pool["spec"])
    assert ImageJobSpec.model_validate(job["spec"]).model == pool["metadata"]["name"]
    assert f"ij/{job['metadata']['name']}" in text  # the job the next line waits for


def test_docs_helm_commands_use_helm_4_flags() -> None:
    for doc in [REPO / "README.md", NOTES, *sorted((REPO / "docs").rglob("*.md"))]:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            if re.search(r"\bhelm (install|upgrade|uninstall|rollback)\b", line):
                assert not HELM3_FLAGS.search(line), f"{doc.relative_to(REPO)}:{n}: {line.strip()}"
