"""bench/roofline.py prices what the meta device traces: its counts must be right for operators whose cost
is known by hand, or its conclusions mean nothing. (Its figures themselves are not checked.)"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import torch.nn.functional as F  # noqa: E402

from bench import roofline  # noqa: E402

META = torch.device("meta")


def test_a_linear_layer_is_two_flops_per_multiply_add_and_its_tensors_once() -> None:
    m, k, n = 64, 32, 16
    layer = torch.nn.Linear(k, n, dtype=torch.bfloat16, device=META)
    x = torch.empty(m, k, dtype=torch.bfloat16, device=META)
    t = roofline.trace(lambda: layer(x))
    assert [o.name for o in t.ops] == ["addmm"]
    assert t.flops == 2 * m * k * n
    assert t.bytes == 2 * (m * k + k * n + n + m * n)  # input, weight, bias read; output written


def test_attention_is_one_fused_kernel_and_views_are_free() -> None:
    b, h, seq, d = 2, 4, 128, 32
    q, k, v = (torch.empty(b, h, seq, d, dtype=torch.bfloat16, device=META) for _ in range(3))
    t = roofline.trace(lambda: F.scaled_dot_product_attention(q.transpose(1, 2).transpose(1, 2), k, v))
    assert [o.name for o in t.ops] == ["attention"]
    assert t.flops == 4 * b * h * seq * seq * d
    assert t.bytes == 4 * (b * h * seq * d * 2)


def test_on_the_roofline_an_operator_costs_its_slower_side() -> None:
    op = roofline.Op("x", flops=4e12, bytes=1e9)
    assert op.seconds(peak=1e12, bandwidth=1e12) == 4.0 and not op.memory_bound(1e12, 1e12)
    assert op.seconds(peak=1e15, bandwidth=1e11) == 0.01 and op.memory_bound(1e15, 1e11)


def test_batching_shares_the_weights_but_not_the_work(capsys: pytest.CaptureFixture[str]) -> None:
    pipe = roofline.build_tiny_pipeline()
    one, four = roofline.generation(pipe, 1, 256, 16, 8), roofline.generation(pipe, 4, 256, 16, 8)
    (step1, calls1), (step4, calls4) = one["transformer step"], four["transformer step"]
    assert (calls1, calls4) == (8, 2)  # a batch of four shares each step's call
    assert step4.flops == pytest.approx(4 * step1.flops, rel=0.01)
    assert step4.bytes < 4 * step1.bytes  # the weights are read once for the four images
    assert len(step4.ops) < 2 * len(step1.ops)  # the same kernels serve the batch

    assert roofline.main(["--size", "256", "--batch-sizes", "1,2", "--launch-us", "10"]) == 0
    out = capsys.readouterr().out
    assert "| 2 | transformer step |" in out and "| 2 |" in out.split("host ms per image")[1]
