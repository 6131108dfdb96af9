"""What batching can buy Z-Image-Turbo on a GPU, from its full-size architecture, without a GPU or weights.

Every operator of one generation (text encoder once, transformer once per step, VAE decode once) is run on
the meta device, where tensors have shapes and no data. For each one it records the FLOPs (PyTorch's own
flop counter formulas) and the bytes an unfused kernel must move (inputs read, output written), and prices it
on a roofline: ``max(FLOPs / peak, bytes / bandwidth)``. Attention is priced as one fused kernel (as flash or
cuDNN attention run it on a GPU: q, k, v in, output out) rather than the math decomposition the meta device
would trace. View operators move nothing and are not counted.

Batching can only speed up the operators that are memory-bound at batch 1 (the weights are read once for the
whole batch instead of once per image) and the per-kernel launch cost (one launch serves the whole batch). The
report shows how much of the time those are, and so the most that batch B can gain over batch 1 on this
machine model. The defaults are what an H100 80GB HBM3 of the lent device pool achieved (an 8192^3 bf16
matrix product at 798 TFLOP/s, a device-to-device copy at 3.0 TB/s counting bytes read and written; the
datasheet says 989 and 3.35). Smaller kernels reach less of both, which moves the absolute times more than
which side of the ridge a kernel is on.

    .venv/bin/python -m bench.roofline                      # 1024x1024, 8 steps, batch 1 and 4
    .venv/bin/python -m bench.roofline --size 512 --batch-sizes 1,2,4,8
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from zimage_worker.tiny import TEXT_HIDDEN_SIZE, build_full_size_pipeline, build_tiny_pipeline

# Allocation only: no kernel reads or writes memory for these.
_FREE = {"empty", "empty_like", "empty_strided", "lift_fresh"}


@dataclass
class Op:
    name: str
    flops: float
    bytes: float

    def seconds(self, peak: float, bandwidth: float) -> float:
        return max(self.flops / peak, self.bytes / bandwidth)

    def memory_bound(self, peak: float, bandwidth: float) -> bool:
        return self.bytes / bandwidth > self.flops / peak


@dataclass
class Trace:
    ops: list[Op] = field(default_factory=list)

    def seconds(self, peak: float, bandwidth: float) -> float:
        return sum(o.seconds(peak, bandwidth) for o in self.ops)

    def memory_bound_seconds(self, peak: float, bandwidth: float) -> float:
        return sum(o.seconds(peak, bandwidth) for o in self.ops if o.memory_bound(peak, bandwidth))

    @property
    def flops(self) -> float:
        return sum(o.flops for o in self.ops)

    @property
    def bytes(self) -> float:
        return sum(o.bytes for o in self.ops)


def _nbytes(values: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(values) if isinstance(t, torch.Tensor))


class _Attention(TorchFunctionMode):
    """Prices scaled_dot_product_attention as one fused kernel and skips its math decomposition."""

    def __init__(self, trace: Trace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = (*args, *(kwargs[n] for n in ("query", "key", "value") if n in kwargs))[:3]
        # Grouped-query attention (the text encoder): k and v have fewer heads and are shared, not copied.
        out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
        batch_heads = q.numel() // (q.shape[-2] * q.shape[-1])
        flops = 4 * batch_heads * q.shape[-2] * k.shape[-2] * q.shape[-1]
        self.trace.ops.append(Op("attention", flops, _nbytes((q, k, v, out))))
        return out


class _Operators(TorchDispatchMode):
    def __init__(self, trace: Trace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        if getattr(func, "is_view", False) or name in _FREE:
            return out
        counter = flop_registry.get(func._overloadpacket)
        flops = counter(*args, **kwargs, out_val=out) if counter else 0
        self.trace.ops.append(Op(name, flops, _nbytes((args, kwargs)) + _nbytes(out)))
        return out


def trace(fn: Callable[[], Any]) -> Trace:
    t = Trace()
    with torch.no_grad(), _Attention(t), _Operators(t):
        fn()
    return t


def generation(pipe: Any, batch: int, size: int, prompt_tokens: int, steps: int) -> dict[str, tuple[Trace, float]]:
    """One call of each component for ``batch`` images, as ZImagePipeline makes them (guidance off), on the
    pipeline's device and dtype (the meta device for the full-size model), with how many such calls each
    image costs: the text encoder once per batch, the transformer ``steps`` times per batch, the VAE once
    per image."""
    at = {"device": pipe.transformer.device, "dtype": pipe.transformer.dtype}
    latent = size // 8
    hidden = pipe.text_encoder.config.hidden_size
    # No attention mask: every token is a prompt token (the pipeline drops padding before the transformer).
    ids = torch.ones(batch, prompt_tokens, dtype=torch.long, device=at["device"])
    images = [torch.zeros(16, 1, latent, latent, **at) for _ in range(batch)]
    captions = [torch.zeros(prompt_tokens, hidden, **at) for _ in range(batch)]
    one_latent = torch.zeros(1, 16, latent, latent, **at)
    return {
        "text encoder": (trace(lambda: pipe.text_encoder(input_ids=ids, output_hidden_states=True)), 1 / batch),
        "transformer step": (
            trace(lambda: pipe.transformer(images, torch.zeros(batch, **at), captions)),
            steps / batch,
        ),
        # The worker decodes a batch image by image (vae.enable_slicing()), so one image's decode is priced.
        "VAE decode": (trace(lambda: pipe.vae.decode(one_latent)), 1.0),
    }


def host_microseconds_per_kernel() -> float:
    """Host time per operator of an eager transformer forward whose kernels do almost nothing: the tiny
    random model at 64x64 on the CPU (Python, module calls, dispatch)."""
    pipe: Any = build_tiny_pipeline()
    images, t, captions = [torch.randn(16, 1, 8, 8)], torch.zeros(1), [torch.randn(64, TEXT_HIDDEN_SIZE)]
    kernels = len(trace(lambda: pipe.transformer(images, t, captions)).ops)
    with torch.no_grad():
        for _ in range(5):
            pipe.transformer(images, t, captions)
        runs, t0 = 50, time.perf_counter()
        for _ in range(runs):
            pipe.transformer(images, t, captions)
    return (time.perf_counter() - t0) / runs / kernels * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="caption tokens per prompt, chat template included")
    ap.add_argument("--peak-tflops", type=float, default=798.0, help="bf16 matrix products (an H100, achieved)")
    ap.add_argument("--bandwidth-tbs", type=float, default=3.0, help="memory bandwidth (an H100, achieved)")
    ap.add_argument(
        "--launch-us",
        type=float,
        default=None,
        help="host time per kernel in eager mode (default: measured on this CPU with the tiny model, whose "
        "kernels do almost no work; the CUDA launch itself adds a few microseconds on a GPU)",
    )
    args = ap.parse_args(argv)
    peak, bandwidth = args.peak_tflops * 1e12, args.bandwidth_tbs * 1e12
    batches = [int(b) for b in args.batch_sizes.split(",")]

    t0 = time.perf_counter()
    measured = args.launch_us is None
    host_us = host_microseconds_per_kernel() if measured else args.launch_us
    pipe: Any = build_full_size_pipeline("meta", "bfloat16")
    params = sum(p.numel() for p in pipe.transformer.parameters()) / 1e9
    print(f"# Z-Image-Turbo architecture ({params:.2f}B transformer), {args.size}x{args.size}, {args.steps} steps, "
          f"{args.prompt_tokens} caption tokens; roofline {args.peak_tflops:g} TFLOP/s, "
          f"{args.bandwidth_tbs:g} TB/s (ridge {peak / bandwidth:.0f} FLOP/byte)")  # fmt: skip
    per_image: dict[int, float] = {}
    launch: dict[int, float] = {}  # kernels per image
    print("| batch | component | calls per image | kernels per call | TFLOP per image | GB moved per image "
          "| roofline ms per image | memory-bound share |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for b in batches:
        total = kernels = 0.0
        for name, (t, calls) in generation(pipe, b, args.size, args.prompt_tokens, args.steps).items():
            seconds = t.seconds(peak, bandwidth) * calls
            share = t.memory_bound_seconds(peak, bandwidth) / t.seconds(peak, bandwidth)
            total += seconds
            kernels += len(t.ops) * calls
            print(f"| {b} | {name} | {calls:g} | {len(t.ops)} | {t.flops * calls / 1e12:.2f} "
                  f"| {t.bytes * calls / 1e9:.1f} | {seconds * 1e3:.1f} | {share:.0%} |")  # fmt: skip
        per_image[b], launch[b] = total, kernels
    print()
    how = " (measured: tiny model, eager, this CPU)" if measured else ""
    print(f"# host: {host_us:.1f} us per kernel launch{how}; the GPU waits on the host when launching "
          "a batch's kernels takes longer than running them")  # fmt: skip
    print("| batch | device roofline ms per image | host ms per image | bound ms per image | images/s bound "
          "| vs batch 1 |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    bound = {b: max(per_image[b], launch[b] * host_us * 1e-6) for b in batches}
    first = batches[0]
    for b in batches:
        print(f"| {b} | {per_image[b] * 1e3:.1f} | {launch[b] * host_us * 1e-3:.1f} | {bound[b] * 1e3:.1f} "
              f"| {1 / bound[b]:.2f} | {bound[first] / bound[b]:.2f}x |")  # fmt: skip
    print(f"# traced in {time.perf_counter() - t0:.0f}s on the meta device")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
