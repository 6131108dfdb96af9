"""Variants edit and omni on the real engine: diffusers' ZImageOmniPipeline built offline at the tiny size
(``build_tiny_omni_pipeline``), on the CPU. Pixels tell that the reference images condition the output (a
different input image, one more reference image, change it), that seeds reproduce, and that the engine refuses
what the variant does not do instead of guessing."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from zimage_queue import GenerationParams
from zimage_worker.diffusers_engine import DiffusersEngine
from zimage_worker.engine import Cancelled, load_engine

pytest.importorskip("transformers")


def png(colour: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> bytes:
    """A picture with structure (a colour block on a gradient), so its SigLIP and VAE encodings are not flat."""
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    image.paste(colour, (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


IMAGES = {
    "s3://b/red.png": png((220, 30, 30)),
    "s3://b/blue.png": png((20, 40, 230)),
    "s3://b/big.png": png((30, 200, 60), size=(1280, 1024)),  # over 1024x1024: the pipeline scales it down
}


@pytest.fixture(scope="module")
def omni() -> DiffusersEngine:
    return DiffusersEngine("tiny-random", variant="omni", device="cpu")


@pytest.fixture(scope="module")
def edit() -> DiffusersEngine:
    engine = load_engine("tiny-random", variant="edit", device="cpu")
    assert isinstance(engine, DiffusersEngine)
    return engine


def params(**kw: Any) -> GenerationParams:
    values: dict[str, Any] = {"prompt": "make it blue", "width": 64, "height": 64, "steps": 3, "seed": 7, **kw}
    return GenerationParams(**values)


def run(engine: DiffusersEngine, p: GenerationParams, steps: list[tuple[int, int]] | None = None) -> np.ndarray:
    images = engine.generate(
        p,
        on_step=lambda s, t: steps.append((s, t)) if steps is not None else None,
        should_stop=lambda: False,
        load_image=IMAGES.__getitem__,
    )
    assert all(im.size == (p.width, p.height) for im in images)
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def moved(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.abs(x - y).mean())


def test_edit_variant_edits_its_input_image(edit: DiffusersEngine) -> None:
    assert edit.omni is not None and edit.text_to_image is None  # one omni pipeline, no text-to-image one
    steps: list[tuple[int, int]] = []
    red = run(edit, params(task="edit", input_image="s3://b/red.png", width=96, height=64), steps)
    assert red.shape == (1, 64, 96, 3)
    assert steps == [(1, 3), (2, 3), (3, 3)]
    again = run(edit, params(task="edit", input_image="s3://b/red.png", width=96, height=64))
    assert moved(red, again) == 0  # the seed reproduces the edit
    blue = run(edit, params(task="edit", input_image="s3://b/blue.png", width=96, height=64))
    assert moved(red, blue) > 0.5  # the input image conditions the output
    other_seed = run(edit, params(task="edit", input_image="s3://b/red.png", width=96, height=64, seed=8))
    assert moved(red, other_seed) > 0.5


def test_edit_variant_refuses_what_it_does_not_do(edit: DiffusersEngine) -> None:
    with pytest.raises(ValueError, match="the edit variant does edit, not text-to-image"):
        run(edit, params())
    with pytest.raises(ValueError, match="takes none, got 1"):
        run(edit, params(task="edit", input_image="s3://b/red.png", reference_images=["s3://b/blue.png"]))


def test_omni_conditions_on_every_reference_image(omni: DiffusersEngine) -> None:
    one = run(omni, params(task="edit", input_image="s3://b/red.png"))
    two = run(omni, params(task="edit", input_image="s3://b/red.png", reference_images=["s3://b/blue.png"]))
    assert moved(one, two) > 0.5
    three = run(
        omni,
        params(task="edit", input_image="s3://b/red.png", reference_images=["s3://b/blue.png", "s3://b/big.png"]),
    )
    assert moved(two, three) > 0.5 and three.shape == (1, 64, 64, 3)


def test_omni_makes_images_from_text_alone_each_seeded_in_turn(omni: DiffusersEngine) -> None:
    steps: list[tuple[int, int]] = []
    both = run(omni, params(num_images=2, guidance_scale=2.0, negative_prompt="red"), steps)
    assert both.shape == (2, 64, 64, 3) and steps[-1] == (6, 6)
    second = run(omni, params(seed=8, guidance_scale=2.0, negative_prompt="red"))
    assert moved(both[1:], second) == 0  # image i of a job is seed + i, alone
    edited = run(omni, params(task="edit", input_image="s3://b/red.png"))
    assert moved(run(omni, params()), edited) > 0.5


def test_an_omni_job_can_be_cancelled_between_steps(omni: DiffusersEngine) -> None:
    seen: list[int] = []
    with pytest.raises(Cancelled):
        omni.generate(
            params(task="edit", input_image="s3://b/red.png", steps=5),
            on_step=lambda s, t: seen.append(s),
            should_stop=lambda: len(seen) >= 2,
            load_image=IMAGES.__getitem__,
        )
    assert seen == [1, 2]


def test_lora_adapters_apply_to_omni_edits(tmp_path: Any) -> None:
    pytest.importorskip("peft")
    from zimage_queue.message import AdapterSpec, LoraRef
    from zimage_worker.tiny import TINY_SIGLIP, TINY_TRANSFORMER, build_tiny_lora

    build_tiny_lora(
        tmp_path / "ink", seed=1, transformer={**TINY_TRANSFORMER, "siglip_feat_dim": TINY_SIGLIP["hidden_size"]}
    )
    engine = DiffusersEngine(
        "tiny-random", variant="omni", device="cpu", adapters=[AdapterSpec(name="ink", source=str(tmp_path / "ink"))]
    )
    job = {"task": "edit", "input_image": "s3://b/red.png"}
    plain = run(engine, params(**job))
    assert moved(run(engine, params(**job, loras=[LoraRef(name="ink", scale=0.0)])), plain) == 0
    assert moved(run(engine, params(**job, loras=[LoraRef(name="ink", scale=1.0)])), plain) > 0.5
    assert moved(run(engine, params(**job)), plain) == 0  # nothing of the adapter stays behind
