"""``zimage``: the user CLI. ``zimage generate "a red fox" -o fox.png`` runs the whole stack locally."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from pydantic import ValidationError

from zimage_queue import GenerationParams, JobEvent, logs

if TYPE_CHECKING:
    import httpx


def exit_on_sigterm() -> None:
    """SIGTERM (``kill``, a shell's ``kill %1``) unwinds the stack as Ctrl-C does, so every ``with`` block's
    cleanup runs: the private Redis stops and the temporary directories go. The exit status is 128 + 15, what a
    shell reports for a process the signal ended. Further SIGTERMs are ignored so they cannot cut that cleanup
    short (it is bounded; SIGKILL still ends the process, and the Redis dies with it)."""

    def stop(signum: int, frame: FrameType | None) -> None:
        signal.signal(signum, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def _bar(step: int, total: int) -> None:
    if total:
        width = 30
        done = int(width * step / total)
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total}")
        sys.stderr.flush()


def _progress(ev: JobEvent) -> None:
    if ev.type == "progress":
        _bar(ev.step or 0, ev.total_steps or 0)
    elif ev.type == "started":
        sys.stderr.write(f"running on {ev.worker}\n")


def generate_remote(args: argparse.Namespace) -> int:
    """Submit to a running API, follow its event stream, save the images."""
    import json

    import httpx

    key = args.api_key or os.environ.get("ZIMAGE_API_KEY", "")
    body = {
        "prompt": args.prompt,
        "negativePrompt": args.negative_prompt,
        "width": args.width,
        "height": args.height,
        "steps": args.steps,
        "guidanceScale": args.guidance,
        "seed": args.seed,
        "numImages": args.n,
        "outputFormat": args.format,
        "model": args.remote_model,
        "mode": "bulk" if args.bulk else None,
    }
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=args.api, headers=headers, timeout=60) as client:
        r = client.post("/v1/jobs", json={k: v for k, v in body.items() if v is not None})
        if r.status_code >= 400:
            print(f"error: {r.status_code}: {r.json().get('error', {}).get('message', r.text)}", file=sys.stderr)
            return 2 if r.status_code < 500 else 1
        job = r.json()
        print(f"job {job['id']} on {job['model']}", file=sys.stderr)
        final: dict[str, object] = job
        kind = ""
        with client.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=None) as events:
            for line in events.iter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    data = json.loads(line.removeprefix("data: "))
                    if kind == "progress":
                        _bar(data["step"], data["totalSteps"])
                    elif kind in ("succeeded", "failed", "cancelled"):
                        final = data
        sys.stderr.write("\n")
        if final.get("phase") != "Succeeded":
            print(f"error: job {final.get('phase')}: {final.get('message')}", file=sys.stderr)
            return 1
        images = final["images"]
        assert isinstance(images, list)
        from zimage_worker.local import output_paths

        for target, image in zip(output_paths(Path(args.output), len(images)), images, strict=True):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(client.get(image["url"]).raise_for_status().content)
            print(target)
    print(f"seed {final.get('seed')}, {final.get('runSeconds')}s", file=sys.stderr)
    return 0


def generate(args: argparse.Namespace) -> int:
    if args.api:
        return generate_remote(args)
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
    with contextlib.ExitStack() as cleanup:
        # Without --images-dir the images only pass through a temp dir on their way to --output.
        images_dir = args.images_dir or cleanup.enter_context(tempfile.TemporaryDirectory(prefix="zimage-images-"))
        print(f"model {args.model}; starting local stack", file=sys.stderr)
        with local_stack(args.model, images_dir=images_dir, models_dir=args.models_dir, variant=args.variant) as stack:
            job = stack.submit(params)
            try:
                final = stack.wait(job.uid, on_event=_progress)
            except BaseException:  # SIGTERM, Ctrl-C: the worker stops at its next step, not at the job's end
                stack.queue.cancel(job.uid)
                raise
        sys.stderr.write("\n")
        if final.type != "succeeded" or not final.results:
            print(f"error: job {final.type}: {final.reason}: {final.message}", file=sys.stderr)
            return 1
        for path in copy_results(final.results, Path(args.output)):
            print(path)
    print(f"seed {params.seed}, {final.run_seconds:.2f}s", file=sys.stderr)
    return 0


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from zimage_api.local import DEV_KEY, local_api

    logs.configure(text=True)
    with local_api(args.model, variant=args.variant, images_dir=args.images_dir, models_dir=args.models_dir) as la:
        url = f"http://{args.host}:{args.port}"
        print(
            f"zimage API on {url} (docs: {url}/docs), model {args.model} as z-image-turbo\n"
            f"API key: {DEV_KEY}\n"
            f"  curl -H 'Authorization: Bearer {DEV_KEY}' -H 'Content-Type: application/json' \\\n"
            f'       {url}/v1/jobs -d \'{{"prompt": "a red fox"}}\'\n'
            f"  OpenAI(base_url='{url}/v1', api_key='{DEV_KEY}').images.generate(prompt='a red fox')",
            file=sys.stderr,
        )
        uvicorn.run(la.app, host=args.host, port=args.port, log_level="warning", log_config=None)
    return 0


def _api_client(args: argparse.Namespace) -> httpx.Client:
    import httpx

    if not args.api:
        raise SystemExit("error: --api (or $ZIMAGE_API_URL): the API to ask")
    key = args.api_key or os.environ.get("ZIMAGE_API_KEY", "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=args.api, headers=headers, timeout=60)


def _failed(r: httpx.Response) -> int | None:
    if r.status_code < 400:
        return None
    try:
        message = r.json().get("error", {}).get("message", r.text)
    except ValueError:
        message = r.text
    print(f"error: {r.status_code}: {message}", file=sys.stderr)
    return 2 if r.status_code < 500 else 1


def jobs_list(args: argparse.Namespace) -> int:
    """One line per job (bulk jobs and ImageJobs alike), or the API's JSON with --json; all pages."""
    import json

    params: dict[str, str | int] = {"limit": args.limit}
    if args.phase:
        params["phase"] = args.phase
    jobs: list[dict[str, object]] = []
    with _api_client(args) as client:
        while True:
            r = client.get("/v1/jobs", params=params)
            if (code := _failed(r)) is not None:
                return code
            page = r.json()
            jobs.extend(page["data"])
            token = page.get("nextPageToken")
            if not token or not args.all or len(jobs) >= args.max:
                break
            params["page_token"] = token
    if args.json:
        print(json.dumps(jobs[: args.max], indent=2))
        return 0
    print(f"{'ID':<40} {'MODE':<9} {'PHASE':<10} {'MODEL':<20} CREATED")
    for j in jobs[: args.max]:
        print(
            f"{j['id']!s:<40} {j.get('mode', 'imagejob')!s:<9} {j['phase']!s:<10} {j['model']!s:<20} {j['createdAt']}"
        )
    return 0


def jobs_get(args: argparse.Namespace) -> int:
    import json

    with _api_client(args) as client:
        r = client.delete(f"/v1/jobs/{args.id}") if args.cancel else client.get(f"/v1/jobs/{args.id}")
        if (code := _failed(r)) is not None:
            return code
        print(json.dumps(r.json(), indent=2))
    return 0


def create_key(args: argparse.Namespace) -> int:
    from zimage_api.apikeys import entry_json, key_id, new_key

    try:
        key = new_key(args.id)
        kid = key_id(key)
        if kid is None:
            raise ValueError("--id: 1-32 characters a-z, 0-9")
        entry = entry_json(
            key,
            args.tenant,
            ratePerSecond=args.rate_per_second,
            burst=args.burst,
            maxConcurrentJobs=args.max_concurrent_jobs,
            bulk=args.bulk,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(key)
    print(
        f"# give the key to tenant {args.tenant}; the Secret keeps only its hash (add to it if it exists):\n"
        f"kubectl create secret generic {args.secret} --from-literal={kid}='{entry}'",
        file=sys.stderr,
    )
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
    g.add_argument(
        "--api", default=os.environ.get("ZIMAGE_API_URL"), help="submit to this API (e.g. http://localhost:8080)"
    )
    g.add_argument("--api-key", default=None, help="default: $ZIMAGE_API_KEY")
    g.add_argument("--remote-model", default=None, help="with --api: a ModelDeployment name (default: the API's)")
    g.add_argument("--bulk", action="store_true", help="with --api: a bulk job (no ImageJob; see docs/api.md)")
    g.set_defaults(func=generate)

    s = sub.add_parser("serve", help="run the REST API locally: private Redis, a worker, an in-memory job store")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--model", default=os.environ.get("ZIMAGE_MODEL_SOURCE", "tiny-random"))
    s.add_argument("--models-dir", default=os.environ.get("MODELS_DIR"))
    s.add_argument("--variant", default="turbo", choices=["turbo", "base", "edit"])
    s.add_argument("--images-dir", default=None, help="where images are kept (default: a temp dir)")
    s.set_defaults(func=serve)

    k = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    kc = k.add_parser("create", help="make a key; prints it once, and the hashed entry for the keys Secret")
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--id", default=None, help="key id (a-z0-9; default random)")
    kc.add_argument("--rate-per-second", type=float, default=None)
    kc.add_argument("--burst", type=int, default=None)
    kc.add_argument("--max-concurrent-jobs", type=int, default=None)
    kc.add_argument("--bulk", action="store_true", help="the key's jobs are bulk jobs (no ImageJob) by default")
    kc.add_argument("--secret", default="zimage-api-keys", help="Secret name in the printed kubectl command")
    kc.set_defaults(func=create_key)

    j = sub.add_parser("jobs", help="jobs on a running API (bulk jobs and ImageJobs)")
    j.add_argument("--api", default=os.environ.get("ZIMAGE_API_URL"), help="the API (default: $ZIMAGE_API_URL)")
    j.add_argument("--api-key", default=None, help="default: $ZIMAGE_API_KEY")
    js = j.add_subparsers(dest="jobs_command", required=True)
    jl = js.add_parser("list", help="your tenant's jobs: bulk jobs (newest first), then ImageJobs")
    jl.add_argument(
        "--phase", default=None, choices=["Pending", "Queued", "Running", "Succeeded", "Failed", "Cancelled"]
    )
    jl.add_argument("--limit", type=int, default=50, help="page size")
    jl.add_argument("--all", action="store_true", help="follow the pages (up to --max jobs)")
    jl.add_argument("--max", type=int, default=1000)
    jl.add_argument("--json", action="store_true", help="the API's job objects")
    jl.set_defaults(func=jobs_list)
    jg = js.add_parser("get", help="one job, as the API shows it (JSON)")
    jg.add_argument("id")
    jg.set_defaults(func=jobs_get, cancel=False)
    jc = js.add_parser("cancel", help="cancel a job (a finished one is left as is)")
    jc.add_argument("id")
    jc.set_defaults(func=jobs_get, cancel=True)
    args = p.parse_args(argv)
    exit_on_sigterm()
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: the cleanup ran on the way here; no traceback for it
        sys.stderr.write("\n")
        return 128 + signal.SIGINT
    return code


if __name__ == "__main__":
    sys.exit(main())
