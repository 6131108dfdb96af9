"""``zimage generate``: text-to-image, image-to-image (``--image``) and inpainting (``--image --mask``), or with
an edit or omni model an edit of ``--image`` as the prompt says (omni: with ``--reference`` images), on the
embedded local stack (no cluster) or through a running API (``--api URL``).

Locally the inputs go into the local store under the local tenant's uploads, where the worker's ``read_uri``
takes them, exactly as a cluster's worker takes an API upload. Through the API a text-to-image job is a
``POST /v1/jobs`` followed on its event stream; an edit is the multipart ``POST /v1/images/edits`` (the only
route that takes uploads), which answers with the images once the job is done.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from zimage_api.cli_config import Shared
from zimage_api.cli_errors import Failure, UserError, invalid
from zimage_queue import GenerationParams, JobEvent
from zimage_queue.message import OMNI_VARIANTS, VARIANT_DEFAULTS, AdapterSpec, variant_help

if TYPE_CHECKING:
    from zimage_api.cli_client import ApiClient
    from zimage_api.cli_output import StepProgress
    from zimage_api.uploads import CheckedImage
    from zimage_worker.engine import Engine

DEFAULT_SIZE = 1024
LOCAL_ONLY = ("variant", "images_dir", "models_dir")
# What /v1/images/edits does not take: refused with --api --image rather than dropped without a word.
NOT_IN_EDITS = {
    "negative_prompt": "--negative-prompt",
    "steps": "--steps",
    "guidance": "--guidance",
    "bulk": "--bulk",
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], shared: Shared) -> None:
    g = sub.add_parser(
        "generate",
        parents=[shared.debug, shared.api],
        help="make images from a prompt, or edit one (locally: no cluster needed)",
        description="Make images from a prompt; with --image, from an image (image-to-image), with --image and "
        "--mask, repaint the mask's white (or transparent) part (inpainting). With an edit or omni model, --image "
        "is edited as the prompt says (omni: with up to 3 --reference images). Locally on the embedded stack, or "
        "with --api on a running zimage API.",
    )
    g.add_argument("prompt")
    g.add_argument("-o", "--output", default="image.png", help="image file (several: NAME-0.png, NAME-1.png, ...)")
    g.add_argument("--image", metavar="PATH", help="the image to start from (png, jpeg, webp)")
    g.add_argument(
        "--mask", metavar="PATH", help="with --image: white (or transparent, as OpenAI's masks) where to repaint"
    )
    g.add_argument(
        "--reference",
        action="append",
        dest="references",
        default=[],
        metavar="PATH",
        help="with --image on an omni model: a further image the edit conditions on (repeatable)",
    )
    g.add_argument(
        "--strength", type=float, metavar="F", help="with --image: how far to move from it, above 0 up to 1 "
        "(default 0.6; 1.0 with --mask)"
    )  # fmt: skip
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--width", type=int, default=None, help=f"default {DEFAULT_SIZE}; with --image: the image's")
    g.add_argument("--height", type=int, default=None, help=f"default {DEFAULT_SIZE}; with --image: the image's")
    g.add_argument("--steps", type=int, default=None, help="default: the variant's (Turbo: 8)")
    g.add_argument("--guidance", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("-n", "--num-images", type=int, default=1, metavar="N", help="number of images (1-8)")
    g.add_argument("--format", default=None, choices=["png", "jpeg", "webp"], help="default png")
    g.add_argument(
        "--model",
        default=None,
        help="locally: a MODELS_DIR name, local path, hub id, or tiny-random (default: $ZIMAGE_MODEL_SOURCE, "
        "else tiny-random); with --api: a ModelDeployment (default: the API's)",
    )
    g.add_argument("--remote-model", dest="model", help=argparse.SUPPRESS)  # the earlier name of --api --model
    g.add_argument("--models-dir", default=None, help="locally: where named models lie (default: $MODELS_DIR)")
    g.add_argument(
        "--variant", default=None, choices=list(VARIANT_DEFAULTS), help=f"locally: default turbo ({variant_help()})"
    )
    g.add_argument("--images-dir", default=None, help="locally: where the worker stores images (default: a temp dir)")
    g.add_argument("--bulk", action="store_true", help="with --api: a bulk job (no ImageJob; see docs/api.md)")
    g.set_defaults(func=generate)


@dataclass
class Inputs:
    image: CheckedImage | None = None
    mask: CheckedImage | None = None
    references: list[CheckedImage] = field(default_factory=list)
    edit: bool = False  # an edit or omni model: the image is edited as the prompt says

    @property
    def task(self) -> str:
        if self.image and self.edit:
            return "edit"
        return "inpaint" if self.mask else "image-to-image" if self.image else "text-to-image"


def _read(path: str, what: str) -> CheckedImage:
    from zimage_api.errors import ApiError
    from zimage_api.settings import ApiSettings
    from zimage_api.uploads import check_image

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{what}: cannot read {path}: {e.strerror or e}") from e
    limits = ApiSettings.model_fields  # the API's own limits on uploads, so a local run takes what it takes
    try:
        return check_image(
            data,
            what,
            max_bytes=int(limits["max_upload_bytes"].default),
            max_pixels=int(limits["max_upload_pixels"].default),
        )
    except ApiError as e:
        raise UserError(f"{e.message} ({path})") from e


def read_inputs(args: argparse.Namespace, variant: str | None) -> Inputs:
    """The input images, checked as the API checks uploads. ``variant``: the local model's; None through the
    API (whose model decides what the images are for)."""
    if args.mask and not args.image:
        raise UserError("--mask needs --image (the image whose masked part to repaint)")
    if args.strength is not None and not args.image:
        raise UserError("--strength needs --image (how far to move from that image)")
    if args.references and not args.image:
        raise UserError("--reference needs --image (the image to edit)")
    if variant is not None:
        does = VARIANT_DEFAULTS[variant]
        if "text-to-image" not in does.tasks and not args.image:
            raise UserError(f"--variant {variant} needs --image (the image to edit)")
        if variant in OMNI_VARIANTS and args.mask:
            raise UserError(f"--mask: --variant {variant} edits as the prompt says, without a mask")
        if variant in OMNI_VARIANTS and args.strength is not None:
            raise UserError(f"--strength: --variant {variant} edits as the prompt says, with no strength")
        if len(args.references) > does.references:
            takes = f"at most {does.references}" if does.references else "none (omni does)"
            raise UserError(f"--reference: --variant {variant} takes {takes}, got {len(args.references)}")
    image = _read(args.image, "--image") if args.image else None
    mask = _read(args.mask, "--mask") if args.mask else None
    references = [_read(path, "--reference") for path in args.references]
    return Inputs(image, mask, references, edit=variant in OMNI_VARIANTS)


def build_params(args: argparse.Namespace, inputs: Inputs) -> GenerationParams:
    """The job's parameters, checked with the queue contract's own bounds (errors name the flags). Input images
    are added once they are stored; the size defaults to the input's, fitted as the API fits it."""
    width, height = args.width, args.height
    if inputs.image and (width is None or height is None):
        from zimage_api.routes_openai import fit

        fitted = fit(inputs.image.width, inputs.image.height)
        width, height = width or fitted[0], height or fitted[1]
    # The contract takes 0 as well, but a pipeline has no step left to run then (the job fails on every attempt).
    if args.strength is not None and not 0 < args.strength <= 1:
        raise UserError("--strength must be above 0 and at most 1")
    try:
        return GenerationParams(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            width=width or DEFAULT_SIZE,
            height=height or DEFAULT_SIZE,
            steps=args.steps,
            seed=args.seed,
            num_images=args.num_images,
            guidance_scale=args.guidance,
            strength=args.strength,
            output_format=args.format or "png",
        )
    except ValidationError as e:
        raise invalid(e, GenerationParams) from e


def generate(args: argparse.Namespace) -> int:
    shared: Shared = args.shared
    remote = bool(getattr(args, "api", None) or shared.settings.api_url)
    if remote:
        for name in LOCAL_ONLY:
            if getattr(args, name) is not None:
                raise UserError(f"--{name.replace('_', '-')} is for local runs; with --api the API's model decides")
    inputs = read_inputs(args, None if remote else args.variant or "turbo")
    params = build_params(args, inputs)
    if remote:
        return generate_remote(args, shared, params, inputs)
    return generate_local(args, shared, params, inputs)


# -- local ---------------------------------------------------------------------------------------------------
def load_local_engine(
    model: str, variant: str, models_dir: str | None, adapters: list[AdapterSpec] | None = None
) -> Engine:
    from zimage_worker.engine import load_engine, resolve_source

    try:
        resolve_source(model, models_dir)
    except ValueError as e:
        raise UserError(f"--model: {e}") from e
    try:
        return load_engine(model, variant=variant, models_dir=models_dir, adapters=adapters)
    except ImportError as e:
        raise UserError(
            f"local generation needs the worker extra (pip install -e '.[worker]'), or use --api URL ({e})"
        ) from e
    except (OSError, ValueError) as e:  # a hub id that cannot be fetched, a directory that holds no model
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        raise UserError(f"--model: cannot load {model!r}: {first}") from e


def _worker_logs(debug: bool) -> None:
    """The worker's own log lines (a failed attempt's traceback) only with --debug: the progress notes and the
    final error already say what happened."""
    import logging

    from zimage_queue import logs

    if debug:
        logs.configure(text=True)
    else:
        logging.getLogger().addHandler(logging.NullHandler())  # not logging's last-resort stderr handler


def _on_local_event(bar: StepProgress) -> Callable[[JobEvent], None]:
    def on_event(ev: JobEvent) -> None:
        if ev.type == "progress":
            bar.step(ev.step or 0, ev.total_steps or 0)
        elif ev.type == "started":
            bar.note(f"running on {ev.worker}")
        elif ev.type == "retrying":
            bar.note(f"retrying: {ev.reason}: {ev.message}")

    return on_event


def generate_local(args: argparse.Namespace, shared: Shared, params: GenerationParams, inputs: Inputs) -> int:
    from zimage_api.cli_output import StepProgress
    from zimage_api.uploads import openai_mask_to_white
    from zimage_worker.local import LOCAL_NAMESPACE, copy_results, local_stack
    from zimage_worker.storage import upload_key

    model = args.model or shared.settings.model_source
    variant = args.variant or "turbo"
    models_dir = args.models_dir or shared.settings.models_dir
    engine = load_local_engine(model, variant, models_dir)
    _worker_logs(bool(getattr(args, "debug", False)))
    if params.seed is None:
        params.seed = int.from_bytes(os.urandom(4), "big")
    print(f"model {model} ({variant}), {inputs.task}; starting the local stack", file=sys.stderr)
    with contextlib.ExitStack() as cleanup:
        # Without --images-dir the images only pass through a temp dir on their way to --output.
        images_dir = args.images_dir or cleanup.enter_context(tempfile.TemporaryDirectory(prefix="zimage-images-"))
        with local_stack(model, images_dir=images_dir, engine=engine, variant=variant) as stack:
            if inputs.image:
                upload = uuid.uuid4().hex
                update: dict[str, object] = {
                    "task": inputs.task,
                    "input_image": stack.store.put(
                        upload_key(LOCAL_NAMESPACE, upload, f"image.{inputs.image.extension}"),
                        inputs.image.data,
                        inputs.image.content_type,
                    ),
                }
                if inputs.mask:
                    update["mask_image"] = stack.store.put(
                        upload_key(LOCAL_NAMESPACE, upload, "mask.png"), openai_mask_to_white(inputs.mask), "image/png"
                    )
                if inputs.references:
                    update["reference_images"] = [
                        stack.store.put(
                            upload_key(LOCAL_NAMESPACE, upload, f"reference-{i}.{ref.extension}"),
                            ref.data,
                            ref.content_type,
                        )
                        for i, ref in enumerate(inputs.references, 1)
                    ]
                params = params.model_copy(update=update)
            job = stack.submit(params)
            with StepProgress(inputs.task) as bar:
                try:
                    final = stack.wait(job.uid, on_event=_on_local_event(bar))
                except BaseException:  # SIGTERM, Ctrl-C: the worker stops at its next step, not at the job's end
                    stack.queue.cancel(job.uid)
                    raise
        if final.type != "succeeded" or not final.results:
            raise Failure(f"job {final.type}: {final.reason}: {final.message}")
        for path in copy_results(final.results, Path(args.output)):
            print(path)
    print(f"seed {params.seed}, {final.run_seconds or 0:.2f}s", file=sys.stderr)
    return 0


# -- through the API -----------------------------------------------------------------------------------------
def generate_remote(args: argparse.Namespace, shared: Shared, params: GenerationParams, inputs: Inputs) -> int:
    from zimage_api.cli_client import ApiClient

    with ApiClient(shared.api_url(args), shared.api_key(args)) as client:
        if inputs.image:
            return _edit_remote(client, args, params, inputs)
        return _generate_remote(client, args, params)


def _write(output: Path, images: list[bytes]) -> None:
    from zimage_worker.local import output_paths

    for target, data in zip(output_paths(output, len(images)), images, strict=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        print(target)


def _generate_remote(client: ApiClient, args: argparse.Namespace, params: GenerationParams) -> int:
    from zimage_api.cli_jobs import follow
    from zimage_api.cli_output import StepProgress

    body = {**params.wire(), "model": args.model, "mode": "bulk" if args.bulk else None}
    job = client.call("POST", "/v1/jobs", json={k: v for k, v in body.items() if v is not None})
    print(f"job {job['id']} on {job['model']}", file=sys.stderr)
    try:
        with StepProgress(params.task) as bar:
            final = follow(client, job["id"], bar)
    except KeyboardInterrupt:
        print(f"\nthe job keeps running: zimage jobs watch {job['id']} (or zimage jobs cancel)", file=sys.stderr)
        raise
    if final.get("phase") != "Succeeded":
        raise Failure(f"job {job['id']} {final.get('phase')}: {final.get('reason')}: {final.get('message')}")
    _write(Path(args.output), [client.download(image["url"]) for image in final["images"]])
    print(f"seed {final.get('seed')}, {final.get('runSeconds')}s", file=sys.stderr)
    return 0


def _edit_remote(client: ApiClient, args: argparse.Namespace, params: GenerationParams, inputs: Inputs) -> int:
    from rich.console import Console

    given = [name for attr, name in NOT_IN_EDITS.items() if getattr(args, attr) not in (None, False)]
    if given:
        raise UserError(f"{', '.join(given)}: not taken by the API's /v1/images/edits, which --api --image uses")
    assert inputs.image is not None
    form = {
        "prompt": params.prompt,
        "model": args.model,
        "n": params.num_images,
        "size": f"{params.width}x{params.height}",
        "strength": params.strength,
        "seed": params.seed,
        "output_format": args.format,
        "response_format": "b64_json",
    }
    # One image as `image`; with references, all as `image[]` (an edit or omni model takes the rest as references).
    images = [(args.image, inputs.image), *zip(args.references, inputs.references, strict=True)]
    field_name = "image[]" if inputs.references else "image"
    files = [(field_name, (Path(path).name, img.data, img.content_type)) for path, img in images]
    if inputs.mask:
        files.append(("mask", (Path(args.mask).name, inputs.mask.data, inputs.mask.content_type)))
    with Console(stderr=True).status(f"{inputs.task} on {client.url} (the API answers when the images are done)"):
        out = client.sync_call(
            "POST", "/v1/images/edits", data={k: str(v) for k, v in form.items() if v is not None}, files=files
        )
    _write(Path(args.output), [base64.b64decode(d["b64_json"]) for d in out["data"]])
    return 0
