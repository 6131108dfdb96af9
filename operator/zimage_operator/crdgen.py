"""Generate the CRD manifests from the pydantic models in ``zimage_operator.types``.

Run ``python -m zimage_operator.crdgen crds charts/zimage-operator/crds`` after changing a model; tests fail while
``crds/`` or the chart's copy is stale.
The output is a structural schema (no $ref, no anyOf/null) so the API server validates and defaults it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from zimage_operator import types as t
from zimage_operator import workflow_types as wt

_KEEP = {
    "type",
    "description",
    "default",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "multipleOf",
    "minItems",
    "maxItems",
    "required",
    "format",
    # CEL rules a model declares (``json_schema_extra``), on the object they are written for.
    "x-kubernetes-validations",
}


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        ref = defs[node["$ref"].rsplit("/", 1)[-1]]
        return _structural({**ref, **{k: v for k, v in node.items() if k != "$ref"}}, defs)
    if "anyOf" in node:  # Optional[X] -> X; absence is how a CR says "not set"
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express union in a structural schema: {node}")
        merged = {**_structural(options[0], defs), **{k: v for k, v in node.items() if k != "anyOf"}}
        return _structural(merged, defs)
    if node.get("x-kubernetes-preserve-unknown-fields") and "type" not in node:  # any JSON value
        kept = {k: v for k, v in node.items() if k == "description"}
        return {**kept, "x-kubernetes-preserve-unknown-fields": True}
    if "const" in node:
        node = {**node, "enum": [node.pop("const")]}
    out = {k: v for k, v in node.items() if k in _KEEP}
    if out.get("default", 0) is None:
        del out["default"]
    if "properties" in node:
        out["type"] = "object"
        out["properties"] = {k: _structural(v, defs) for k, v in node["properties"].items()}
    elif node.get("type") == "object" or not node.get("type"):
        extra = node.get("additionalProperties", True)
        out["type"] = "object"
        if isinstance(extra, dict) and extra:
            out["additionalProperties"] = _structural(extra, defs)
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    if "items" in node:
        out["items"] = _structural(node["items"], defs)
    if isinstance(out.get("default"), float) and out.get("type") == "integer":
        out["default"] = int(out["default"])
    return out


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}))


# An admitted ImageJob has been queued with the spec it had then; an edit would change nothing that runs but
# would make the object lie about it. A transition rule (CEL, Kubernetes >= 1.25) refuses any change to spec;
# metadata and status stay writable. Without CEL the operator reports an edit it sees (handlers/edits.py).
IMMUTABLE_SPEC_MESSAGE = "spec is immutable once created; create a new ImageJob"
IMMUTABLE_SPEC = {"rule": "self == oldSelf", "message": IMMUTABLE_SPEC_MESSAGE}


def _without_defaults(node: Any) -> Any:
    """Status is written by the operator, never defaulted by the API server."""
    if isinstance(node, dict):
        return {k: _without_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_without_defaults(v) for v in node]
    return node


def _crd(
    kind: str,
    plural: str,
    short: str,
    spec: type[BaseModel],
    status: type[BaseModel],
    columns: list[dict[str, Any]],
    scale: bool,
    spec_rules: list[dict[str, str]] | None = None,
    rules: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """``spec_rules``: CEL rules on the spec; ``rules`` on the whole object (where ``self.metadata.name`` is)."""
    spec_schema = schema_of(spec)
    if spec_rules:
        spec_schema["x-kubernetes-validations"] = [*spec_schema.get("x-kubernetes-validations", []), *spec_rules]
    status_schema = _without_defaults(schema_of(status))
    # kopf keeps its handler progress here rather than in annotations, so user objects never drift.
    status_schema["properties"]["kopf"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    subresources: dict[str, Any] = {"status": {}}
    if scale:
        subresources["scale"] = {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{t.GROUP}"},
        "spec": {
            "group": t.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["zimage"],
            },
            "versions": [
                {
                    "name": t.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": subresources,
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                            **({"x-kubernetes-validations": rules} if rules else {}),
                        }
                    },
                }
            ],
        },
    }


def _age() -> dict[str, Any]:
    return {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def crds() -> dict[str, dict[str, Any]]:
    return {
        "imagejob.yaml": _crd(
            "ImageJob",
            t.IMAGEJOB_PLURAL,
            "ij",
            t.ImageJobSpec,
            t.ImageJobStatus,
            [
                {"name": "Model", "type": "string", "jsonPath": ".spec.model"},
                {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
                {"name": "Duration", "type": "string", "jsonPath": ".status.duration"},
                _age(),
            ],
            scale=False,
            spec_rules=[IMMUTABLE_SPEC],
        ),
        "modeldeployment.yaml": _crd(
            "ModelDeployment",
            t.MODELDEPLOYMENT_PLURAL,
            "md",
            t.ModelDeploymentSpec,
            t.ModelDeploymentStatus,
            [
                {"name": "Backend", "type": "string", "jsonPath": ".spec.backend"},
                {"name": "Variant", "type": "string", "jsonPath": ".spec.model.variant"},
                {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
                {"name": "Desired", "type": "integer", "jsonPath": ".status.desiredReplicas"},
                {"name": "Queue", "type": "integer", "jsonPath": ".status.queueLength"},
                _age(),
            ],
            scale=True,
            rules=t.MODELDEPLOYMENT_RULES,
        ),
        "imageworkflow.yaml": _crd(
            "ImageWorkflow",
            wt.IMAGEWORKFLOW_PLURAL,
            "iw",
            wt.ImageWorkflowSpec,
            wt.ImageWorkflowStatus,
            [
                {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
                {"name": "Jobs", "type": "integer", "jsonPath": ".status.progress.jobsDone", "priority": 1},
                {"name": "Duration", "type": "string", "jsonPath": ".status.duration"},
                _age(),
            ],
            scale=False,
            spec_rules=wt.SPEC_RULES,
            rules=wt.OBJECT_RULES,
        ),
    }


def render(doc: dict[str, Any]) -> str:
    header = "# Generated by `python -m zimage_operator.crdgen crds/` from zimage_operator/types.py. Do not edit.\n"
    return header + yaml.safe_dump(doc, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> None:
    """Write the CRDs into each folder named (default ``crds``), e.g. ``crds charts/zimage-operator/crds``."""
    for folder in argv or sys.argv[1:] or ["crds"]:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for name, doc in crds().items():
            (out / name).write_text(render(doc))


if __name__ == "__main__":
    main()
