"""The product pipeline for N items: the naive loop a team writes first, next to the workflow engine.

    python -m bench.workflow                      # 100 items, 4 keys at 4 requests / 10 s each, 3-4 s latency
    python -m bench.workflow --items 20 --naive-items 5

Each item goes through the example pipeline (docs/examples/workflow-product.yaml): an LLM call to the provider
stand-in (a real HTTP server on loopback enforcing each key's limit with 429 + Retry-After, with injected latency),
the tiny Z-Image model for the background, a compose step that really burns ``--cpu`` seconds of CPU, and a resize.

(a) naive: one item after another, steps in sequence, one key; in one process (the provider over HTTP, the model,
    compose and resize in-process). Timed on ``--naive-items`` items and scaled to N (it is strictly sequential).
(b) engine: one ImageWorkflow with a pipelined forEach chain over the N items, run by the embedded engine
    (``zimage_api.workflow_local``): a forwarder process calling the provider through the Redis key pool, a GPU
    worker, ``--compose-workers`` function workers and a resize worker, all separate processes.

Printed side by side: makespan, the rate-limit lower bound (remote calls / (K x rate)), their ratio, the speed-up
over the naive loop, the provider's 429s (seen by the stand-in) and those surfaced as failed jobs, and the
forwarder's worst event-loop lag over the run (its own measure, logged when it stops).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

from zimage_queue import GenerationParams

REPO = Path(__file__).resolve().parent.parent
SIZE = 128


def burn_compose(params: GenerationParams, inputs: dict[str, Image.Image], args: dict[str, Any]) -> list[Image.Image]:
    """The built-in compose after ``args.cpu`` seconds of real CPU work (what a heavy CPU step costs)."""
    from zimage_worker.functions import compose

    seconds = float(args.get("cpu", 0.5))
    end = time.process_time() + seconds
    x = 0
    while time.process_time() < end:
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    return compose(params, inputs, {k: v for k, v in args.items() if k != "cpu"})


def product_photo(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    photo.paste((200, 30, 30, 255), (8, 8, 24, 24))
    path = folder / "product.png"
    photo.save(path)
    return path


def pools(
    base_url: str, keys: int, per_window: int, window: int, args_batch: int = 8
) -> tuple[list[dict[str, Any]], dict[str, dict[str, str]]]:
    def md(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": "zimage.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": name},
            "spec": spec,
        }

    remote = {
        "api": "chat",
        "baseUrl": base_url,
        "model": "gpt-4o-mini",
        "keysSecret": "llm-keys",
        "limits": {"requestsPerWindow": per_window, "windowSeconds": window},
        "maxAttempts": 5,
        "concurrencyPerReplica": 128,
    }
    models = [
        md("llm", {"backend": "remote", "remote": remote}),
        md("z-image", {"model": {"variant": "turbo"}, "batching": {"maxBatchSize": args_batch}}),
        md("compose", {"backend": "function", "function": {"entryPoint": "bench.workflow:burn_compose"}}),
        md("resize", {"backend": "function", "function": {"entryPoint": "builtin:resize"}}),
    ]
    return models, {"llm-keys": {f"k{i}": f"sk-{i}" for i in range(keys)}}


def workflow(items: int, product_uri: str, cpu: float) -> dict[str, Any]:
    return {
        "apiVersion": "zimage.dev/v1alpha1",
        "kind": "ImageWorkflow",
        "metadata": {"name": "bench"},
        "spec": {
            "inputs": {"ideas": [f"product shot number {i}" for i in range(items)], "product": product_uri},
            "maxParallel": 256,
            "steps": [
                {
                    "name": "enhance",
                    "model": "llm",
                    "forEach": "{{ inputs.ideas }}",
                    "params": {"prompt": "{{ item }}"},
                },
                {
                    "name": "background",
                    "model": "z-image",
                    "forEach": "{{ steps.enhance }}",
                    "params": {"prompt": "{{ item.text }}", "width": SIZE, "height": SIZE, "steps": 2},
                },
                {
                    "name": "compose",
                    "model": "compose",
                    "forEach": "{{ steps.background }}",
                    "params": {
                        "task": "image-to-image",
                        "inputImage": "{{ item.image }}",
                        "width": SIZE,
                        "height": SIZE,
                        "args": {"overlay": "{{ inputs.product }}", "cpu": cpu},
                    },
                },
                {
                    "name": "resize",
                    "model": "resize",
                    "forEach": "{{ steps.compose }}",
                    "params": {"task": "image-to-image", "inputImage": "{{ item.image }}", "width": 64, "height": 64},
                },
            ],
        },
    }


def wait_for_workers(queue: Any, expected: dict[str, int], timeout: float = 180.0) -> None:
    from zimage_api.workflow_local import LOCAL_NAMESPACE
    from zimage_queue.keys import queue_name

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(len(queue.workers(queue_name(LOCAL_NAMESPACE, p))) >= n for p, n in expected.items()):
            return
        time.sleep(0.2)
    raise TimeoutError(f"workers not ready in {timeout:g}s: {expected}")


def run_engine(args: argparse.Namespace, provider: Any, state: Path) -> dict[str, Any]:
    from zimage_api.workflow_local import LOCAL_NAMESPACE, local_pools, put_input, run_workflow

    models, secrets = pools(provider.url, args.keys, args.per_window, args.window)
    workers = {"compose": args.compose_workers, "llm": args.forwarders}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    with local_pools(models, secrets, state, workers=workers) as (jobs, images):
        wait_for_workers(jobs.queue, {"llm": args.forwarders, "z-image": 1, "compose": args.compose_workers})
        product = put_input(images, LOCAL_NAMESPACE, product_photo(state))
        provider.reset()
        t0 = time.monotonic()
        done = run_workflow(workflow(args.items, product, args.cpu), jobs, timeout=args.timeout)
        makespan = time.monotonic() - t0
    lags = [
        float(m.group(1))
        for log in (state / "logs").glob("worker_local_llm_*.log")
        for m in re.finditer(r"worst event-loop lag ([0-9.]+)s", log.read_text())
    ]
    status = done["status"]
    for st in status["steps"]:  # where the time went: each stage's first start and last end, from the first start
        starts = [i["startedAt"] for i in st["instances"] if i.get("startedAt")]
        ends = [i["finishedAt"] for i in st["instances"] if i.get("finishedAt")]
        if starts and ends:
            print(f"  {st['name']:<12} {min(starts)[11:19]} -> {max(ends)[11:19]}  ({len(st['instances'])} jobs)")
    failed = sum(1 for s in status["steps"] for i in s["instances"] if i.get("phase") == "Failed")
    return {
        "phase": status["phase"],
        "message": status.get("message"),
        "makespan": makespan,
        "failed_jobs": failed,
        "rate_limited_failures": sum(
            1
            for s in status["steps"]
            for i in s["instances"]
            if i.get("phase") == "Failed" and "rate" in (i.get("message") or "").lower()
        ),
        "loop_lag": max(lags) if lags else None,
        "calls": len(provider.records(path="/v1/chat/completions", status=200)),
        "429": provider.statuses()[429],
    }


def run_naive(args: argparse.Namespace, provider: Any, state: Path) -> dict[str, Any]:
    """One item after another, each step after the last, one key; retries a 429 after its Retry-After."""
    import httpx

    from zimage_worker.engine import load_engine
    from zimage_worker.functions import resize

    engine = load_engine("tiny-random")
    product = Image.open(product_photo(state))
    product.load()
    client = httpx.Client(base_url=provider.url, headers={"Authorization": "Bearer sk-0"}, timeout=60)
    provider.reset()
    t0 = time.monotonic()
    for i in range(args.naive_items):
        while True:
            r = client.post(
                "/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"product shot number {i}"}]},
            )
            if r.status_code != 429:
                r.raise_for_status()
                break
            time.sleep(float(r.headers.get("Retry-After", "1")))
        text = r.json()["choices"][0]["message"]["content"]
        params = GenerationParams(prompt=text, width=SIZE, height=SIZE, steps=2, seed=i)
        [background] = engine.generate(
            params, on_step=lambda _s, _t: None, should_stop=lambda: False, load_image=lambda _u: b""
        )
        composed = burn_compose(params, {"image": background, "overlay": product}, {"cpu": args.cpu})
        resize(params.model_copy(update={"width": 64, "height": 64}), {"image": composed[0]}, {})
    elapsed = time.monotonic() - t0
    return {
        "measured_items": args.naive_items,
        "measured": elapsed,
        "makespan": elapsed * args.items / args.naive_items,
    }


def main(argv: list[str] | None = None) -> int:
    from bench.provider import ProviderStandIn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--items", type=int, default=100)
    p.add_argument("--keys", type=int, default=4, help="provider keys in the pool (K)")
    p.add_argument("--per-window", type=int, default=4, help="each key may send this many requests per --window")
    p.add_argument(
        "--window", type=int, default=10, help="seconds (the seed's 4 requests/min per key, scaled 6x: 4 per 10 s)"
    )
    p.add_argument("--latency", default="3-4", help="provider latency in seconds, or LOW-HIGH (uniform)")
    p.add_argument("--cpu", type=float, default=0.5, help="CPU seconds each compose step burns")
    p.add_argument("--compose-workers", type=int, default=2)
    p.add_argument("--forwarders", type=int, default=1)
    p.add_argument("--naive-items", type=int, default=10, help="items the naive loop is timed on (then scaled)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = p.parse_args(argv)
    lo, _, hi = args.latency.partition("-")
    latency: float | tuple[float, float] = (float(lo), float(hi)) if hi else float(lo)
    rate = args.per_window / args.window
    keys = {f"sk-{i}": f"{args.per_window}/{args.window}s" for i in range(args.keys)}
    with (
        tempfile.TemporaryDirectory(prefix="zimage-bench-wf-") as tmp,
        ProviderStandIn(keys, latency=latency, seed=7) as provider,
    ):
        state = Path(tmp)
        print(f"items {args.items}, keys {args.keys} x {rate:g} requests/s, latency {args.latency}s, "
              f"compose {args.cpu}s CPU, {os.cpu_count()} CPUs", flush=True)  # fmt: skip
        naive = run_naive(args, provider, state / "naive")
        print(f"naive: {naive['measured_items']} items in {naive['measured']:.1f}s", flush=True)
        engine = run_engine(args, provider, state / "engine")
    bound = args.items / (args.keys * rate)
    rows = [
        ("makespan (s)", f"{naive['makespan']:.1f} (scaled from {args.naive_items})", f"{engine['makespan']:.1f}"),
        ("rate-limit lower bound (s)", f"{args.items / rate:.1f} (1 key)", f"{bound:.1f}"),
        ("makespan / lower bound", f"{naive['makespan'] / (args.items / rate):.2f}",
         f"{engine['makespan'] / bound:.2f}"),
        ("speed-up over naive", "1.00", f"{naive['makespan'] / engine['makespan']:.2f}x"),
        ("provider 429s seen", "-", str(engine["429"])),
        ("429s surfaced as failed jobs", "-", str(engine["rate_limited_failures"])),
        ("failed jobs", "0", str(engine["failed_jobs"])),
        ("forwarder worst loop lag (ms)", "-",
         "-" if engine["loop_lag"] is None else f"{engine['loop_lag'] * 1000:.0f}"),
        ("workflow phase", "-", engine["phase"]),
    ]  # fmt: skip
    print(f"\n{'':32}{'naive loop':>28}{'workflow engine':>18}")
    for label, a, b in rows:
        print(f"{label:32}{a:>28}{b:>18}")
    goals = {
        "within 1.15x of the lower bound": engine["makespan"] <= 1.15 * bound,
        "at least 5x faster than naive": naive["makespan"] >= 5 * engine["makespan"],
        "no rate-limit failures": engine["rate_limited_failures"] == 0 and engine["failed_jobs"] == 0,
        "loop lag under 50 ms": engine["loop_lag"] is not None and engine["loop_lag"] < 0.05,
    }
    if engine["phase"] != "Succeeded":
        print(f"\nthe workflow {engine['phase']}: {engine['message']}")
    print("\n" + "\n".join(f"  [{'x' if ok else ' '}] {goal}" for goal, ok in goals.items()))
    if args.json:
        print(json.dumps({"naive": naive, "engine": engine, "bound": bound, "goals": goals}))
    return 0 if engine["phase"] == "Succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
