"""The quant reference (ALGORITHMS.md §6): block quantization error bounds, K smoothing leaving
the softmax unchanged, and the quantized attention against exact attention over masks and GQA."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attnopt.codegen.eager.quant import quant_attention_cpu
from attnopt.codegen.quant_ops import quant_forward
from attnopt.codegen.reference.exact import exact_attention
from attnopt.codegen.reference.quant import (
    QMAX,
    dequantize_blocks,
    int_scores,
    quant_attention,
    quantize_blocks,
    smooth_k,
)


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n,block", [(64, 32), (70, 32), (5, 128)])
def test_quantize_dequantize_within_half_a_step_per_block(bits, n, block):
    x = torch.randn(2, 3, n, 16) * torch.rand(2, 3, n, 1) * 5
    values, scales = quantize_blocks(x, block, bits, scale=0.3)
    assert values.dtype == torch.int8 and scales.shape == (2, 3, math.ceil(n / block))
    assert values.abs().max() <= QMAX[bits]
    error = (dequantize_blocks(values, scales, block) - x * 0.3).abs()
    step = scales.repeat_interleave(block, dim=-1)[..., :n, None]
    assert (error <= step / 2 + 1e-6).all()
    # each block uses its full range: the largest value in every block maps to ±qmax
    for start in range(0, n, block):
        peak = values[:, :, start : start + block].abs().amax(dim=(-2, -1))
        assert (peak == QMAX[bits]).all()


def test_int_scores_are_exact_int32():
    a = torch.randint(-127, 128, (1, 1, 9, 128), dtype=torch.int8)
    b = torch.randint(-127, 128, (1, 1, 7, 128), dtype=torch.int8)
    got = int_scores(a, b)
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), a.long() @ b.long().transpose(-2, -1))


def test_k_smoothing_leaves_softmax_unchanged_in_fp64():
    q = torch.randn(2, 4, 33, 16, dtype=torch.float64)
    k = torch.randn(2, 4, 40, 16, dtype=torch.float64) + 3.0  # a large shared offset in K
    before = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1)
    smoothed = k - k.mean(dim=-2, keepdim=True)
    after = torch.softmax(q @ smoothed.transpose(-2, -1) * 0.25, dim=-1)
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-14)
    assert smooth_k(k).abs().mean() < k.abs().mean() / 2  # and it did shrink K


def _case(name: str):
    b, h, hkv, n, m, d = 2, 4, 2, 37, 45, 32
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, hkv, m, d) + 1.0, torch.randn(b, hkv, m, d)
    flags = {"scale": d**-0.5}
    mask = None
    if name == "causal":
        flags["causal"] = True
    elif name == "window":
        flags["window"] = 9
    elif name == "additive":
        mask = torch.randn(b, 1, n, m).expand(b, h, n, m)
    elif name == "boolean":
        mask = (torch.rand(b, h, n, m) > 0.3) | torch.eye(n, m, dtype=torch.bool)
    elif name == "causal_gqa4":
        k, v = k[:, :1], v[:, :1]
        flags["causal"] = True
    return q, k, v, mask, flags


@pytest.mark.parametrize("name", ["none", "causal", "window", "additive", "boolean", "causal_gqa4"])
@pytest.mark.parametrize("pv", ["fp16", "fp8", "int8"])
def test_int8_attention_close_to_exact(name, pv):
    q, k, v, mask, flags = _case(name)
    want, _ = exact_attention(q, k, v, mask, **flags)
    got = quant_attention(q, k, v, mask, **flags, bits=8, pv=pv, block_q=16, block_k=16)
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert cos(got, want) >= 0.995
    assert (got - want).abs().max() > 0  # a real approximation


def test_int4_is_coarser_than_int8_and_still_close():
    q, k, v, mask, flags = _case("causal")
    want, _ = exact_attention(q, k, v, mask, **flags)
    err = {
        bits: (quant_attention(q, k, v, mask, **flags, bits=bits) - want).norm().item()
        for bits in (8, 4)
    }
    assert err[4] > err[8]
    assert cos(quant_attention(q, k, v, mask, **flags, bits=4), want) >= 0.95


def test_fully_masked_rows_give_zero_and_finfo_min_rows_average():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    boolean = torch.ones(1, 2, 4, 6, dtype=torch.bool)
    boolean[:, :, 1] = False
    for pv in ("fp16", "int8"):  # int8 adds V's channel means back: not to empty rows
        got = quant_attention(q, k, v, boolean, scale=0.3, pv=pv)
        assert torch.equal(got[:, :, 1], torch.zeros_like(got[:, :, 1]))
    padded = torch.zeros(1, 2, 4, 6)
    padded[:, :, 2] = torch.finfo(torch.float32).min
    want, _ = exact_attention(q, k, v, padded, scale=0.3)
    got = quant_attention(q, k, v, padded, scale=0.3)
    assert cos(got[:, :, 2], want[:, :, 2]) > 0.999  # the uniform average of V, not 0


def test_bad_knobs_are_named():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quant_attention(q, q, q, scale=1.0, bits=2)


def test_cpu_kernel_matches_reference_at_each_isa_level(cpu_level):
    """The integer-GEMM CPU kernel in a process capped at each ISA level this machine runs
    (AVX2 with ``vpmaddubsw`` included, so AVX2-only machines are covered)."""
    _, isa = cpu_level.int_dot
    level = "avx512" if cpu_level.vector_bits == 512 else "avx2"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa, "ATEN_CPU_CAPABILITY": level}
    env["ATTNOPT_CPU_TARGET"] = level
    script = Path(__file__).with_name("quant_cpu_check.py")
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-2000:]
    k_qmax = "63" if level == "avx2" and isa == "AVX2" else "127"
    assert done.stdout.split() == ["ok", isa, level.upper(), k_qmax]


def test_cpu_kernel_is_what_the_op_runs_on_cpu():
    q, k, v = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    flags = {"scale": 0.25, "causal": True, "window": 0, "fill": float("-inf")}
    got = quant_forward(q, k, v, None, bits=8, pv="fp16", **flags)
    assert torch.equal(got, quant_attention_cpu(q, k, v, None, bits=8, pv="fp16", **flags))
