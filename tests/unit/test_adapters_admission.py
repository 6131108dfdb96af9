"""LoRA adapters at admission (pure): known adapters pass with their scales resolved into the message and the
status, unknown ones and too many fail the job with a reason; the worker Deployment gets the adapter list."""

from __future__ import annotations

import json
from typing import Any

from tests.unit.test_reconcile import META, NOW, cond, spec
from zimage_operator.reconcile import admit
from zimage_operator.types import ModelDeploymentSpec
from zimage_operator.workload import _worker_env

ADAPTERS = [
    {"name": "ink", "source": "loras/ink"},
    {"name": "watercolour", "source": "s3://bucket/loras/wc", "defaultScale": 0.6},
    {"name": "neon", "source": "someone/neon-lora", "weightName": "neon.safetensors"},
    {"name": "felt", "source": "/models/loras/felt"},
]


def model(**kw: Any) -> dict[str, Any]:
    return {"spec": {"model": {"source": "tiny-random", "variant": "turbo"}, "adapters": ADAPTERS, **kw}}


def test_two_adapters_are_enqueued_with_their_scales_resolved() -> None:
    loras = [{"name": "ink", "scale": 0.8}, {"name": "watercolour"}]
    d = admit(spec=spec(loras=loras), status={}, meta=META, model=model(), now=NOW)
    assert d.action == "enqueue" and d.message is not None
    resolved = [{"name": "ink", "scale": 0.8}, {"name": "watercolour", "scale": 0.6}]
    assert [lora.wire() for lora in d.message.params.loras or []] == resolved
    assert d.message.wire()["params"]["loras"] == resolved
    assert d.patch["adapters"] == resolved  # the status records what it runs with


def test_a_job_without_adapters_carries_none_on_the_wire() -> None:
    d = admit(spec=spec(), status={}, meta=META, model=model(), now=NOW)
    assert d.message is not None and "loras" not in d.message.wire()["params"]
    assert "adapters" not in d.patch


def test_an_unknown_adapter_fails_the_job_naming_it() -> None:
    d = admit(spec=spec(loras=[{"name": "ink"}, {"name": "sepia"}]), status={}, meta=META, model=model(), now=NOW)
    assert d.action == "fail" and d.message is None
    failed = cond(d.patch, "Failed")
    assert failed["reason"] == "UnknownAdapter"
    assert "'sepia'" in failed["message"] and "felt, ink, neon, watercolour" in failed["message"]


def test_more_adapters_than_the_deployment_allows_fail() -> None:
    three = [{"name": n} for n in ("ink", "neon", "felt")]
    assert admit(spec=spec(loras=three), status={}, meta=META, model=model(), now=NOW).action == "enqueue"
    four = [*three, {"name": "watercolour"}]
    d = admit(spec=spec(loras=four), status={}, meta=META, model=model(), now=NOW)
    assert d.action == "fail" and cond(d.patch, "Failed")["reason"] == "TooManyAdapters"
    d = admit(spec=spec(loras=three[:2]), status={}, meta=META, model=model(maxAdaptersPerJob=1), now=NOW)
    assert d.action == "fail" and "allows 1 per job" in cond(d.patch, "Failed")["message"]


def test_the_same_adapter_twice_is_an_invalid_spec() -> None:
    d = admit(spec=spec(loras=[{"name": "ink"}, {"name": "ink"}]), status={}, meta=META, model=model(), now=NOW)
    assert d.action == "fail" and cond(d.patch, "Failed")["reason"] == "InvalidSpec"


def test_a_model_without_adapters_refuses_any() -> None:
    bare = {"spec": {"model": {"variant": "turbo"}}}
    d = admit(spec=spec(loras=[{"name": "ink"}]), status={}, meta=META, model=bare, now=NOW)
    assert d.action == "fail" and "its adapters: none" in cond(d.patch, "Failed")["message"]


def test_workers_are_told_the_adapters_and_the_resident_limit() -> None:
    md = ModelDeploymentSpec.model_validate({**model()["spec"], "maxResidentAdapters": 2})
    env = {e["name"]: e.get("value") for e in _worker_env(md, [], [])}
    assert json.loads(env["ZIMAGE_ADAPTERS"])[1] == {
        "name": "watercolour", "source": "s3://bucket/loras/wc", "defaultScale": 0.6,
    }  # fmt: skip
    assert env["ZIMAGE_MAX_RESIDENT_ADAPTERS"] == "2"
    plain = ModelDeploymentSpec.model_validate({"model": {"source": "tiny-random"}})
    assert "ZIMAGE_ADAPTERS" not in {e["name"] for e in _worker_env(plain, [], [])}
    errors = ModelDeploymentSpec.model_validate(
        {**md.model_dump(by_alias=True, exclude_none=True), "env": [{"name": "ZIMAGE_ADAPTERS", "value": "[]"}]}
    ).cross_field_errors()
    assert errors and "ZIMAGE_ADAPTERS" in errors[0]
