"""LoRA adapters on the real engine: the tiny random-weight pipeline on the CPU with tiny random LoRAs
(``build_tiny_lora``), so nothing is downloaded. Pixels tell whether an adapter applied, at which strength, and
that nothing of it stays behind for the next job."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("peft")

import numpy as np
from PIL import Image
from prometheus_client import REGISTRY

from zimage_queue import GenerationParams
from zimage_queue.message import AdapterSpec, LoraRef
from zimage_worker.diffusers_engine import DiffusersEngine
from zimage_worker.engine import Request, UnknownAdapter, batch_key
from zimage_worker.tiny import build_tiny_lora

NAMES = ("a", "b", "c", "d", "e")


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> list[AdapterSpec]:
    """Five tiny adapters: a..d from folders, e from a file:// URI (fetched into the cache); b defaults to 0.5."""
    root = tmp_path_factory.mktemp("loras")
    specs = []
    for seed, name in enumerate(NAMES):
        weights = build_tiny_lora(root / name, seed=seed)
        source = weights.as_uri() if name == "e" else str(root / name)
        specs.append(AdapterSpec(name=name, source=source, default_scale=0.5 if name == "b" else 1.0))
    return specs


@pytest.fixture(scope="module")
def engine(loras: list[AdapterSpec], tmp_path_factory: pytest.TempPathFactory) -> DiffusersEngine:
    cache = tmp_path_factory.mktemp("cache")
    return DiffusersEngine("tiny-random", device="cpu", adapters=loras, adapter_cache_dir=str(cache))


def params(loras: list[tuple[str, float | None]] | None = None, **kw: Any) -> GenerationParams:
    values: dict[str, Any] = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 3, "seed": 5, **kw}
    refs = None if loras is None else [LoraRef(name=n, scale=s) for n, s in loras]
    return GenerationParams(loras=refs, **values)


def pixels(engine: DiffusersEngine, p: GenerationParams, load_image: Any = None) -> np.ndarray:
    [image] = engine.generate(
        p, on_step=lambda s, t: None, should_stop=lambda: False, load_image=load_image or (lambda uri: b"")
    )
    return np.asarray(image, dtype=np.int16)


def moved(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.abs(x - y).mean())


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_an_adapter_changes_the_image_and_scale_zero_is_the_base(engine: DiffusersEngine) -> None:
    base = pixels(engine, params())
    with_a = pixels(engine, params([("a", 1.0)]))
    assert moved(with_a, base) > 2.0  # mean over 8-bit pixels
    assert "a" in engine.resident_adapters() and engine.active_adapters() == (("a", 1.0),)
    at_zero = pixels(engine, params([("a", 0.0)]))
    assert np.abs(at_zero - base).max() <= 1  # the base image, to rounding
    assert np.array_equal(pixels(engine, params([("a", 1.0)])), with_a)  # and back: deterministic


def test_a_larger_scale_moves_pixels_further(engine: DiffusersEngine) -> None:
    base = pixels(engine, params())
    distances = [moved(pixels(engine, params([("c", scale)])), base) for scale in (0.25, 0.5, 1.0, 2.0)]
    assert distances == sorted(distances) and distances[0] > 0.5, distances


def test_the_default_scale_is_the_adapters(engine: DiffusersEngine) -> None:
    assert np.array_equal(pixels(engine, params([("b", None)])), pixels(engine, params([("b", 0.5)])))
    assert not np.array_equal(pixels(engine, params([("b", None)])), pixels(engine, params([("b", 1.0)])))


def test_two_adapters_in_one_job(engine: DiffusersEngine) -> None:
    both = pixels(engine, params([("a", 1.0), ("b", 0.7)]))
    assert engine.active_adapters() == (("a", 1.0), ("b", 0.7))
    assert np.array_equal(pixels(engine, params([("b", 0.7), ("a", 1.0)])), both)  # order does not matter
    for alone in (params([("a", 1.0)]), params([("b", 0.7)])):
        assert moved(pixels(engine, alone), both) > 1.0
    # One of them at 0: the other alone.
    assert np.abs(pixels(engine, params([("a", 1.0), ("b", 0.0)])) - pixels(engine, params([("a", 1.0)]))).max() <= 1


def test_no_adapter_leaks_into_a_plain_job(engine: DiffusersEngine) -> None:
    before = pixels(engine, params())
    pixels(engine, params([("a", 2.0), ("d", 1.0)]))
    assert np.array_equal(pixels(engine, params()), before)
    pixels(engine, params([("d", 1.0)]))
    assert np.array_equal(pixels(engine, params()), before)
    assert engine.active_adapters() == ()


def test_image_to_image_shares_the_adapters(engine: DiffusersEngine) -> None:
    """The three pipelines share one transformer, so an adapter loaded through text-to-image applies to them."""
    assert engine.image_to_image.transformer is engine.text_to_image.transformer is engine.inpaint.transformer
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 120, 40)).save(buffer, "PNG")
    kw: dict[str, Any] = {"task": "image-to-image", "input_image": "s3://b/in.png", "strength": 0.9}
    load = lambda uri: buffer.getvalue()  # noqa: E731
    plain = pixels(engine, params(**kw), load)
    assert moved(pixels(engine, params([("a", 1.0)], **kw), load), plain) > 1.0
    assert np.array_equal(pixels(engine, params(**kw), load), plain)


def test_a_batch_of_one_adapter_set_matches_its_jobs_alone(engine: DiffusersEngine) -> None:
    jobs = [params([("a", 0.8)], seed=s, prompt=p) for s, p in [(1, "a fox"), (2, "a tram"), (3, "a bowl")]]
    keys = {batch_key(p, "turbo", engine.adapter_scales) for p in jobs}
    assert len(keys) == 1
    batch = engine.generate_batch([Request(p, lambda s, t: None, lambda: False, lambda u: b"") for p in jobs])
    for p, images in zip(jobs, batch, strict=True):
        assert images is not None
        assert np.abs(np.asarray(images[0], dtype=np.int16) - pixels(engine, p)).max() <= 2


def test_an_unknown_adapter_fails_clearly(engine: DiffusersEngine) -> None:
    with pytest.raises(UnknownAdapter, match=r"unknown adapter\(s\) nope: this worker serves a, b, c, d, e"):
        pixels(engine, params([("nope", 1.0)]))


def test_hot_swap_keeps_the_base_and_loads_each_adapter_once_while_resident(
    loras: list[AdapterSpec], tmp_path: Path
) -> None:
    model_loads = sample("zimage_worker_model_loads_total")
    engine = DiffusersEngine("tiny-random", device="cpu", adapters=loras, adapter_cache_dir=str(tmp_path))
    assert sample("zimage_worker_model_loads_total") == model_loads + 1
    loads = {n: sample("zimage_worker_adapter_loads_total", adapter=n) for n in NAMES}
    swaps = sample("zimage_worker_adapter_swap_seconds_count")

    first: dict[str, np.ndarray] = {}
    for _ in range(3):  # 12 jobs, switching adapter every job
        for name in "abcd":
            image = pixels(engine, params([(name, 1.0)]))
            assert np.array_equal(first.setdefault(name, image), image)
    assert sample("zimage_worker_model_loads_total") == model_loads + 1  # the base was never reloaded
    assert {n: sample("zimage_worker_adapter_loads_total", adapter=n) - loads[n] for n in NAMES} == {
        "a": 1,
        "b": 1,
        "c": 1,
        "d": 1,
        "e": 0,
    }
    assert sample("zimage_worker_adapter_swap_seconds_count") - swaps == 12
    assert engine.resident_adapters() == ["a", "b", "c", "d"]
    assert sample("zimage_worker_adapters_resident") == 4

    # A fifth evicts the least recently used (a); a comes back as it was, evicting b.
    pixels(engine, params([("e", 1.0)]))
    assert engine.resident_adapters() == ["b", "c", "d", "e"]
    assert np.array_equal(pixels(engine, params([("a", 1.0)])), first["a"])
    assert engine.resident_adapters() == ["c", "d", "e", "a"]
    assert sample("zimage_worker_adapter_loads_total", adapter="a") - loads["a"] == 2
    assert sample("zimage_worker_model_loads_total") == model_loads + 1
    assert engine.adapters.loads == 6
    # The same set again is no switch at all.
    swaps = sample("zimage_worker_adapter_swap_seconds_count")
    pixels(engine, params([("a", 1.0)], seed=9))
    assert sample("zimage_worker_adapter_swap_seconds_count") == swaps


def test_a_job_may_need_more_adapters_than_stay_resident(loras: list[AdapterSpec], tmp_path: Path) -> None:
    engine = DiffusersEngine(
        "tiny-random", device="cpu", adapters=loras, max_resident_adapters=2, adapter_cache_dir=str(tmp_path)
    )
    pixels(engine, params([("a", 1.0), ("b", 1.0), ("c", 1.0)]))
    assert sorted(engine.resident_adapters()) == ["a", "b", "c"]
    pixels(engine, params([("d", 1.0)]))
    assert engine.resident_adapters() == ["c", "d"]
