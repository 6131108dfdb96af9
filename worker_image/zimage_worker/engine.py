"""The worker's view of an image generator: one ``generate`` call per job, progress per denoising step.

This module imports neither torch nor diffusers, so the queue side of the worker, the benchmarks (with
``NoopEngine``) and the tests can use it on machines without them. The real engine lives in
``zimage_worker.diffusers_engine`` and is imported only when ``load_engine`` needs it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

from zimage_queue.message import OMNI_VARIANTS, VARIANT_DEFAULTS

if TYPE_CHECKING:
    from PIL import Image

    from zimage_queue import GenerationParams
    from zimage_queue.message import AdapterSpec

NOOP = "noop"
TINY_RANDOM = "tiny-random"
FULL_RANDOM = "full-random"  # Z-Image-Turbo's full-size architecture with random weights (GPU benchmarks)
VARIANTS = tuple(VARIANT_DEFAULTS)


# owner/name as the Hugging Face Hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class Cancelled(Exception):
    """Generation was stopped between denoising steps because ``should_stop()`` returned true."""


class UnknownAdapter(ValueError):
    """The job names a LoRA adapter this worker does not serve (not in its ZIMAGE_ADAPTERS): retrying cannot help."""


# A job's LoRA adapters with their scales resolved, sorted by name: () is the base model.
AdapterSet = tuple[tuple[str, float], ...]


def adapter_set(params: GenerationParams, default_scales: Mapping[str, float] | None = None) -> AdapterSet:
    """The adapters ``params`` asks for, each at its scale: the job's own, else the adapter's ``defaultScale``
    (``default_scales``, from the deployment's spec.adapters), else 1. Names the worker does not know keep the
    job's scale or 1 here; the engine refuses them when the job runs (``UnknownAdapter``)."""
    defaults = default_scales or {}
    return tuple(
        sorted(
            (lora.name, float(lora.scale) if lora.scale is not None else float(defaults.get(lora.name, 1.0)))
            for lora in params.loras or []
        )
    )


def default_scales(adapters: Sequence[AdapterSpec]) -> dict[str, float]:
    return {a.name: a.default_scale for a in adapters}


@dataclass
class Request:
    """One job in a batch: its parameters and its own progress, cancellation and input callbacks."""

    params: GenerationParams
    on_step: Callable[[int, int], None]
    should_stop: Callable[[], bool]
    load_image: Callable[[str], bytes]


def batch_key(
    params: GenerationParams, variant: str, default_scales: Mapping[str, float] | None = None
) -> Hashable | None:
    """Jobs with equal keys can share one pipeline call; ``None``: the job runs alone.

    Only text-to-image batches: the image tasks carry an input image per job. Prompts and seeds may differ
    (one prompt embedding and one generator per image); size, steps and guidance may not, and the negative
    prompt only matters (and so must match) when guidance is on. LoRA adapters apply to the whole call, so
    the job's adapter set with its resolved scales (``adapter_set``) must match too.
    """
    if params.task != "text-to-image" or variant in OMNI_VARIANTS:  # omni: one call per image (its own encoding)
        return None
    steps, guidance = params.steps_and_guidance(VARIANT_DEFAULTS[variant])
    return (
        params.width,
        params.height,
        steps,
        guidance,
        params.negative_prompt if guidance > 0 else None,
        adapter_set(params, default_scales),
    )


def engine_scales(engine: object) -> Mapping[str, float]:
    """The default scales of the adapters ``engine`` serves (an ``AdapterEngine``); none for other engines."""
    scales: Mapping[str, float] = getattr(engine, "adapter_scales", None) or {}
    return scales


class Engine(Protocol):
    name: str
    variant: str

    def generate(
        self,
        params: GenerationParams,
        *,
        on_step: Callable[[int, int], None],
        should_stop: Callable[[], bool],
        load_image: Callable[[str], bytes],
    ) -> list[Image.Image]:
        """Generate ``params.num_images`` images.

        ``on_step(step, total)`` is called after every denoising step, ``step`` counting from 1 up to
        ``total`` over all images of the job. ``should_stop()`` is polled between steps; when it returns true
        the engine raises ``Cancelled``. ``load_image(uri)`` returns the encoded bytes of an input or mask
        image.
        """
        ...


class AdapterEngine(Engine, Protocol):
    """An engine that applies a job's LoRA adapters (``params.loras``); other engines ignore them."""

    adapter_scales: Mapping[str, float]  # the default scale of each adapter it serves, by name

    def active_adapters(self) -> AdapterSet:
        """The adapter set the last pipeline call ran with (() for the base model)."""
        ...

    def resident_adapters(self) -> list[str]:
        """The adapters loaded now, least recently used first."""
        ...


def adapter_engine(engine: object) -> AdapterEngine | None:
    """``engine`` as an ``AdapterEngine`` when it is one (it applies adapters), else None."""
    return cast("AdapterEngine", engine) if hasattr(engine, "active_adapters") else None


class BatchEngine(Engine, Protocol):
    def generate_batch(self, requests: list[Request]) -> list[list[Image.Image] | None]:
        """One pipeline call for requests with equal ``batch_key``: the images of each request, in order, or
        ``None`` for a request whose ``should_stop()`` turned true while the others ran on. Raises
        ``Cancelled`` when every request is stopped. Each image gets its own generator (seed, seed + 1, ...),
        so a job's images are the ones it would get alone, within floating-point tolerance."""
        ...


class NoopEngine:
    """Solid-colour images without a model: for benchmarks of the queue path and fast tests.

    It goes through the same motions as a real engine (progress for every step, cancellation between steps,
    input images fetched) so callers exercise the same code paths, but it never sleeps.
    """

    name = NOOP

    def __init__(self, variant: str = "turbo") -> None:
        if variant not in VARIANT_DEFAULTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        self.variant = variant
        self.load_seconds = 0.0

    def generate(
        self,
        params: GenerationParams,
        *,
        on_step: Callable[[int, int], None],
        should_stop: Callable[[], bool],
        load_image: Callable[[str], bytes],
    ) -> list[Image.Image]:
        from PIL import Image

        # Fetch inputs anyway so storage errors surface here just as they would with a real model.
        for uri in (params.input_image, params.mask_image):
            if uri:
                load_image(uri)
        steps, _ = params.steps_and_guidance(VARIANT_DEFAULTS[self.variant])
        total = steps * params.num_images
        images = []
        for index in range(params.num_images):
            for step in range(1, steps + 1):
                if should_stop():
                    raise Cancelled()
                on_step(index * steps + step, total)
            images.append(Image.new("RGB", (params.width, params.height), _seed_colour((params.seed or 0) + index)))
        return images

    def generate_batch(self, requests: list[Request]) -> list[list[Image.Image] | None]:
        out: list[list[Image.Image] | None] = []
        for r in requests:
            try:
                out.append(
                    self.generate(r.params, on_step=r.on_step, should_stop=r.should_stop, load_image=r.load_image)
                )
            except Cancelled:
                out.append(None)
        if all(o is None for o in out):
            raise Cancelled()
        return out


def _seed_colour(seed: int) -> tuple[int, int, int]:
    # A multiplicative hash spreads neighbouring seeds over visibly different colours.
    mixed = (seed * 2654435761) & 0xFFFFFF
    return (mixed >> 16) & 0xFF, (mixed >> 8) & 0xFF, mixed & 0xFF


def warm_up(engine: Engine, size: int, batch: int = 1, steps: int = 2) -> float:
    """Throwaway generations before the worker reports ready: one image, then one full batch. CUDA context,
    kernels, cuDNN autotuning, compiled graphs and the allocator's pools are set up here, on nobody's job.
    Returns the seconds it took."""
    import time

    from zimage_queue import GenerationParams

    started = time.perf_counter()
    params = GenerationParams(prompt="warm-up", width=size, height=size, steps=steps, seed=0)
    kw = {"on_step": lambda step, total: None, "should_stop": lambda: False, "load_image": lambda uri: b""}
    engine.generate(params, **kw)  # type: ignore[arg-type]
    if batch > 1 and hasattr(engine, "generate_batch"):
        engine.generate_batch([Request(params.model_copy(update={"seed": i}), **kw) for i in range(batch)])  # type: ignore[arg-type]
    return time.perf_counter() - started


def resolve_source(name_or_path: str, models_dir: str | None) -> str:
    """Turn a model reference into something ``load_engine`` can load, checking in this order:

    1. ``MODELS_DIR/<name>`` when that directory exists (a pre-downloaded model on a volume; a hub id such as
       ``Tongyi-MAI/Z-Image-Turbo`` maps to the nested directory of the same name). Names that would escape
       ``models_dir`` (``..``) are not looked up there.
    2. ``name_or_path`` itself when it is an existing local directory.
    3. ``name_or_path`` unchanged when it looks like a Hub repository id (``owner/name``).
    4. The built-in names ``tiny-random`` (random tiny weights, offline), ``full-random`` (the full-size
       architecture with random weights, for GPU benchmarks) and ``noop`` (no model).

    Anything else raises ``ValueError``: a typo in a path should fail at startup, not as a Hub download error.
    """
    if models_dir:
        root = Path(models_dir).resolve()
        candidate = (root / name_or_path).resolve()
        if candidate.is_relative_to(root) and candidate != root and candidate.is_dir():
            return str(candidate)
    if Path(name_or_path).is_dir():
        return name_or_path
    if _HUB_ID.match(name_or_path):
        return name_or_path
    if name_or_path in (TINY_RANDOM, FULL_RANDOM, NOOP):
        return name_or_path
    where = f" or in {models_dir}" if models_dir else ""
    raise ValueError(
        f"model {name_or_path!r} is neither a directory{where}, a Hub id (owner/name), {TINY_RANDOM!r} nor {NOOP!r}"
    )


def load_engine(
    source: str,
    *,
    variant: str = "turbo",
    device: str | None = None,
    dtype: str = "auto",
    models_dir: str | None = None,
    revision: str | None = None,
    compile: bool = False,
    attention_backend: str | None = None,
    adapters: Sequence[AdapterSpec] | None = None,
    max_resident_adapters: int = 4,
    adapter_cache_dir: str | None = None,
) -> Engine:
    """Load the engine for ``source`` (see ``resolve_source``); this is where model weights are read.

    ``adapters``: the LoRA adapters jobs may name (a ModelDeployment's spec.adapters), loaded on first use and
    kept loaded, up to ``max_resident_adapters`` of them (see ``zimage_worker.adapters``). The noop engine
    ignores them."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    resolved = resolve_source(source, models_dir)
    if resolved == NOOP:
        return NoopEngine(variant)
    from zimage_worker.diffusers_engine import DiffusersEngine

    return DiffusersEngine(
        resolved,
        variant=variant,
        device=device,
        dtype=dtype,
        revision=revision,
        compile=compile,
        attention_backend=attention_backend,
        adapters=adapters or (),
        max_resident_adapters=max_resident_adapters,
        models_dir=models_dir,
        adapter_cache_dir=adapter_cache_dir,
    )
