"""Render the custom resources' Markdown reference from the CRDs that ``zimage_operator.crdgen`` builds.

Run ``python -m zimage_operator.crddoc docs/reference.md`` after changing a model; a test fails while the committed
reference is stale. The source is crdgen's in-memory CRDs (their ``openAPIV3Schema``), not ``crds/*.yaml``, so the
reference states what the API server validates and defaults, and nothing else. The output depends only on the
schemas: property order is the models' field order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from zimage_operator import crdgen

DEFAULT_OUTPUT = "docs/reference.md"
COMMAND = "python -m zimage_operator.crddoc docs/reference.md"

# What a reader needs about a field (or a whole object) the schema leaves undocumented, keyed by "<Kind>:<path>".
# Only facts of the operator's code (zimage_operator.workload, crdgen, handlers) that the schema cannot carry.
_NOTES = {
    "ModelDeployment:spec.imagePullPolicy": "Of the worker, forwarder and preload containers.",
    "ModelDeployment:spec.nodeSelector": "Copied into the worker and preload pods.",
    "ModelDeployment:spec.tolerations": "Copied into the worker and preload pods.",
    "ModelDeployment:spec.affinity": "Copied into the worker and preload pods.",
    "ModelDeployment:spec.priorityClassName": "Copied into the worker and preload pods.",
    "ModelDeployment:spec.serviceAccountName": "Worker and preload pods run as it; its token is never mounted "
    "(automountServiceAccountToken: false).",
    "ImageJob:spec": "Before Kubernetes 1.25 (no CEL) the API server stores an edit anyway; the operator then "
    "records a Warning Event (reason SpecChanged), and the job runs with the spec it was admitted with.",
    "ImageJob:status.kopf": "The operator framework's (kopf) handler bookkeeping.",
    "ModelDeployment:status.kopf": "The operator framework's (kopf) handler bookkeeping.",
    # ImageWorkflow: zimage_operator.workflow (the planner) and zimage_operator.workflows (the operator's loop).
    "ImageWorkflow:spec": "An edit that reaches the operator anyway (no CEL before Kubernetes 1.25; the any-JSON "
    "inputs and params) changes status.specDigest's hash: the workflow fails (reason SpecChanged) and its running "
    "step jobs are cancelled. Rules across steps (cycles, references, params that are not ImageJob fields) are "
    "checked by the operator when it admits the workflow: condition Accepted False, reason InvalidSpec.",
    "ImageWorkflow:status.phase": "Pending until every step's ModelDeployment exists; Running once admitted; "
    "Succeeded, Failed or Cancelled, which are final.",
    "ImageWorkflow:status.conditions[].type": "Accepted, Running, and the final phase's: Succeeded, Failed or "
    "Cancelled.",
    "ImageWorkflow:status.startedAt": "When the operator admitted the workflow.",
    "ImageWorkflow:status.duration": "From startedAt to finishedAt, for the Duration column.",
    "ImageWorkflow:status.message": "While Pending, the ModelDeployments it waits for; at the end, why (every "
    "failed step job with its reason).",
    "ImageWorkflow:status.kopf": "Unused: the operator's ImageWorkflow handler only watches (no kopf handler state).",
    "ImageWorkflow:status.steps[].succeeded": "Instances that succeeded.",
    "ImageWorkflow:status.steps[].message": "Why the step failed before any job ran: its forEach did not resolve "
    "to a list, or to more than 256 items.",
    "ImageWorkflow:status.steps[].instances[].index": "The forEach item's position (0 without forEach).",
    "ImageWorkflow:status.steps[].instances[].attempt": "0 for the first job; retry n is a new ImageJob whose "
    "name ends in -r<n>.",
    "ImageWorkflow:status.steps[].instances[].phase": "Failed also when its job was cancelled by anything but "
    "the workflow; Cancelled when the workflow cancelled it; Skipped when the workflow ended before it started.",
    "ImageWorkflow:status.steps[].instances[].message": "Why it failed (the job's reason, or a reference or "
    "params that made no valid job), or why its job was moved to a fallback (with routedTo).",
    "ImageWorkflow:status.steps[].instances[].startedAt": "When the workflow created the job of this attempt.",
}


def _escape(text: str) -> str:
    """Plain text in a table cell: no row breaks, no column breaks, no HTML."""
    return " ".join(text.split()).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _code(value: str) -> str:
    """A code span in a table cell (GitHub needs the pipe escaped even there)."""
    fence = "``" if "`" in value else "`"
    pad = " " if fence == "``" else ""
    escaped = value.replace("|", "\\|")
    return f"{fence}{pad}{escaped}{pad}{fence}"


def _literal(value: Any) -> str:
    if isinstance(value, str):
        return _code(value) if value else '`""`'
    return _code(json.dumps(value, sort_keys=True))


def _number(value: Any) -> str:
    return json.dumps(value)


def _anchor(kind: str, path: str) -> str:
    return f"{kind}-{path.replace('[]', '').replace('.', '-')}".lower()


def _is_object(node: dict[str, Any]) -> bool:
    return node.get("type") == "object" and "properties" in node


def _type(kind: str, path: str, node: dict[str, Any]) -> str:
    kind_of = node.get("type", "")
    if _is_object(node):
        return f"object ([`{path}`](#{_anchor(kind, path)}))"
    if kind_of == "object":
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            return f"map of {_type(kind, path + '.*', extra)}"
        return "object (any fields)"
    if kind_of == "array":
        items = node.get("items") or {}
        return f"array of {_type(kind, path + '[]', items)}"
    if not kind_of and node.get("x-kubernetes-preserve-unknown-fields"):
        return "any JSON value"
    fmt = node.get("format")
    return f"{kind_of} ({fmt})" if fmt else str(kind_of)


def _bounds(node: dict[str, Any], low: str, high: str, what: str) -> list[str]:
    lo, hi = node.get(low), node.get(high)
    if lo is not None and hi is not None:
        return [f"{what}{_number(lo)} to {_number(hi)}" if lo != hi else f"{what}exactly {_number(lo)}"]
    if lo is not None:
        return [f"{what}≥ {_number(lo)}"]
    if hi is not None:
        return [f"{what}≤ {_number(hi)}"]
    return []


def _limits(node: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if "enum" in node:
        out.append("one of " + ", ".join(_literal(v) for v in node["enum"]))
    minimum, maximum = node.get("minimum"), node.get("maximum")
    # OpenAPI 3.0 (what a CRD speaks) has boolean exclusive bounds; JSON Schema 2020-12 has numeric ones.
    ex_min, ex_max = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")
    if ex_min is True and minimum is not None:
        out.append(f"> {_number(minimum)}")
        minimum = None
    elif ex_min is not None and not isinstance(ex_min, bool):
        out.append(f"> {_number(ex_min)}")
    if ex_max is True and maximum is not None:
        out.append(f"< {_number(maximum)}")
        maximum = None
    elif ex_max is not None and not isinstance(ex_max, bool):
        out.append(f"< {_number(ex_max)}")
    out += _bounds({"minimum": minimum, "maximum": maximum}, "minimum", "maximum", "")
    if "multipleOf" in node:
        out.append(f"multiple of {_number(node['multipleOf'])}")
    out += _bounds(node, "minLength", "maxLength", "length ")
    out += _bounds(node, "minItems", "maxItems", "items ")
    if "pattern" in node:
        out.append(f"pattern {_code(node['pattern'])}")
    out += _rules(node)
    items = node.get("items")
    if node.get("type") == "array" and isinstance(items, dict) and not _is_object(items):
        out += [f"each: {limit}" for limit in _limits(items)]
    return out


def _rules(node: dict[str, Any]) -> list[str]:
    """The node's CEL rules (``x-kubernetes-validations``), each with the message the API server answers."""
    return [
        f"rule {_code(r['rule'])}" + (f" ({_escape(r['message'])})" if r.get("message") else "")
        for r in node.get("x-kubernetes-validations") or []
    ]


def _tables(path: str, node: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every object level with properties under (and including) ``node``, depth first in field order."""
    found = [(path, node)]
    for name, child in node["properties"].items():
        if _is_object(child):
            found += _tables(f"{path}.{name}", child)
        elif child.get("type") == "array" and _is_object(child.get("items") or {}):
            found += _tables(f"{path}.{name}[]", child["items"])
    return found


def _table(kind: str, path: str, node: dict[str, Any]) -> list[str]:
    lines = [f'<a id="{_anchor(kind, path)}"></a>', "", f"### `{path}`", ""]
    if node.get("description"):
        lines += [_escape(node["description"]), ""]
    if rules := _rules(node):
        lines += [
            "Rules the API server checks (CEL, Kubernetes 1.25 and later; a rule on `oldSelf` on updates only):",
            "",
        ]
        lines += [f"- {rule}" for rule in rules] + [""]
    if note := _NOTES.get(f"{kind}:{path}"):  # about an object as a whole
        lines += [_escape(note), ""]
    lines += ["| field | type | default | limits | description |", "|---|---|---|---|---|"]
    required = set(node.get("required") or [])
    for name, child in node["properties"].items():
        field = f"{path}.{name}"
        limits = (["**required**"] if name in required else []) + _limits(child)
        description = child.get("description") or _NOTES.get(f"{kind}:{field}", "")
        cells = [
            _code(field),
            _type(kind, field, child),
            _literal(child["default"]) if "default" in child else "",
            "; ".join(limits),
            _escape(description),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def render_crd(crd: dict[str, Any]) -> str:
    spec = crd["spec"]
    names = spec["names"]
    kind = names["kind"]
    version = next(v for v in spec["versions"] if v.get("storage"))
    root = version["schema"]["openAPIV3Schema"]
    subresources = version.get("subresources") or {}
    lines = [f"## {kind}", ""]
    facts = [
        f"`{crd['metadata']['name']}`",
        f"apiVersion `{spec['group']}/{version['name']}`",
        "namespaced" if spec["scope"] == "Namespaced" else "cluster-scoped",
        "short name " + ", ".join(f"`{s}`" for s in names.get("shortNames", [])),
        "categories " + ", ".join(f"`{c}`" for c in names.get("categories", [])),
    ]
    lines += [", ".join(facts) + ".", ""]
    if subresources:
        parts = []
        for name, sub in subresources.items():
            details = ", ".join(f"{k} `{v}`" for k, v in sub.items())
            parts.append(f"`{name}`" + (f" ({details})" if details else ""))
        lines += ["Subresources: " + ", ".join(parts) + ".", ""]
    required = [f"`{r}`" for r in root.get("required") or []]
    if required:
        lines += ["Required at the top level: " + ", ".join(required) + ".", ""]
    if rules := _rules(root):
        lines += ["Rules the API server checks on the whole object (CEL, Kubernetes 1.25 and later):", ""]
        lines += [f"- {rule}" for rule in rules] + [""]

    columns = version.get("additionalPrinterColumns") or []
    if columns:
        described = any(col.get("description") for col in columns)
        lines += [f"### Printer columns (`kubectl get {names['plural']}`)", ""]
        lines += ["| column | type | JSONPath |" + (" description |" if described else "")]
        lines += ["|---|---|---|" + ("---|" if described else "")]
        for col in columns:
            row = [_escape(col["name"]), col["type"], _code(col["jsonPath"])]
            row += [_escape(col.get("description", ""))] if described else []
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")

    tables: list[tuple[str, dict[str, Any]]] = []
    for top in ("spec", "status"):
        node = root["properties"].get(top)
        if node and _is_object(node):
            tables += _tables(top, node)
    lines += ["Objects: " + ", ".join(f"[`{p}`](#{_anchor(kind, p)})" for p, _ in tables) + ".", ""]
    for path, node in tables:
        lines += _table(kind, path, node)
    return "\n".join(lines)


def render(crds: dict[str, dict[str, Any]] | None = None) -> str:
    docs = crds if crds is not None else crdgen.crds()
    intro = [
        f"<!-- Generated by `{COMMAND}` from the CRDs of zimage_operator/crdgen.py. Do not edit. -->",
        "",
        "# Custom resource reference",
        "",
        "Every field of the `ImageJob`, `ImageWorkflow` and `ModelDeployment` custom resources, from the CRDs'",
        "`openAPIV3Schema` (generated from `operator/zimage_operator/types.py` and `workflow_types.py`; workflows",
        "are described in `docs/workflows.md`). The API server enforces the limits when an object is",
        "created or updated, and fills in a default when the field is missing from an object that is present; the",
        "operator reads specs with the same models, so it applies the same defaults. Rules across fields (for",
        "example `minReplicas <= maxReplicas`, or `inputImage` for image-to-image) cannot be said in a schema: the",
        "operator reports them as a condition with reason `InvalidSpec`. `status` is written by the operator (and",
        "by the REST API when it admits or cancels an ImageJob), not by users.",
        "",
    ]
    body = [render_crd(docs[name]) for name in sorted(docs)]
    return "\n".join(intro) + "\n" + "\n".join(body).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> None:
    out = Path((argv or sys.argv[1:] or [DEFAULT_OUTPUT])[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render())


if __name__ == "__main__":
    main()
