"""The Triton quant kernels (quantization step and attention) against the quant reference:
Triton's interpreter on CPU at tiny sizes, the compiler on CUDA (``gpu``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # read when triton is first imported, so before attnopt is
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from attnopt.codegen.reference.exact import exact_attention
from attnopt.codegen.reference.quant import quant_attention, quantize_blocks
from attnopt.codegen.triton import exact as triton_exact
from attnopt.codegen.triton import quant as triton_quant
from attnopt.errors import KernelError

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
DEVICES = [
    pytest.param("cpu", id="interp"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


def _require(device: str) -> None:
    if device == "cpu" and not triton_exact.INTERPRETED:
        pytest.skip("triton was imported without TRITON_INTERPRET=1: it compiles for CUDA only")


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_step_matches_reference(device, bits):
    _require(device)
    x = torch.randn(2, 3, 37, 24, device=device)
    values, scales, _ = triton_quant.quantize(x, 16, bits, scale=0.7)
    want_values, want_scales = quantize_blocks(x, 16, bits, scale=0.7)
    torch.testing.assert_close(scales, want_scales)
    # round-half-away here, half-to-even there: they may differ by one at exact ties only
    assert (values.int() - want_values.int()).abs().max() <= 1
    assert (values != want_values).float().mean() < 1e-3


CASES = [  # (name, kv heads, n, m, flags, mask kind)
    ("none", 2, 37, 45, {}, None),
    ("causal_gqa", 1, 37, 45, {"causal": True}, None),
    ("causal_more_queries", 2, 45, 37, {"causal": True}, None),
    ("window", 2, 40, 40, {"window": 7}, None),
    ("additive", 2, 33, 29, {}, "additive"),
    ("boolean", 4, 33, 29, {}, "boolean"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name,kv_heads,n,m,flags,kind", CASES, ids=[c[0] for c in CASES])
def test_attention_matches_reference(device, bits, name, kv_heads, n, m, flags, kind):
    _require(device)
    dtype = torch.float16 if device == "cuda" else torch.float32
    q = torch.randn(2, 4, n, 16, device=device, dtype=dtype)
    k = torch.randn(2, kv_heads, m, 16, device=device, dtype=dtype) + 1
    v = torch.randn(2, kv_heads, m, 16, device=device, dtype=dtype)
    mask = None
    if kind == "additive":
        mask = torch.randn(2, 1, n, m, device=device).expand(2, 4, n, m)
    elif kind == "boolean":
        mask = torch.rand(2, 4, n, m, device=device) > 0.3
        mask[:, :, 0] = False
    args = {"scale": 0.25, "bits": bits, "block_q": 16, "block_k": 16, **flags}
    got = triton_quant.forward(q, k, v, mask, **args)
    want = quant_attention(q, k, v, mask, **args)
    assert rel(got, want) < (2e-3 if dtype == torch.float16 else 1e-4)
    if kind == "boolean":
        assert torch.equal(got[:, :, 0], torch.zeros_like(got[:, :, 0]))
    exact, _ = exact_attention(q, k, v, mask, scale=0.25, **flags)
    assert rel(got, exact) < (0.02 if bits == 8 else 0.2)


def test_fp8_pv_only_where_the_target_has_it():
    _require("cpu")
    q = torch.randn(1, 2, 16, 16)
    why = triton_quant.supports(q, q, q, None, False, 0, 8, "fp8")
    assert why is not None and "FP8 tensor cores" in why
    with pytest.raises(KernelError, match="FP8 tensor cores"):
        triton_quant.forward(q, q, q, scale=0.25, pv="fp8", block_q=16, block_k=16)


@pytest.mark.gpu
def test_native_fp8_and_default_blocks_on_gpu():
    q = torch.randn(2, 8, 1000, 128, device="cuda", dtype=torch.float16)
    k, v = torch.randn_like(q) + 1, torch.randn_like(q)
    exact, _ = exact_attention(q, k, v, scale=128**-0.5, causal=True)
    for pv in ("fp16", "fp8"):
        if triton_quant.supports(q, k, v, None, True, 0, 8, pv) is not None:
            continue
        got = triton_quant.forward(q, k, v, scale=128**-0.5, causal=True, pv=pv)
        want = quant_attention(q, k, v, scale=128**-0.5, causal=True, pv=pv)
        assert rel(got, want) < (2e-3 if pv == "fp16" else 0.05)
        assert (
            torch.nn.functional.cosine_similarity(
                got.float().flatten(), exact.float().flatten(), dim=0
            )
            >= 0.995
        )


def test_kernels_compile_for_hopper_without_a_gpu():
    """The full compile (PTX and cubin) for sm_90, int8 dots and the FP8 P·V included."""
    script = [sys.executable, "-m", "tests.codegen.compile_quant_for_target", "90"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).parents[2]
    proc = subprocess.run(script, capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {(r["kernel"], r["pv"]) for r in rows} == {
        (name, pv) for name in ("_quantize_kernel", "_attn_kernel") for pv in ("fp16", "fp8")
    }
