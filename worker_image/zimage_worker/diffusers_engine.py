"""The real engine: Z-Image through Hugging Face diffusers, loaded once per worker process."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline, ZImagePipeline
from PIL import Image

from zimage_queue.message import OMNI_VARIANTS, VARIANT_DEFAULTS
from zimage_worker import metrics
from zimage_worker.adapters import ResidentAdapters
from zimage_worker.engine import FULL_RANDOM, TINY_RANDOM, VARIANTS, AdapterSet, Cancelled, Request, batch_key

if TYPE_CHECKING:
    from zimage_queue import GenerationParams
    from zimage_queue.message import AdapterSpec

DEFAULT_IMG2IMG_STRENGTH = 0.6
DEFAULT_INPAINT_STRENGTH = 1.0

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA (what Z-Image is released in) and float32 elsewhere: CPU kernels for
    bfloat16 are slow or missing for some ops."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be auto or one of {', '.join(_DTYPES)}, got {dtype!r}") from None


def _dtype_kwarg() -> str:
    # diffusers renamed from_pretrained's `torch_dtype` to `dtype` (huggingface/diffusers#14205) and warns on
    # the old name; releases before that do not accept `dtype=`.
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def denoising_schedule(steps: int) -> tuple[int, list[float]]:
    """Map the user's ``steps`` (transformer evaluations) to the pipelines' ``(num_inference_steps, sigmas)``.

    The mapping is the identity: ``num_inference_steps = steps``, with an explicit sigma schedule
    ``linspace(1, 1/steps, steps)`` to which the scheduler appends the terminal sigma 0. Each of the ``steps``
    transformer evaluations then moves the latents by a non-zero Euler step.

    Why explicit sigmas: until diffusers 0.38 ZImagePipeline forced ``sigma_min = 0`` and spaced its default
    schedule ``linspace(1, 0, N)``, so the N-th evaluation ran at sigma 0 and its Euler update had ``dt = 0``.
    Turbo's "8 steps" therefore needed ``num_inference_steps=9`` there (9 forwards, 8 useful). Since
    diffusers 0.39 (huggingface/diffusers#13730) the default schedule is exactly the one above, so N steps are
    N useful evaluations and "8 then" equals "9 before". Passing the schedule ourselves gives the same
    meaning of ``steps`` on every diffusers this project allows, with results identical to the pipeline's
    own default on 0.39 and later. Image-to-image and inpainting start part way down this schedule: they
    skip the first ``int(steps * (1 - strength))`` sigmas (diffusers' rounding) and evaluate the rest.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    # torch.linspace rather than arithmetic here, so the floats are bit-identical to diffusers' default.
    return steps, torch.linspace(1.0, 1.0 / steps, steps).tolist()


class DiffusersEngine:
    """Z-Image text-to-image, image-to-image and inpainting from one set of weights.

    Not thread-safe: the three pipelines share one scheduler, whose state is set per call. A worker makes one
    pipeline call at a time (one job, or one batch of compatible jobs); only storing runs beside it.

    ``adapters``: the LoRA adapters jobs may name (``params.loras``), loaded into the shared transformer on first
    use and switched per call; up to ``max_resident_adapters`` stay loaded (``zimage_worker.adapters``).
    """

    def __init__(
        self,
        source: str,
        *,
        variant: str = "turbo",
        device: str | None = None,
        dtype: str = "auto",
        revision: str | None = None,
        compile: bool = False,
        attention_backend: str | None = None,
        adapters: Sequence[AdapterSpec] = (),
        max_resident_adapters: int = 4,
        models_dir: str | None = None,
        adapter_cache_dir: str | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        self.name = source
        self.variant = variant
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)

        # Any: diffusers' pipeline classes are too loosely typed for mypy to follow their attributes.
        pipe: Any
        started = time.perf_counter()
        omni = variant in OMNI_VARIANTS
        if source == TINY_RANDOM:
            from zimage_worker.tiny import build_tiny_omni_pipeline, build_tiny_pipeline

            pipe = build_tiny_omni_pipeline() if omni else build_tiny_pipeline()
            if self.dtype != torch.float32:
                pipe.to(dtype=self.dtype)
        elif source == FULL_RANDOM:
            if omni:
                raise ValueError(f"{FULL_RANDOM} is Z-Image-Turbo's architecture; it has no {variant} build")
            from zimage_worker.tiny import build_full_size_pipeline

            pipe = build_full_size_pipeline(str(self.device), str(self.dtype).removeprefix("torch."))
        else:
            loader: Any = ZImagePipeline
            if omni:  # imported only here: diffusers' omni module pulls in SigLIP2's image processor
                from zimage_worker.omni import OmniPipeline

                loader = OmniPipeline
            pipe = loader.from_pretrained(source, revision=revision, **{_dtype_kwarg(): self.dtype})
        pipe.to(self.device)
        # Decode a batch's latents one image at a time: the VAE's activations for 8 images at 1024x1024 would
        # rival the weights in memory, and the decode is a small share of the time.
        pipe.vae.enable_slicing()
        if attention_backend:  # e.g. "flash" or "_native_cudnn"; diffusers checks that the kernels exist
            pipe.transformer.set_attention_backend(attention_backend)
        if compile:
            # Regional compilation: the transformer block is compiled once and reused for all its repeats,
            # so compiling costs seconds, not minutes, and the warm-up run absorbs it.
            pipe.transformer.compile_repeated_blocks(fullgraph=True)
        # Variants edit and omni: one ZImageOmniPipeline for all their tasks; the others have no omni pipeline.
        self.omni: Any = pipe if omni else None
        self.text_to_image: Any = None if omni else pipe
        # The same module objects in all three pipelines, so the weights exist once. This is the core of
        # `from_pipe`, without its final cast: that defaults to float32, would upcast the shared bfloat16
        # modules in place unless told the dtype, and logs a misleading float32 warning per model even then.
        self.image_to_image: Any = None if omni else ZImageImg2ImgPipeline(**pipe.components)
        self.inpaint: Any = None if omni else ZImageInpaintPipeline(**pipe.components)
        each: Any
        for each in (self.omni, self.text_to_image, self.image_to_image, self.inpaint):
            if each is not None:
                each.set_progress_bar_config(disable=True)
        # LoRA layers go into the transformer these pipelines share: loading through one applies to all three.
        self.adapters = ResidentAdapters(
            pipe, adapters, max_resident=max_resident_adapters, models_dir=models_dir, cache_dir=adapter_cache_dir
        )
        self.adapter_scales = self.adapters.scales
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.load_seconds = time.perf_counter() - started
        metrics.MODEL_LOADS.inc()

    def active_adapters(self) -> AdapterSet:
        """See ``AdapterEngine``: the adapters (and scales) the last pipeline call ran with."""
        return self.adapters.active()

    def resident_adapters(self) -> list[str]:
        """See ``AdapterEngine``: the adapters loaded now, least recently used first."""
        return self.adapters.resident()

    def generate(
        self,
        params: GenerationParams,
        *,
        on_step: Callable[[int, int], None],
        should_stop: Callable[[], bool],
        load_image: Callable[[str], bytes],
    ) -> list[Image.Image]:
        """See ``Engine.generate``.

        Image ``i`` uses a generator seeded ``seed + i``, so any one image of a job can be reproduced alone
        (``num_images=1``, ``seed=seed+i``). A missing seed counts as 0: the operator resolves seeds before
        enqueueing, and an engine that picked one itself could not report it.
        """
        request = Request(params, on_step, should_stop, load_image)
        unsupported = params.variant_errors(self.variant)
        if unsupported:  # admission refuses these; a message that got here anyway fails, it is not guessed at
            raise ValueError("; ".join(unsupported))
        if self.omni is not None:
            return self._generate_omni(request)
        if params.task == "text-to-image":
            [images] = self.generate_batch([request])  # all images of the job in one call
            assert images is not None  # a lone request that stops raises Cancelled
            return images
        return self._generate_each(request)

    def generate_batch(self, requests: list[Request]) -> list[list[Image.Image] | None]:
        """See ``BatchEngine.generate_batch``: text-to-image requests with equal ``batch_key``, one row per image."""
        first = requests[0].params
        keys = {batch_key(r.params, self.variant, self.adapter_scales) for r in requests}
        if len(keys) != 1 or None in keys:
            raise ValueError("generate_batch takes text-to-image requests with equal batch_key only")
        self.adapters.activate(first.loras)  # equal keys: one adapter set for the whole call
        steps, guidance = first.steps_and_guidance(VARIANT_DEFAULTS[self.variant])
        num_inference_steps, sigmas = denoising_schedule(steps)
        rows = [(j, i) for j, r in enumerate(requests) for i in range(r.params.num_images)]
        stopped: set[int] = set()

        def step_end(pipeline: Any, index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            total = pipeline.num_timesteps
            for j, r in enumerate(requests):
                if j in stopped:
                    continue
                n = r.params.num_images
                r.on_step((index + 1) * n, total * n)
                if r.should_stop():
                    stopped.add(j)
            # Raising unwinds the pipeline before the VAE decode; a stopped job's rows are computed with
            # the rest (the batch cannot shrink mid-call) and dropped at the end.
            if len(stopped) == len(requests):
                raise Cancelled()
            return callback_kwargs

        with torch.inference_mode():
            embeds, negative = self.text_to_image.encode_prompt(
                prompt=[r.params.prompt for r in requests],
                negative_prompt=[r.params.negative_prompt or "" for r in requests] if guidance > 0 else None,
                do_classifier_free_guidance=guidance > 0,
                device=self.device,
            )
            seeds = [(requests[j].params.seed or 0) + i for j, i in rows]
            output = self.text_to_image(
                prompt_embeds=[embeds[j] for j, _ in rows],
                negative_prompt_embeds=[negative[j] for j, _ in rows] if guidance > 0 else None,
                height=first.height,
                width=first.width,
                num_inference_steps=num_inference_steps,
                sigmas=sigmas,
                guidance_scale=guidance,
                generator=[torch.Generator(device=self.device).manual_seed(s) for s in seeds],
                output_type="pt",
                callback_on_step_end=step_end,
            )
        images: list[list[Image.Image] | None] = [[] for _ in requests]
        for (j, _), image in zip(rows, _to_pil(output.images), strict=True):
            images[j].append(image)  # type: ignore[union-attr]
        return [None if j in stopped else each for j, each in enumerate(images)]

    def _generate_each(self, request: Request) -> list[Image.Image]:
        """Image-to-image and inpainting: one call per image, with the job's input image."""
        params, on_step, should_stop = request.params, request.on_step, request.should_stop
        steps, guidance = params.steps_and_guidance(VARIANT_DEFAULTS[self.variant])
        num_inference_steps, sigmas = denoising_schedule(steps)
        seed = params.seed if params.seed is not None else 0
        self.adapters.activate(params.loras)

        with torch.inference_mode():
            pipe, task_kwargs = self._pipeline_for(params, request.load_image)
            # The prompt is the same for every image: encode it once.
            prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
                prompt=params.prompt,
                negative_prompt=params.negative_prompt,
                do_classifier_free_guidance=guidance > 0,
                device=self.device,
            )
            done = 0
            images: list[Image.Image] = []

            def step_end(pipeline: Any, index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
                nonlocal done
                done += 1
                # Known only once the pipeline has applied strength to the schedule.
                on_step(done, pipeline.num_timesteps * params.num_images)
                if should_stop():
                    raise Cancelled()
                return callback_kwargs

            for index in range(params.num_images):
                if should_stop():
                    raise Cancelled()
                generator = torch.Generator(device=self.device).manual_seed(seed + index)
                output = pipe(
                    prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_prompt_embeds,
                    height=params.height,
                    width=params.width,
                    num_inference_steps=num_inference_steps,
                    sigmas=sigmas,
                    guidance_scale=guidance,
                    generator=generator,
                    output_type="pt",
                    callback_on_step_end=step_end,
                    **task_kwargs,
                )
                images.extend(_to_pil(output.images))
        return images

    def _generate_omni(self, request: Request) -> list[Image.Image]:
        """Variants edit and omni: one call per image, conditioned on the job's images (none for text-to-image).

        The images go in at their own size (the pipeline scales one above 1024x1024 down to the requested area
        and crops each to a multiple of the latent patch); the output has the requested size."""
        params, on_step, should_stop = request.params, request.on_step, request.should_stop
        steps, guidance = params.steps_and_guidance(VARIANT_DEFAULTS[self.variant])
        num_inference_steps, sigmas = denoising_schedule(steps)
        seed = params.seed if params.seed is not None else 0
        uris = [params.input_image, *(params.reference_images or [])] if params.task == "edit" else []
        images = [_decode(request.load_image(uri), "RGB") for uri in uris if uri]
        self.adapters.activate(params.loras)
        done = 0

        def step_end(pipeline: Any, index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            nonlocal done
            done += 1
            on_step(done, pipeline.num_timesteps * params.num_images)
            if should_stop():
                raise Cancelled()
            return callback_kwargs

        out: list[Image.Image] = []
        with torch.inference_mode():
            # The prompt is the same for every image: encode it once (its template has a slot per image).
            embeds, negative = self.omni.encode_prompt(
                prompt=params.prompt,
                negative_prompt=params.negative_prompt,
                do_classifier_free_guidance=guidance > 0,
                device=self.device,
                num_condition_images=len(images),
            )
            for index in range(params.num_images):
                if should_stop():
                    raise Cancelled()
                output = self.omni(
                    image=images or None,
                    prompt_embeds=embeds,
                    negative_prompt_embeds=negative if guidance > 0 else None,
                    height=params.height,
                    width=params.width,
                    num_inference_steps=num_inference_steps,
                    sigmas=sigmas,
                    guidance_scale=guidance,
                    generator=torch.Generator(device=self.device).manual_seed(seed + index),
                    output_type="pt",
                    callback_on_step_end=step_end,
                )
                out.extend(_to_pil(output.images))
        return out

    def _pipeline_for(self, params: GenerationParams, load_image: Callable[[str], bytes]) -> tuple[Any, dict[str, Any]]:
        """The image-to-image or inpainting pipeline, with the job's resized input (and mask)."""
        if not params.input_image:
            raise ValueError(f"{params.task} needs input_image")
        size = (params.width, params.height)
        # The img2img and inpaint pipelines encode the input at its own size but sample latents at the
        # requested size; resizing first keeps the two in agreement.
        image = _decode(load_image(params.input_image), "RGB").resize(size, Image.Resampling.LANCZOS)
        if params.task == "image-to-image":
            strength = params.strength if params.strength is not None else DEFAULT_IMG2IMG_STRENGTH
            return self.image_to_image, {"image": image, "strength": strength}
        if not params.mask_image:
            raise ValueError("inpaint needs mask_image")
        mask = _decode(load_image(params.mask_image), "L").resize(size, Image.Resampling.NEAREST)
        strength = params.strength if params.strength is not None else DEFAULT_INPAINT_STRENGTH
        return self.inpaint, {"image": image, "mask_image": mask, "strength": strength}


def _to_pil(images: Any) -> list[Image.Image]:
    """The pipeline's [0, 1] image tensor as 8-bit images, the way diffusers rounds them for output_type="pil",
    but rounded on the device: a quarter of the bytes cross to the host and the host's share (on the path
    to the next batch) is a copy, not float arithmetic over every pixel."""
    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


def _decode(data: bytes, mode: str) -> Image.Image:
    with Image.open(io.BytesIO(data)) as opened:
        # convert() also forces the lazy decode while the buffer is still open.
        return opened.convert(mode)
