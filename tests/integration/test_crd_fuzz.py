"""CRD fuzz on a real API server: generated invalid ImageJobs and ModelDeployments through ``kubectl apply``.

Every spec is broken in one place, chosen from the CRD's own constraints (type, bounds, multipleOf, length,
pattern, enum, required, item counts) or from the cross-field rules a structural schema cannot state. The
first kind must be rejected by the API server; the second is stored but refused by the operator's admission
(the same function the running operator calls). Either way: zero invalid objects accepted. The pydantic
models must reject the first kind too, so the CRD and the models agree on every constraint hit.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from conftest import REPO, Kube
from zimage_operator import reconcile
from zimage_operator.types import ImageJobSpec, ModelDeploymentSpec

pytestmark = [pytest.mark.kube, pytest.mark.timeout(600)]

KINDS: dict[str, tuple[str, type[BaseModel], dict[str, Any]]] = {
    "ImageJob": ("imagejob.yaml", ImageJobSpec, {"model": "z-image-turbo", "prompt": "a red fox"}),
    "ModelDeployment": ("modeldeployment.yaml", ModelDeploymentSpec, {"scaling": {"maxReplicas": 2}}),
}
MODEL = {"metadata": {"name": "z-image-turbo"}, "spec": {"model": {"variant": "turbo"}}}


def spec_schema(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((REPO / "crds" / KINDS[kind][0]).read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


def leaves(schema: dict[str, Any], path: tuple[str | int, ...] = ()) -> list[tuple[tuple[str | int, ...], dict]]:
    """Every constrained node of the schema, with the path to it (a list item is index 0)."""
    found: list[tuple[tuple[str | int, ...], dict[str, Any]]] = [(path, schema)] if path else []
    for name, sub in (schema.get("properties") or {}).items():
        found += leaves(sub, (*path, name))
    if isinstance(schema.get("items"), dict):
        found += leaves(schema["items"], (*path, 0))
    return found


# Strings that break at least one of the schema's patterns (DNS names, URIs, quantities, env names, paths).
NOT_MATCHING = [
    "=",
    "a=b",
    "UPPER",
    "-lead",
    "trail-",
    "a b",
    "a_b",
    "ünï",
    "s3:/x",
    "ftp://x",
    "tmp",
    "1.5Xi",
    "10 Gi",
]


def violations(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values that break ``node``'s constraints (never a valid one)."""
    t = node.get("type")
    options: list[st.SearchStrategy[Any]] = []
    wrong_type = {
        "integer": st.sampled_from(["12", 1.5, True, [], {}]),
        "number": st.sampled_from(["0.5", True, [], {}]),
        "string": st.sampled_from([12, 1.5, True, [], {}]),
        "boolean": st.sampled_from(["true", 1, [], {}]),
        "array": st.sampled_from(["x", 1, {}]),
        "object": st.sampled_from(["x", 1, []]),
    }
    if t in wrong_type:
        options.append(wrong_type[t])
    if t in ("integer", "number"):
        if "minimum" in node:
            options.append(st.integers(-(2**40), int(node["minimum"]) - 1))
        if "maximum" in node:
            options.append(st.integers(int(node["maximum"]) + 1, 2**62))
        if t == "integer" and "multipleOf" in node:
            m = int(node["multipleOf"])
            low, high = int(node.get("minimum", 0)), int(node.get("maximum", 10**6))
            options.append(st.integers(low, high).filter(lambda v: v % m != 0))
    if t == "string":
        if "maxLength" in node:
            options.append(st.text(alphabet="abc", min_size=node["maxLength"] + 1, max_size=node["maxLength"] + 40))
        if node.get("minLength", 0) > 0:
            options.append(st.just(""))
        if "pattern" in node:
            pattern = re.compile(node["pattern"])
            low, high = node.get("minLength", 0), min(60, node.get("maxLength", 60))
            bad = [c for c in NOT_MATCHING if low <= len(c) <= high and not pattern.search(c)]
            options.append(st.text(min_size=low, max_size=high).filter(lambda v: not pattern.search(v)))
            if bad:
                options.append(st.sampled_from(bad))
        if "enum" in node:
            options.append(st.text(max_size=20).filter(lambda v: v not in node["enum"]))
    if t == "array":
        if node.get("minItems", 0) > 0:
            options.append(st.just([]))
        if "maxItems" in node and node["maxItems"] <= 300:
            item = {"name": "X"} if (node.get("items") or {}).get("type") == "object" else "ReadWriteOnce"
            options.append(st.just([item] * (node["maxItems"] + 1)))
    return st.one_of(options) if options else st.nothing()


def put(spec: dict[str, Any], path: tuple[str | int, ...], value: Any, schema: dict[str, Any]) -> None:
    """Set ``spec[path] = value``, creating parents (a list parent gets one minimal valid item)."""
    node, sub = spec, schema
    for key in path[:-1]:
        sub = sub["items"] if isinstance(key, int) else sub["properties"][key]
        if isinstance(key, int):
            if not node:
                node.append({n: "X" for n in sub.get("required", [])} if sub.get("type") == "object" else None)
            node = node[0]
            continue
        if not isinstance(node.get(key), (dict, list)):
            node[key] = [] if sub.get("type") == "array" else {r: _minimal(sub, r) for r in sub.get("required", [])}
        node = node[key]
    last = path[-1]
    if isinstance(last, int):
        node[:] = [value]
    else:
        node[last] = value


def _minimal(schema: dict[str, Any], field: str) -> Any:
    prop = schema["properties"][field]
    return {"string": "s3://bucket/x" if "pattern" in prop and "s3" in prop["pattern"] else "fallback"}.get(
        prop.get("type", ""), 1
    )


@st.composite
def schema_invalid(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    schema = spec_schema(kind)
    base = copy.deepcopy(KINDS[kind][2])
    choices = [(p, n) for p, n in leaves(schema) if not violations(n).is_empty]
    required = [(p, r) for p, n in [((), schema), *leaves(schema)] for r in n.get("required", [])]
    if draw(st.integers(0, 9)) == 0 and kind == "ImageJob":  # drop a required field
        _, field = draw(st.sampled_from([r for r in required if r[0] == ()]))
        base.pop(field, None)
        return base
    path, node = draw(st.sampled_from(choices))
    put(base, path, draw(violations(node)), schema)
    return base


REMOTE = {
    "api": "chat",
    "baseUrl": "https://llm.example/v1",
    "model": "m",
    "keysSecret": "k",
    "limits": {"requestsPerWindow": 4},
}
CROSS_FIELD = {
    "ImageJob": [
        {"task": "image-to-image"},
        {"task": "inpaint", "inputImage": "s3://b/in.png"},
        {"inputImage": "s3://b/in.png"},
        {"task": "text-to-image", "maskImage": "file:///m.png"},
    ],
    "ModelDeployment": [
        {"scaling": {"minReplicas": 3, "maxReplicas": 2}},
        {"cache": {"existingClaim": "models", "size": "10Gi"}},
        {"cache": {"preload": True}},
        {"cache": {"storageClassName": "fast"}},
        {"env": [{"name": "ZIMAGE_REDIS_URL", "value": "redis://evil"}]},
        {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]},
        {"resources": {"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 2}}},
        # What CEL cannot see (resources keep unknown fields) or does not say: the operator's cross_field_errors.
        {"backend": "remote", "remote": REMOTE, "resources": {"limits": {"nvidia.com/gpu": 1}}},
        {"backend": "remote", "remote": REMOTE, "env": [{"name": "ZIMAGE_REMOTE_BASE_URL", "value": "http://evil"}]},
    ],
}


def operator_refuses(kind: str, spec: dict[str, Any]) -> bool:
    """What the running operator decides for a stored object: the same pure functions its handlers call."""
    if kind == "ModelDeployment":
        return bool(reconcile.modeldeployment_errors(spec))
    meta = {"uid": "u", "namespace": "ns", "name": "n", "generation": 1}
    decision = reconcile.admit(spec=spec, status={}, meta=meta, model=MODEL, now=datetime.now(UTC))
    return decision.action == "fail"


def strictly_invalid(model: type[BaseModel], spec: dict[str, Any]) -> bool:
    try:
        model.model_validate_json(json.dumps(spec), strict=True)  # from JSON, as the API server stores it
    except ValidationError:
        return True
    return False


def apply(kube: Kube, ns: str, kind: str, specs: list[dict[str, Any]], tmp: Path) -> tuple[list[bool], str]:
    """Apply every spec in one kubectl call; returns which of them the API server stored, and kubectl's errors."""
    names = [f"fuzz-{uuid.uuid4().hex[:12]}" for _ in specs]
    items = [
        {"apiVersion": "zimage.dev/v1alpha1", "kind": kind, "metadata": {"name": n}, "spec": s}
        for n, s in zip(names, specs, strict=True)
    ]
    doc = tmp / f"{names[0]}.json"
    doc.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    # --validate=false: the API server must be the gate (client-side validation is optional for any client).
    out = kube.kubectl("apply", "--validate=false", "-n", ns, "-f", str(doc), check=False, timeout=120)
    plural = {"ImageJob": "imagejobs", "ModelDeployment": "modeldeployments"}[kind]
    stored = json.loads(kube.kubectl("get", plural, "-n", ns, "-o", "json").stdout)["items"]
    existing = {o["metadata"]["name"] for o in stored}
    return [n in existing for n in names], out.stderr


@pytest.mark.parametrize("kind", list(KINDS))
def test_invalid_specs_are_never_accepted(crds: Kube, namespace: str, tmp_path: Path, kind: str) -> None:
    model = KINDS[kind][1]
    tally = {"rejected by the API server": 0, "refused by the operator": 0}

    @settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(schema_invalid(kind), min_size=10, max_size=10))
    def run(specs: list[dict[str, Any]]) -> None:
        for s in specs:
            assert strictly_invalid(model, s), f"the CRD forbids it, the pydantic model takes it: {s}"
        valid = copy.deepcopy(KINDS[kind][2])  # the control: a valid object in the same call is stored
        stored, errors = apply(crds, namespace, kind, [valid, *specs], tmp_path)
        assert stored[0], errors
        accepted = [s for ok, s in zip(stored[1:], specs, strict=True) if ok]
        assert not accepted, f"the API server stored specs its CRD forbids: {accepted}"
        tally["rejected by the API server"] += len(specs)

    run()
    # Cross-field rules: stored (no CEL before Kubernetes 1.25), refused by the operator, never admitted.
    cross = [{**copy.deepcopy(KINDS[kind][2]), **c} for c in CROSS_FIELD[kind]]
    stored, errors = apply(crds, namespace, kind, cross, tmp_path)
    assert all(stored), errors
    assert all(operator_refuses(kind, s) for s in cross)
    assert all(not strictly_invalid(model, s) for s in cross)  # the schema half is fine: only the rule fails
    tally["refused by the operator"] += len(cross)
    print(kind, tally)
    assert tally["rejected by the API server"] >= 100
