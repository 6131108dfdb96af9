"""One source of truth: the CRD YAML, the operator's models and the queue message agree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from zimage_operator import crdgen
from zimage_operator.types import ImageJobSpec
from zimage_queue import GenerationParams, JobMessage
from zimage_queue.message import MAX_REFERENCE_IMAGES, URI_PATTERN

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
    assert props["task"]["enum"] == ["text-to-image", "image-to-image", "inpaint", "edit"]
    assert props["referenceImages"]["maxItems"] == MAX_REFERENCE_IMAGES
    assert props["referenceImages"]["items"]["pattern"] == URI_PATTERN
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
        "import zimage_api.__main__, zimage_api.app, zimage_api.local\n"
        "import zimage_worker.engine, zimage_worker.loop, zimage_worker.local\n"
        "assert not any(m.split('.')[0] in ('torch', 'diffusers') for m in sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_api_request_bounds_are_the_crd_bounds() -> None:
    """The API's OpenAPI schema for POST /v1/jobs states the same limits as the ImageJob CRD, field by field."""
    from zimage_api.app import create_app
    from zimage_api.settings import ApiSettings
    from zimage_api.store import MemoryJobStore

    crd = yaml.safe_load((REPO / "crds" / "imagejob.yaml").read_text())
    crd_props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    openapi = create_app(ApiSettings(), MemoryJobStore("x", [])).openapi()
    api_props = openapi["components"]["schemas"]["JobRequest"]["properties"]
    # ``mode`` is the API's own (an ImageJob or a bulk job): it chooses where the job lives, not what it is.
    assert set(api_props) - {"mode"} == set(crd_props)
    bounds = ("minimum", "maximum", "multipleOf", "minLength", "maxLength", "pattern", "enum")

    def limits(prop: dict[str, object]) -> dict[str, object]:
        # pydantic writes an optional field as anyOf [{...}, {"type": "null"}]; the CRD as nullable
        options = prop.get("anyOf") or [prop]
        out: dict[str, object] = {}
        for option in options:  # type: ignore[attr-defined]
            out.update({k: v for k, v in option.items() if k in bounds})
        return out

    # The API's own additions: model may be left to the API's default; its TTL has an upper bound.
    relaxed = {"model", "ttlSecondsAfterFinished"}
    for name in set(crd_props) - relaxed:
        assert limits(api_props[name]) == limits(crd_props[name]), name
    assert limits(crd_props["width"]) == {"minimum": 64, "maximum": 2048, "multipleOf": 16}


def test_only_the_imagejob_spec_is_immutable() -> None:
    """A queued job runs with the spec it was admitted with, so the CRD refuses edits (CEL transition rule);
    a ModelDeployment is edited in place (replicas, scaling), so its rules (backends, fallbacks) are no
    transition rules."""
    rules = {}
    for name in ("imagejob.yaml", "modeldeployment.yaml"):
        crd = yaml.safe_load((REPO / "crds" / name).read_text())
        root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        rules[name] = [
            *root.get("x-kubernetes-validations", []),
            *root["properties"]["spec"]["x-kubernetes-validations"],
        ]
    assert rules["imagejob.yaml"] == [crdgen.IMMUTABLE_SPEC]
    assert rules["modeldeployment.yaml"] and not any("oldSelf" in r["rule"] for r in rules["modeldeployment.yaml"])
    assert crdgen.IMMUTABLE_SPEC == {"rule": "self == oldSelf", "message": crdgen.IMMUTABLE_SPEC_MESSAGE}
    assert "immutable" in crdgen.IMMUTABLE_SPEC_MESSAGE and "new ImageJob" in crdgen.IMMUTABLE_SPEC_MESSAGE


@pytest.mark.parametrize(
    ("width", "error"),
    [
        (99999, "less_than_equal"),  # out of range and no multiple of 16: the range is what is wrong
        (2064, "less_than_equal"),
        (9, "greater_than_equal"),
        (48, "greater_than_equal"),
        (100, "multiple_of"),  # in range: then the multiple
        (4096.0, "less_than_equal"),
    ],
)
def test_size_bounds_are_checked_before_the_multiple(width: object, error: str) -> None:
    with pytest.raises(ValidationError) as e:
        GenerationParams.model_validate({"prompt": "x", "width": width, "height": width})
    assert [(err["loc"], err["type"]) for err in e.value.errors()] == [(("width",), error), (("height",), error)]
    assert GenerationParams.model_validate({"prompt": "x", "width": 2048, "height": 64}).width == 2048
