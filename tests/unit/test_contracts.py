"""One source of truth: the CRD YAML, the operator's models and the queue message agree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from zimage_operator import crdgen
from zimage_operator.types import ImageJobSpec
from zimage_queue import GenerationParams, JobMessage

REPO = Path(__file__).resolve().parents[2]


def test_committed_crds_are_generated_from_the_models() -> None:
    for name, doc in crdgen.crds().items():
        committed = (REPO / "crds" / name).read_text()
        assert committed == crdgen.render(doc), f"crds/{name} is stale: run python -m zimage_operator.crdgen crds"


def test_crd_spec_limits_are_the_message_limits() -> None:
    crd = yaml.safe_load((REPO / "crds" / "imagejob.yaml").read_text())
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    fields = GenerationParams.model_fields
    assert props["width"]["minimum"] == 64 and props["width"]["maximum"] == 2048
    assert props["width"]["multipleOf"] == 16
    assert props["prompt"]["minLength"] == 1 and props["prompt"]["maxLength"] == 4000
    assert props["task"]["enum"] == ["text-to-image", "image-to-image", "inpaint"]
    assert props["priority"]["enum"] == ["high", "normal", "low"]
    # every generation parameter the worker reads is a spec field, by the same camelCase name
    for name, field in fields.items():
        assert (field.alias or name) in props
    assert set(props) == {f.alias or n for n, f in ImageJobSpec.model_fields.items()}
    # and a spec's generation parameters travel in the queue message unchanged
    assert set(JobMessage.model_fields["params"].annotation.model_fields) == set(fields)  # type: ignore[union-attr]


def test_operator_and_api_import_without_torch() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'diffusers', 'transformers'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import zimage_operator.handlers.imagejob, zimage_operator.__main__, zimage_queue, zimage_api.cli\n"
        "import zimage_worker.engine, zimage_worker.loop, zimage_worker.local\n"
        "assert not any(m.split('.')[0] in ('torch', 'diffusers') for m in sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
