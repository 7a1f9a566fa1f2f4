"""The Triton exact kernels against the fp32 reference: forward, backward, masks, GQA, strides.

Without CUDA the kernels run on CPU under Triton's interpreter (this module sets
``TRITON_INTERPRET=1``, which works only if no earlier module imported triton: in a whole-suite run
the root conftest must set it); with CUDA the same cases run natively as the ``gpu`` variants.
The interpreter computes bfloat16 dots on raw bits (triton-lang/triton#11584), so bfloat16 is
covered by the GPU variants only. Errors are relative RMS, bounded by a multiple of the dtype's
epsilon.
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # read when triton is first imported, so before attnopt is
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from attnopt.codegen import ops, registry
from attnopt.codegen.reference.exact import exact_attention
from attnopt.codegen.signature import KernelSignature
from attnopt.codegen.triton import exact as triton_exact
from attnopt.errors import KernelError
from attnopt.targets import TARGETS, resolve

# exp2 of a masked score that overflowed to -inf is 0, as on the GPU; numpy warns on the way.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
HAS_CUDA = torch.cuda.is_available()
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # ~2 eps for halves
FP32_MIN = torch.finfo(torch.float32).min


def _require(device: str) -> None:
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    if device == "cpu" and not triton_exact.INTERPRETED:
        pytest.skip("triton was imported without TRITON_INTERPRET=1: it compiles for CUDA only")


def _targets(cpu_dtypes: tuple, gpu_dtypes: tuple) -> list:
    """(device, dtype) params: the interpreter on CPU, the compiler on CUDA (marked gpu)."""
    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    cpu = [pytest.param("cpu", dt, id=f"interp-{name[dt]}") for dt in cpu_dtypes]
    gpu = [
        pytest.param("cuda", dt, id=f"cuda-{name[dt]}", marks=pytest.mark.gpu) for dt in gpu_dtypes
    ]
    return cpu + gpu


ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GRID_TARGETS = _targets((torch.float32, torch.float16), ALL_DTYPES)
FP32_TARGETS = _targets((torch.float32,), (torch.float32,))


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``‖actual − expected‖ / ‖expected‖`` over all elements (absolute when expected is 0)."""
    diff = (actual.double() - expected.double()).norm()
    return (diff / expected.double().norm().clamp_min(1e-12)).item()


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = rel_rms(actual, expected)
    assert err <= tol, f"{name}: relative RMS error {err:.3g} > {tol:.3g}"


def _mask(kind: str, b: int, h: int, n: int, m: int, gen: torch.Generator):
    """(mask, causal, window, fill) for a mask kind; masks arrive expanded from broadcast shapes."""
    shape = (b, h, n, m)
    if kind == "additive":
        return 2 * torch.randn(b, 1, n, m, generator=gen).expand(shape), False, 0, float("-inf")
    if kind == "boolean":  # a key-and-query pattern shared by the batch, stride 0 over b
        return (torch.rand(1, h, n, m, generator=gen) > 0.3).expand(shape), False, 0, float("-inf")
    if kind == "empty_rows":  # every third query sees nothing: 0 output, -inf lse
        rows = torch.arange(n).reshape(1, 1, n, 1) % 3 != 1
        return rows.expand(shape), True, 0, float("-inf")
    if kind == "padding":  # HF-style key padding: finite finfo.min, never -inf
        keys = torch.arange(m) < max(1, m - 3)
        add = torch.where(keys, 0.0, FP32_MIN).reshape(1, 1, 1, m)
        return add.expand(shape), False, 0, float("-inf")
    structural = {  # windows scale with m: masked edges, and unmasked tiles inside long bands
        "none": (False, 0),
        "causal": (True, 0),
        "window": (False, max(2, m // 2)),
        "causal_window": (True, max(2, 3 * m // 4)),
    }
    causal, window = structural[kind]
    return None, causal, window, float("-inf")


def _run_case(device, dtype, b, h, kv_heads, n, m, d, mask_kind, config, dv=None, seed=0):
    """Forward and backward of the kernel and of the fp32 reference on the same inputs."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen).to(device, dtype)
    k = torch.randn(b, kv_heads, m, d, generator=gen).to(device, dtype)
    v = torch.randn(b, kv_heads, m, dv or d, generator=gen).to(device, dtype)
    grad = torch.randn(b, h, n, dv or d, generator=gen).to(device, dtype)
    mask, causal, window, fill = _mask(mask_kind, b, h, n, m, gen)
    mask = None if mask is None else mask.to(device)
    flags = dict(scale=d**-0.5, causal=causal, window=window, fill=fill)
    fwd, bwd = config
    out, lse = triton_exact.forward(q, k, v, mask, **flags, config=fwd)
    grads = triton_exact.backward(grad, q, k, v, mask, out, lse, **flags, config=bwd)

    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = exact_attention(*leaves, mask, **flags)
    ref_grads = torch.autograd.grad(ref_out, leaves, grad.float())
    return (out, lse, grads), (ref_out, ref_lse, ref_grads)


def _check(results, dtype) -> None:
    (out, lse, grads), (ref_out, ref_lse, ref_grads) = results
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close("out", out, ref_out, tol)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "rows with -inf lse differ"
    assert_close("lse", lse[~empty], ref_lse[~empty], TOLERANCE[torch.float32])
    for name, g, ref in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert g.dtype == dtype
        assert_close(name, g, ref, tol)


def _config(block_m: int, block_n: int) -> dict:
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 2}


# id: (batch, heads, kv_heads, n, m, head_dim, forward tiles, backward tiles). Tiles are small
# and unequal so queries and keys span several tiles, partial ones included.
SHAPES = {
    "decode-n1-m37-gqa2-d16": (2, 4, 2, 1, 37, 16, (16, 16), (16, 16)),
    "n7-mha-d24": (1, 2, 2, 7, 7, 24, (16, 16), (16, 16)),
    "n33-m47-mqa-d64": (1, 4, 1, 33, 47, 64, (16, 32), (32, 16)),
    "n40-m17-gqa2-d16": (2, 2, 1, 40, 17, 16, (32, 16), (16, 32)),
    "n70-m90-gqa4-d80": (1, 8, 2, 70, 90, 80, (32, 16), (16, 32)),
}
MASKS = (
    "none",
    "causal",
    "additive",
    "boolean",
    "window",
    "causal_window",
    "empty_rows",
    "padding",
)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize(("device", "dtype"), GRID_TARGETS)
def test_matches_reference(device, dtype, shape, mask_kind):
    _require(device)
    *dims, fwd_tiles, bwd_tiles = SHAPES[shape]
    config = (_config(*fwd_tiles), _config(*bwd_tiles))
    _check(_run_case(device, dtype, *dims, mask_kind, config), dtype)


@pytest.mark.parametrize(("device", "dtype"), FP32_TARGETS)
def test_fully_padded_rows_average_values(device, dtype):
    """A row whose every key carries a finite ``finfo.min`` (HF padding) is a softmax of equal
    scores: the mean of V, as eager ``torch.softmax`` gives. The oracle here is that softmax: the
    reference's ``exp(scores - lse)`` rounds ``lse`` at that magnitude and returns the sum."""
    _require(device)
    b, h, n, m, d = 1, 2, 9, 11, 16
    gen = torch.Generator().manual_seed(3)
    q, k, v, grad = (torch.randn(b, h, s, d, generator=gen).to(device) for s in (n, m, m, n))
    padded = ((torch.arange(n) % 4 == 2)[:, None] | (torch.arange(m) >= m - 3)).to(device)
    mask = torch.where(padded, FP32_MIN, 0.0).expand(b, h, n, m)
    config = _config(16, 16)
    out, lse = triton_exact.forward(q, k, v, mask, scale=0.25, config=config)
    grads = triton_exact.backward(grad, q, k, v, mask, out, lse, scale=0.25, config=config)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    scores = leaves[0] @ leaves[1].transpose(-1, -2) * 0.25 + mask
    ref_out = torch.softmax(scores, dim=-1) @ leaves[2]
    ref_grads = torch.autograd.grad(ref_out, leaves, grad)
    assert_close("out", out, ref_out, TOLERANCE[dtype])
    assert_close(
        "padded rows",
        out[:, :, 2::4],
        v.mean(-2, keepdim=True).expand_as(out[:, :, 2::4]),
        TOLERANCE[dtype],
    )
    assert (lse[:, :, 2::4] < -1e38).all() and (lse[:, :, 1::4] > -1e3).all()
    for name, g, ref in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert_close(name, g, ref, TOLERANCE[dtype])


def _allowed(i: int, j: int, n: int, m: int, causal: bool, window: int) -> bool:
    """The contract's structural rule for query ``i`` and key ``j``."""
    shifted = i + m - n
    return (not causal or j <= shifted) and (window == 0 or abs(shifted - j) < window)


def _check_band(n, m, causal, window, rows_block, cols_block, mirrored) -> None:
    lo_diag, hi_diag = (int(x) for x in triton_exact._diagonals(n, m, causal, window))
    n_rows, n_cols = (m, n) if mirrored else (n, m)
    band = (-hi_diag, -lo_diag) if mirrored else (lo_diag, hi_diag)

    def ok(row: int, col: int) -> bool:
        query, key = (col, row) if mirrored else (row, col)
        return _allowed(query, key, n, m, causal, window)

    for start in range(0, n_rows, rows_block):
        tiles = triton_exact._band_tiles(start, n_cols, *band, rows_block, cols_block)
        lo, full_lo, full_hi, hi = (int(x) for x in tiles)
        case = (n, m, causal, window, rows_block, cols_block, start, (lo, full_lo, full_hi, hi))
        assert lo <= full_lo <= full_hi and lo % cols_block == full_lo % cols_block == 0, case
        visited = [*range(lo, full_lo, cols_block), *range(full_lo, hi, cols_block)]
        rows = range(start, start + rows_block)
        real_rows = range(start, min(start + rows_block, n_rows))
        for col in range(n_cols):
            if any(ok(r, col) for r in real_rows):
                assert col // cols_block * cols_block in visited, (case, col)
        for tile in visited:
            cols = range(tile, tile + cols_block)
            assert any(ok(r, c) for r in rows for c in cols if c < n_cols), (case, tile)
            if full_lo <= tile < full_hi:
                assert tile + cols_block <= n_cols, (case, tile)
                assert all(ok(r, c) for r in real_rows for c in cols), (case, tile)


@pytest.mark.skipif(not triton_exact.INTERPRETED, reason="calls a device helper from Python")
@pytest.mark.parametrize("mirrored", [False, True], ids=["query-tiles", "key-tiles"])
def test_band_tiles_cover_the_band_and_skip_the_rest(mirrored):
    """Every allowed pair lies in a visited tile, tiles run unmasked only when wholly allowed and
    in bounds, and every visited tile holds an allowed pair (causal skips the upper triangle).
    ``mirrored`` is the dk/dv pass: rows are keys, columns queries."""
    for case in itertools.product(
        (1, 5, 16, 31, 33),
        (1, 17, 32, 40, 47),
        (False, True),
        (0, 1, 2, 7, 18, 38),
        (16, 32),
        (16, 32),
    ):
        _check_band(*case, mirrored)


@pytest.mark.parametrize(("device", "dtype"), FP32_TARGETS)
@pytest.mark.parametrize("head_dim", [16, 40, 128, 256])
def test_head_dims(device, dtype, head_dim):
    _require(device)
    config = (_config(16, 32), _config(16, 32))
    _check(_run_case(device, dtype, 1, 2, 1, 19, 21, head_dim, "causal", config), dtype)


@pytest.mark.parametrize(("device", "dtype"), FP32_TARGETS)
def test_value_dim_differs(device, dtype):
    _require(device)
    config = (_config(16, 16), _config(16, 16))
    _check(_run_case(device, dtype, 1, 2, 2, 20, 18, 24, "additive", config, dv=40), dtype)


@pytest.mark.parametrize(("device", "dtype"), FP32_TARGETS)
def test_arbitrary_strides(device, dtype):
    """q from a (B, N, H, D) buffer, k expanded over batch (stride 0), v a slice, dO expanded."""
    _require(device)
    b, h, kv_heads, n, m, d = 2, 4, 2, 21, 18, 24
    q = torch.randn(b, n, h, d, device=device).transpose(1, 2)
    k = torch.randn(1, kv_heads, m, d, device=device).expand(b, -1, -1, -1)
    v = torch.randn(b, kv_heads, m, 2 * d, device=device)[..., ::2]
    grad = torch.randn(1, 1, n, d, device=device).expand(b, h, n, d)
    flags = dict(scale=0.3, causal=True, window=0)
    config = _config(16, 16)
    out, lse = triton_exact.forward(q, k, v, **flags, config=config)
    grads = triton_exact.backward(grad, q, k, v, None, out, lse, **flags, config=config)

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref_out, _ = exact_attention(*leaves, **flags)
    ref_grads = torch.autograd.grad(ref_out, leaves, grad)
    assert_close("out", out, ref_out, TOLERANCE[dtype])
    for name, g, ref in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert_close(name, g, ref, TOLERANCE[dtype])


@pytest.mark.parametrize(("device", "dtype"), FP32_TARGETS)
def test_launchers_ask_config_for_unless_given_a_config(device, dtype, monkeypatch):
    """Without ``config=`` each pass launches what ``runtime.config_for`` returns for its space."""
    _require(device)
    asked = []

    def config_for(space, target, sig):
        asked.append((space.kernel, sig.mask_kind, sig.n, sig.m))
        return _config(32, 16), "tuned:test"

    monkeypatch.setattr(triton_exact, "config_for", config_for)
    q, k, v, grad = (torch.randn(1, 2, s, 32, device=device) for s in (70, 50, 50, 70))
    out, lse = triton_exact.forward(q, k, v, scale=0.2, causal=True)
    grads = triton_exact.backward(grad, q, k, v, None, out, lse, scale=0.2, causal=True)
    assert asked == [(f"triton.exact.{p}", "causal", 70, 50) for p in ("forward", "backward")]
    triton_exact.forward(q, k, v, scale=0.2, config=_config(16, 16))
    assert len(asked) == 2

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, _ = exact_attention(*leaves, scale=0.2, causal=True)
    ref_grads = torch.autograd.grad(ref_out, leaves, grad)
    assert_close("out", out, ref_out, TOLERANCE[dtype])
    for name, g, ref in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert_close(name, g, ref, TOLERANCE[dtype])


@pytest.mark.parametrize(("device", "dtype"), FP32_TARGETS)
def test_op_uses_kernel_backward_unless_mask_needs_grad(device, dtype, monkeypatch):
    """``attnopt::attention`` gradients come from ``kernel.backward``, or from the reference
    when the mask itself needs a gradient."""
    _require(device)
    calls = []

    def counted_backward(*args, **kwargs):
        calls.append(1)
        return triton_exact.backward(*args, **kwargs)

    kernel = registry.Kernel(
        "exact", device, "triton", triton_exact.forward, counted_backward, triton_exact.supports, 10
    )
    monkeypatch.setitem(registry._KERNELS, ("exact", device), {"triton": kernel})
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, s, 9, 16, generator=gen).to(device) for s in (4, 2, 2))
    mask = torch.randn(1, 1, 9, 9, generator=gen).to(device)
    for mask_grad in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        m = mask.clone().requires_grad_(mask_grad)
        with ops.use_kernel("triton"):
            out = ops.attention(*leaves, m, 0.25, False, 0, float("-inf"), 2)
            out.square().sum().backward()
        ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_mask = mask.clone().requires_grad_(mask_grad)
        ref_out, _ = exact_attention(*ref_leaves, ref_mask.expand(2, 4, 9, 9), scale=0.25)
        ref_out.square().sum().backward()
        assert len(calls) == 1, "the kernel's backward runs only when the mask needs no grad"
        for name, leaf, ref in zip("qkv", leaves, ref_leaves, strict=True):
            assert_close(f"d{name}", leaf.grad, ref.grad, TOLERANCE[dtype])
        if mask_grad:
            assert_close("dmask", m.grad, ref_mask.grad, TOLERANCE[dtype])


def test_registered_for_cuda():
    (kernel,) = [k for k in registry.kernels_for("exact", "cuda") if k.name == "triton"]
    assert kernel.priority == 10 and kernel.backward is triton_exact.backward


@pytest.mark.parametrize(("device", "dtype"), FP32_TARGETS)
def test_refuses_inputs_outside_the_contract(device, dtype):
    _require(device)
    q = torch.randn(1, 2, 8, 16, device=device)
    wide = torch.randn(1, 2, 8, 512, device=device)
    three_heads = torch.randn(1, 3, 8, 16, device=device)
    int_mask = torch.ones(1, 2, 8, 8, dtype=torch.int32, device=device)
    assert "head dim" in triton_exact.supports(wide, wide, wide, None, False, 0)
    assert "share" in triton_exact.supports(q, q.half(), q, None, False, 0)
    assert "H % Hkv" in triton_exact.supports(q, three_heads, three_heads, None, False, 0)
    assert "mask" in triton_exact.supports(q, q, q, int_mask, False, 0)
    with pytest.raises(KernelError, match="broadcast"):
        triton_exact.forward(q, q, q, torch.zeros(3, 8, 8, device=device), scale=1.0)
    if triton_exact.INTERPRETED:
        bf16 = q.bfloat16()
        assert "bfloat16" in triton_exact.supports(bf16, bf16, bf16, None, False, 0)


def test_config_space_prunes_with_reasons():
    sig = KernelSignature(head_dim=128, dtype="bfloat16", mask_kind="causal", n=4096, m=4096)
    space = triton_exact.FORWARD_SPACE
    assert space.keep(space.default(TARGETS["h100"], sig), TARGETS["h100"], sig) is None
    assert "not a GPU" in space.keep(triton_exact.INTERPRETER_CONFIG, resolve("cpu"), sig)
    big = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 4}
    assert "shared memory" in space.keep(big, TARGETS["sm89"], sig)
    assert "bfloat16" in space.keep(big, TARGETS["cuda"], sig)
    few_warps = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 2, "num_stages": 1}
    assert "registers" in space.keep(few_warps, TARGETS["h100"], sig)
    short = KernelSignature(head_dim=64, dtype="float16", n=20, m=20)
    assert "longer than" in space.keep(big, TARGETS["h100"], short)
    for space in (triton_exact.FORWARD_SPACE, triton_exact.BACKWARD_SPACE):
        for name in ("h100", "a100", "sm89", "cuda"):
            fp16 = KernelSignature(head_dim=128, dtype="float16", n=4096, m=4096)
            assert space.keep(space.default(TARGETS[name], fp16), TARGETS[name], fp16) is None
        assert space.valid(TARGETS["h100"], sig)
        assert space.default(resolve("cpu"), sig) == triton_exact.INTERPRETER_CONFIG


@pytest.mark.parametrize("arch", [80, 90])
def test_compiles_for_cuda_targets(arch):
    """The compiled paths (which the interpreter never exercises) build for sm_80 and sm_90, and
    the shared memory the compiler allots stays within ``keep``'s estimate."""
    script = Path(__file__).with_name("compile_for_target.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(script), str(arch)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {r["kernel"] for r in rows} == {
        "_fwd_kernel",
        "_delta_kernel",
        "_dkdv_kernel",
        "_dq_kernel",
        "_split_kernel",  # triton/decode.py
        "_merge_kernel",
    }
    for row in rows:
        assert row["estimate"] is None or row["shared"] <= row["estimate"], row
