"""``zimage``: the user CLI. ``zimage generate "a red fox" -o fox.png`` runs the whole stack locally."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError

from zimage_queue import GenerationParams, JobEvent


def _progress(ev: JobEvent) -> None:
    if ev.type == "progress" and ev.total_steps:
        width = 30
        done = int(width * (ev.step or 0) / ev.total_steps)
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {ev.step}/{ev.total_steps}")
        sys.stderr.flush()
    elif ev.type == "started":
        sys.stderr.write(f"running on {ev.worker}\n")


def generate(args: argparse.Namespace) -> int:
    from zimage_worker.local import copy_results, local_stack

    try:
        params = GenerationParams(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            width=args.width,
            height=args.height,
            steps=args.steps,
            seed=args.seed,
            num_images=args.n,
            guidance_scale=args.guidance,
            output_format=args.format,
        )
    except ValidationError as e:
        for err in e.errors():
            print(f"error: {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    if params.seed is None:
        params.seed = int.from_bytes(os.urandom(4), "big")
    images_dir = args.images_dir or tempfile.mkdtemp(prefix="zimage-images-")
    print(f"model {args.model}; starting local stack", file=sys.stderr)
    with local_stack(args.model, images_dir=images_dir, models_dir=args.models_dir, variant=args.variant) as stack:
        job = stack.submit(params)
        final = stack.wait(job.uid, on_event=_progress)
    sys.stderr.write("\n")
    if final.type != "succeeded" or not final.results:
        print(f"error: job {final.type}: {final.reason}: {final.message}", file=sys.stderr)
        return 1
    for path in copy_results(final.results, Path(args.output)):
        print(path)
    print(f"seed {params.seed}, {final.run_seconds:.2f}s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zimage", description="Z-Image jobs from the command line.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="make images from a prompt (locally: no cluster needed)")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", default="image.png")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--width", type=int, default=1024)
    g.add_argument("--height", type=int, default=1024)
    g.add_argument("--steps", type=int, default=None, help="default: the variant's (Turbo: 8)")
    g.add_argument("--guidance", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("-n", type=int, default=1, help="number of images")
    g.add_argument("--format", default="png", choices=["png", "jpeg", "webp"])
    g.add_argument(
        "--model",
        default=os.environ.get("ZIMAGE_MODEL_SOURCE", "tiny-random"),
        help="MODELS_DIR name, local path, hub id, or tiny-random (default)",
    )
    g.add_argument("--models-dir", default=os.environ.get("MODELS_DIR"))
    g.add_argument("--variant", default="turbo", choices=["turbo", "base", "edit"])
    g.add_argument("--images-dir", default=None, help="where the worker stores images (default: a temp dir)")
    g.set_defaults(func=generate)
    args = p.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
