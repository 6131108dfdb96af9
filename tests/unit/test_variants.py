"""Variants (issue 19, pure): what each variant accepts is one table; admission fails a job its model's variant
cannot run (reason UnsupportedTask) and enqueues the rest with the variant's defaults; the CRD states the table."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from tests.unit.test_reconcile import META, NOW, cond, spec
from zimage_operator.reconcile import admit
from zimage_operator.variants import refusal
from zimage_queue import GenerationParams
from zimage_queue.message import MAX_REFERENCE_IMAGES, OMNI_VARIANTS, VARIANT_DEFAULTS, variant_help
from zimage_worker.engine import batch_key

IMG = "s3://bucket/in.png"
REFS = [f"s3://bucket/ref{i}.png" for i in range(MAX_REFERENCE_IMAGES)]


def model(variant: str, **kw: Any) -> dict[str, Any]:
    return {"spec": {"model": {"source": "tiny-random", "variant": variant}, **kw}}


def edit(**kw: Any) -> dict[str, Any]:
    return spec(task="edit", inputImage=IMG, **kw)


@pytest.mark.parametrize(
    ("variant", "job", "refused"),
    [
        ("turbo", spec(), None),
        ("turbo", edit(), "spec.task: the turbo variant does text-to-image, image-to-image and inpaint, not edit"),
        ("base", spec(task="image-to-image", inputImage=IMG), None),
        ("edit", edit(), None),
        ("edit", spec(), "spec.task: the edit variant does edit, not text-to-image"),
        ("edit", edit(referenceImages=REFS[:1]), "spec.referenceImages: the edit variant takes none, got 1"),
        ("omni", spec(), None),
        ("omni", edit(referenceImages=REFS), None),
        ("omni", spec(task="inpaint", inputImage=IMG, maskImage=IMG), "the omni variant does text-to-image and edit"),
    ],
)
def test_admission_refuses_what_the_variant_cannot_do(variant: str, job: dict[str, Any], refused: str | None) -> None:
    d = admit(spec=job, status={}, meta=META, model=model(variant), now=NOW)
    if refused is None:
        assert d.action == "enqueue" and d.message is not None
        steps = VARIANT_DEFAULTS[variant].steps
        assert d.message.params.steps == steps and d.patch["steps"] == steps
        assert d.message.params.reference_images == job.get("referenceImages")
    else:
        assert d.action == "fail" and d.message is None
        failed = cond(d.patch, "Failed")
        assert failed["reason"] == "UnsupportedTask"
        assert refused in failed["message"] and "(ModelDeployment z-image-turbo)" in failed["message"]


def test_other_backends_are_not_judged_by_a_variant() -> None:
    params = GenerationParams(task="edit", prompt="x", input_image=IMG)
    assert refusal(params, "m", {"backend": "remote", "model": {"variant": "turbo"}}) is None
    assert refusal(params, "m", {"model": {"variant": "turbo"}}) is not None  # diffusers is the default backend
    assert refusal(params, "m", {"model": {"variant": "omni-2"}}) is None  # newer than this release: workers judge


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"task": "edit"}, "spec.inputImage: required when task is edit"),
        ({"task": "edit", "input_image": IMG, "mask_image": IMG}, "spec.maskImage: only allowed for inpaint"),
        ({"task": "image-to-image", "input_image": IMG, "reference_images": REFS[:1]}, "spec.referenceImages"),
        ({"task": "edit", "input_image": IMG, "strength": 0.5}, "spec.strength: only for image-to-image and inpaint"),
        ({"task": "text-to-image", "input_image": IMG}, "spec.inputImage/maskImage: only allowed for image-to-image"),
    ],
)
def test_edit_jobs_need_their_image_and_nothing_that_does_not_apply(fields: dict[str, Any], error: str) -> None:
    errors = GenerationParams(prompt="x", **fields).cross_field_errors()
    assert any(e.startswith(error) for e in errors), errors


def test_reference_images_are_bounded_uris_on_the_wire_only_when_set() -> None:
    with pytest.raises(ValidationError):
        GenerationParams(prompt="x", task="edit", input_image=IMG, reference_images=[*REFS, IMG])
    with pytest.raises(ValidationError):
        GenerationParams(prompt="x", task="edit", input_image=IMG, reference_images=["/etc/passwd"])
    assert "referenceImages" not in GenerationParams(prompt="x").wire()
    both = GenerationParams(prompt="x", task="edit", input_image=IMG, reference_images=REFS[:2])
    assert both.wire()["referenceImages"] == REFS[:2]
    # an older reader ignores the field (extra="ignore"); this release reads it back unchanged
    assert GenerationParams.model_validate(both.wire()) == both


def test_omni_jobs_do_not_share_a_pipeline_call() -> None:
    plain = GenerationParams(prompt="x", steps=4, seed=1)
    assert batch_key(plain, "turbo") is not None
    for variant in OMNI_VARIANTS:
        assert batch_key(plain, variant) is None  # the omni pipeline runs one job's images per call


def test_the_crd_and_the_schema_state_what_each_variant_accepts() -> None:
    from tests.unit.test_contracts import REPO

    md = yaml.safe_load((REPO / "crds" / "modeldeployment.yaml").read_text())
    props = md["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    variant = props["model"]["properties"]["variant"]
    assert variant["enum"] == list(VARIANT_DEFAULTS)
    assert " ".join(variant["description"].split()).endswith(variant_help() + ".")
    ij = yaml.safe_load((REPO / "crds" / "imagejob.yaml").read_text())
    task = ij["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["task"]
    assert "omni: text-to-image, edit" in " ".join(task["description"].split())
