"""The generation engines, on the tiny random-weight Z-Image pipeline (CPU, offline, a few seconds)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("diffusers")

import numpy as np
import torch
from PIL import Image

from zimage_queue import GenerationParams
from zimage_worker.diffusers_engine import DiffusersEngine, denoising_schedule
from zimage_worker.engine import Cancelled, NoopEngine, Request, batch_key, load_engine, resolve_source
from zimage_worker.tiny import build_tiny_pipeline

SIZE = 64


@pytest.fixture(scope="module")
def engine() -> DiffusersEngine:
    return DiffusersEngine("tiny-random", device="cpu")


@pytest.fixture
def forwards(engine: DiffusersEngine) -> Iterator[list[int]]:
    """Counts transformer forward passes during the test."""
    calls: list[int] = []
    handle = engine.text_to_image.transformer.register_forward_hook(lambda *_: calls.append(1))
    yield calls
    handle.remove()


def params(**overrides: Any) -> GenerationParams:
    values: dict[str, Any] = {
        "prompt": "a lighthouse at dusk",
        "width": SIZE,
        "height": SIZE,
        "steps": 2,
        "seed": 7,
    }
    values.update(overrides)
    return GenerationParams(**values)


def run(
    engine: DiffusersEngine | NoopEngine,
    p: GenerationParams,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    load_image: Callable[[str], bytes] = lambda uri: pytest.fail(f"unexpected load_image({uri})"),
) -> tuple[list[Image.Image], list[tuple[int, int]]]:
    progress: list[tuple[int, int]] = []
    images = engine.generate(
        p,
        on_step=lambda step, total: progress.append((step, total)),
        should_stop=should_stop,
        load_image=load_image,
    )
    return images, progress


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_tiny_pipeline_output_is_finite_and_decodable() -> None:
    pipe: Any = build_tiny_pipeline()
    generator = torch.Generator().manual_seed(0)
    out = pipe(
        "a cat",
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=generator,
        output_type="np",
    ).images
    assert out.shape == (1, SIZE, SIZE, 3)
    assert np.isfinite(out).all()
    assert out.std() > 0  # not a blank image

    image = Image.fromarray((out[0] * 255).round().astype(np.uint8))
    decoded = Image.open(io.BytesIO(png(image)))
    assert decoded.size == (SIZE, SIZE)


def test_tiny_pipeline_is_deterministic_for_a_seed() -> None:
    def weights(pipe: Any) -> list[torch.Tensor]:
        return [t for model in (pipe.transformer, pipe.vae, pipe.text_encoder) for t in model.state_dict().values()]

    before = torch.random.get_rng_state()
    same, again, other = (weights(build_tiny_pipeline(seed)) for seed in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is left alone
    assert all(torch.equal(x, y) for x, y in zip(same, again, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(same, other, strict=True))


def test_same_seed_same_image_and_other_seed_differs(engine: DiffusersEngine) -> None:
    (first,), _ = run(engine, params(seed=11))
    (again,), _ = run(engine, params(seed=11))
    (other,), _ = run(engine, params(seed=12))
    assert first.size == (SIZE, SIZE) and first.mode == "RGB"
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


def test_each_image_of_a_job_is_reproducible_alone(engine: DiffusersEngine) -> None:
    images, _ = run(engine, params(seed=20, num_images=2))
    (second,), _ = run(engine, params(seed=21))
    assert len(images) == 2
    assert np.array_equal(pixels(images[1]), pixels(second))
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))


def test_steps_are_transformer_evaluations(engine: DiffusersEngine, forwards: list[int]) -> None:
    _, progress = run(engine, params(steps=8))
    assert len(forwards) == 8
    assert progress == [(step, 8) for step in range(1, 9)]


def test_images_of_a_job_run_as_one_batch_and_progress_counts_them_all(
    engine: DiffusersEngine, forwards: list[int]
) -> None:
    _, progress = run(engine, params(steps=3, num_images=2))
    assert progress == [(2, 6), (4, 6), (6, 6)]
    assert len(forwards) == 3  # one batched transformer call per step, not one per image


def request(
    p: GenerationParams, progress: list[tuple[int, int]] | None = None, stop: Callable[[], bool] | None = None
) -> Request:
    return Request(
        p,
        on_step=lambda step, total: progress.append((step, total)) if progress is not None else None,
        should_stop=stop or (lambda: False),
        load_image=lambda uri: pytest.fail(f"unexpected load_image({uri})"),
    )


def test_a_seed_gives_the_same_image_batched_and_alone(engine: DiffusersEngine, forwards: list[int]) -> None:
    jobs = [
        params(prompt="a lighthouse at dusk", seed=3),
        params(prompt="a red fox in snow", seed=40, num_images=2),
        params(prompt="a bowl of ramen", seed=3),  # the same seed as the first, another prompt
        params(prompt="a lighthouse at dusk", seed=1234),
    ]
    batched = engine.generate_batch([request(p) for p in jobs])
    assert len(forwards) == 2  # 5 images, 2 steps: one call per step
    for p, images in zip(jobs, batched, strict=True):
        alone, _ = run(engine, p)
        assert images is not None and len(images) == p.num_images
        for got, want in zip(images, alone, strict=True):
            diff = np.abs(pixels(got) - pixels(want))
            assert diff.max() <= 2 and diff.mean() < 0.05, (p.prompt, p.seed, diff.max(), diff.mean())
    assert not np.array_equal(pixels(batched[0][0]), pixels(batched[2][0]))  # type: ignore[index]


def test_a_job_stopped_mid_batch_is_dropped_and_the_others_finish(engine: DiffusersEngine) -> None:
    progress: list[tuple[int, int]] = []
    jobs = [params(seed=1, steps=3), params(seed=2, steps=3, num_images=2)]
    first, second = engine.generate_batch([request(jobs[0], stop=lambda: True), request(jobs[1], progress)])
    assert first is None and second is not None and len(second) == 2
    assert progress == [(2, 6), (4, 6), (6, 6)]
    with pytest.raises(Cancelled):
        engine.generate_batch([request(p, stop=lambda: True) for p in jobs])


def test_only_compatible_text_to_image_jobs_share_a_batch(engine: DiffusersEngine) -> None:
    base = params()
    assert batch_key(base, "turbo") == batch_key(params(prompt="other", seed=99, num_images=3), "turbo")
    assert batch_key(params(steps=None), "turbo") == batch_key(params(steps=8, guidance_scale=0.0), "turbo")  # defaults
    for other in (params(width=128), params(steps=4), params(guidance_scale=2.0)):
        assert batch_key(other, "turbo") != batch_key(base, "turbo")
    # The negative prompt matters only with guidance on.
    assert batch_key(params(negative_prompt="fog"), "turbo") == batch_key(base, "turbo")
    assert batch_key(params(guidance_scale=3.0, negative_prompt="fog"), "turbo") != batch_key(
        params(guidance_scale=3.0), "turbo"
    )
    assert batch_key(params(task="image-to-image", input_image="s3://b/k.png"), "turbo") is None
    with pytest.raises(ValueError):
        engine.generate_batch([request(base), request(params(width=128))])


def test_guidance_and_negative_prompt_change_the_image(engine: DiffusersEngine) -> None:
    (plain,), _ = run(engine, params(guidance_scale=0.0))
    (guided,), _ = run(engine, params(guidance_scale=4.0, negative_prompt="fog"))
    assert not np.array_equal(pixels(plain), pixels(guided))


def test_denoising_schedule_matches_the_pipeline_default() -> None:
    assert denoising_schedule(1) == (1, [1.0])
    num_inference_steps, sigmas = denoising_schedule(8)
    assert num_inference_steps == 8 and len(sigmas) == 8 and sigmas[0] == 1.0 and sigmas[-1] > 0
    from diffusers.pipelines.z_image import pipeline_z_image

    default = getattr(pipeline_z_image, "get_default_z_image_sigmas", None)
    if default is not None:  # diffusers >= 0.39
        assert default(8) == sigmas


def test_image_pipelines_share_the_weights(engine: DiffusersEngine) -> None:
    base = engine.text_to_image
    for derived in (engine.image_to_image, engine.inpaint):
        for component in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
            assert getattr(derived, component) is getattr(base, component)
        first = next(iter(derived.transformer.parameters()))
        assert first.data_ptr() == next(iter(base.transformer.parameters())).data_ptr()
    assert base.vae.use_slicing  # a batch decodes image by image


def test_from_pipe_keeps_the_loaded_dtype() -> None:
    half = DiffusersEngine("tiny-random", device="cpu", dtype="bfloat16")
    for pipe in (half.text_to_image, half.image_to_image, half.inpaint):
        assert pipe.transformer.dtype == torch.bfloat16


def test_image_to_image(engine: DiffusersEngine, forwards: list[int]) -> None:
    (source,), _ = run(engine, params(seed=3))
    uris: list[str] = []

    def load(uri: str) -> bytes:
        uris.append(uri)
        return png(source)

    p = params(task="image-to-image", input_image="s3://b/in.png", width=96, height=SIZE, steps=8)
    forwards.clear()
    (image,), progress = run(engine, p, load_image=load)
    assert uris == ["s3://b/in.png"]
    assert image.size == (96, SIZE)
    # Default strength 0.6 skips int(8 * 0.4) = 3 of the 8 sigmas.
    assert len(forwards) == 5
    assert progress[-1] == (5, 5)


def test_inpaint(engine: DiffusersEngine) -> None:
    (source,), _ = run(engine, params(seed=4))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    files = {"file:///in.png": png(source), "file:///mask.png": png(mask)}
    p = params(task="inpaint", input_image="file:///in.png", mask_image="file:///mask.png", height=96)
    (image,), progress = run(engine, p, load_image=files.__getitem__)
    assert image.size == (SIZE, 96)
    assert progress == [(1, 2), (2, 2)]  # strength 1.0: every step


def test_should_stop_cancels_between_steps(engine: DiffusersEngine, forwards: list[int]) -> None:
    progress: list[tuple[int, int]] = []
    with pytest.raises(Cancelled):
        engine.generate(
            params(steps=4, num_images=2),
            on_step=lambda step, total: progress.append((step, total)),
            should_stop=lambda: len(progress) >= 1,
            load_image=lambda uri: b"",
        )
    assert progress == [(2, 8)]  # both images advance together
    assert len(forwards) == 1


def test_noop_engine() -> None:
    engine = NoopEngine()
    images, progress = run(engine, params(width=80, height=SIZE, num_images=3, steps=4, seed=1))
    assert [image.size for image in images] == [(80, SIZE)] * 3
    assert progress == [(step, 12) for step in range(1, 13)]
    assert len({image.getpixel((0, 0)) for image in images}) == 3

    with pytest.raises(Cancelled):
        run(engine, params(), should_stop=lambda: True)


def test_load_engine_noop_needs_no_model() -> None:
    engine = load_engine("noop")
    assert isinstance(engine, NoopEngine)
    (image,), progress = run(engine, params(steps=None))
    assert len(progress) == 8  # Turbo default
    assert image.size == (SIZE, SIZE)


def test_resolve_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    (models / "Tongyi-MAI" / "Z-Image-Turbo").mkdir(parents=True)
    (models / "local").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    assert resolve_source("Tongyi-MAI/Z-Image-Turbo", str(models)) == str(models / "Tongyi-MAI" / "Z-Image-Turbo")
    assert resolve_source("local", str(models)) == str(models / "local")
    assert resolve_source(str(elsewhere), str(models)) == str(elsewhere)
    assert resolve_source("Tongyi-MAI/Z-Image", str(models)) == "Tongyi-MAI/Z-Image"
    assert resolve_source("Tongyi-MAI/Z-Image-Turbo", None) == "Tongyi-MAI/Z-Image-Turbo"
    assert resolve_source("tiny-random", str(models)) == "tiny-random"
    with pytest.raises(ValueError):
        resolve_source("not a model", str(models))
    # models/../elsewhere exists, but names must not climb out of the models directory.
    monkeypatch.chdir(models / "local")
    with pytest.raises(ValueError):
        resolve_source("../elsewhere", str(models))


def test_full_size_random_pipeline_has_z_image_turbo_shapes() -> None:
    """The GPU benchmark's model, built on the meta device (no memory): a 6.15B-parameter transformer with the
    released config, a Qwen3-4B-shaped text encoder and the Flux VAE, in bfloat16."""
    from zimage_worker.tiny import build_full_size_pipeline

    pipe = build_full_size_pipeline("meta", "bfloat16")
    count = {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in ("transformer", "text_encoder", "vae")}
    assert 6.1e9 < count["transformer"] < 6.2e9
    assert 3.6e9 < count["text_encoder"] < 4.1e9  # Qwen3-4B less most of its 151936-token embedding
    assert 8e7 < count["vae"] < 9e7
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    assert pipe.transformer.config.dim == 3840 and pipe.transformer.config.n_layers == 30


def test_attention_backend_is_applied_to_the_transformer() -> None:
    def backends(e: DiffusersEngine) -> set[str]:
        attention = [m for m in e.text_to_image.transformer.modules() if hasattr(m, "processor")]
        return {str(getattr(m.processor, "_attention_backend", None)) for m in attention}

    chosen = DiffusersEngine("tiny-random", device="cpu", attention_backend="native")
    assert backends(chosen) == {"AttentionBackendName.NATIVE"}
    assert backends(DiffusersEngine("tiny-random", device="cpu")) == {"None"}  # diffusers' default dispatch
    (image,), _ = run(chosen, params())
    assert image.size == (SIZE, SIZE)


@pytest.mark.slow  # inductor compiles the block on the CPU: about a minute
def test_compiled_transformer_blocks_give_the_eager_image(engine: DiffusersEngine) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled = DiffusersEngine("tiny-random", device="cpu", compile=True)
    (image,), progress = run(compiled, params())
    # Regional compilation: dynamo traced the repeated block (one graph, no breaks under fullgraph=True).
    assert counters["stats"]["unique_graphs"] >= 1
    assert progress[-1] == (2, 2)
    (eager,), _ = run(engine, params())
    assert np.abs(pixels(image) - pixels(eager)).max() <= 2
