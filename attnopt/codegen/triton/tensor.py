"""Triton kernel for exact tensor attention (ALGORITHMS.md §4): online softmax over key pairs.

Contract and oracle: ``codegen/reference/tensor.py``. One program per (batch·head, block of
``BLOCK_M`` queries) keeps the running max, sum and ``BLOCK_M × Dv`` accumulator in registers.
For each first key ``j`` the pair scores with a tile of second keys are one matmul,
``(q ∘ k1_j)·K2ᵀ``, and the pair values of that tile ``v1_j ∘ V2``: flash attention's inner loop
over ``(j, tile)``, so memory stays ``O(N·Dv)`` and the ``N × M1 × M2`` scores never exist.
Keys outside the causal / window span of the query block are never visited, so a window ``w``
costs ``O(N·w²·D)``.

FLOPs (reported by the benchmark): ``4·B·H·N·M1·M2·D`` for scores and values together
(``2·D`` for ``⟨q ∘ k1, k2⟩``, ``2·Dv`` for the value update, with ``Dv = D``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnopt.codegen.registry import Kernel, register_kernel
from attnopt.codegen.triton.exact import INTERPRETED
from attnopt.errors import KernelError

MAX_HEAD_DIM = 128


@triton.jit
def _span(first, last, N, M, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """``[lo, hi)``: the keys some query in ``first .. last`` may see (bottom-right aligned)."""
    offset = M - N
    lo = 0
    hi = M
    if CAUSAL:
        hi = tl.minimum(hi, last + offset + 1)
    if WINDOW > 0:
        lo = tl.maximum(lo, first + offset - WINDOW + 1)
        if not CAUSAL:
            hi = tl.minimum(hi, last + offset + WINDOW)
    return lo, tl.maximum(hi, lo)


@triton.jit
def _keep(rows, cols, N, M, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Which (query, key) the causal / window flags allow, as ``structural_keep`` does."""
    diag = rows + (M - N)
    keep = (cols < M) & (rows >= 0)  # broadcast to the (rows, cols) shape
    if CAUSAL:
        keep = keep & (cols <= diag)
    if WINDOW > 0:
        keep = keep & (tl.abs(diag - cols) < WINDOW)
    return keep


@triton.jit
def _tile(ptr, base, rows, rmask, cols, cmask, width):
    """Rows ``base + rows`` of a row-major ``(·, width)`` tensor, columns ``cols``, fp32."""
    offsets = (base + rows[:, None]) * width + cols[None, :]
    return tl.load(ptr + offsets, mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _forward(
    Q, K1, K2, V1, V2, Out,
    N, M1, M2, D, DV, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    first = tl.program_id(1) * BLOCK_M
    rows = first + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    vdims = tl.arange(0, BLOCK_DV)
    rmask = rows < N
    dmask = dims < D
    vmask = vdims < DV
    q = _tile(Q, bh * N, rows, rmask, dims, dmask, D) * scale
    run_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    last = tl.minimum(first + BLOCK_M, N) - 1
    lo1, hi1 = _span(first, last, N, M1, CAUSAL, WINDOW)
    lo2, hi2 = _span(first, last, N, M2, CAUSAL, WINDOW)
    for j in range(lo1, hi1):
        k1 = tl.load(K1 + (bh * M1 + j) * D + dims, mask=dmask, other=0.0).to(tl.float32)
        v1 = tl.load(V1 + (bh * M1 + j) * DV + vdims, mask=vmask, other=0.0).to(tl.float32)
        keep1 = _keep(rows, j, N, M1, CAUSAL, WINDOW)
        qk1 = q * k1[None, :]
        for start in range(lo2, hi2, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            cmask = cols < hi2
            k2 = _tile(K2, bh * M2, cols, cmask, dims, dmask, D)
            v2 = _tile(V2, bh * M2, cols, cmask, vdims, vmask, DV)
            scores = tl.dot(qk1, tl.trans(k2), input_precision=DOT_PRECISION)
            keep2 = _keep(rows[:, None], cols[None, :], N, M2, CAUSAL, WINDOW)
            keep = keep1[:, None] & cmask[None, :] & keep2
            scores = tl.where(keep, scores, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(scores, axis=1))
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            correction = tl.exp(run_max - safe)
            p = tl.exp(scores - safe[:, None])
            run_sum = run_sum * correction + tl.sum(p, axis=1)
            pair_v = v2 * v1[None, :]
            acc = acc * correction[:, None] + tl.dot(p, pair_v, input_precision=DOT_PRECISION)
            run_max = new_max
    out = acc / tl.maximum(run_sum, 1.1754943508222875e-38)[:, None]
    tl.store(Out + (bh * N + rows[:, None]) * DV + vdims[None, :], out.to(Out.dtype.element_ty),
             mask=rmask[:, None] & vmask[None, :])  # fmt: skip


def _block(size: int) -> int:
    return max(16, triton.next_power_of_2(size))


def supports(q, k1, k2, v1, v2, causal: bool, window: int) -> str | None:
    """None, or why these inputs are outside the kernel's contract."""
    if q.device.type != "cuda" and not INTERPRETED:
        return "Triton runs on CUDA tensors (or in the interpreter)"
    if any(t.dim() != 4 for t in (q, k1, k2, v1, v2)):
        return "needs (B, H, N, D), (B, H, M1, D), (B, H, M2, D), (B, H, M1, Dv), (B, H, M2, Dv)"
    if len({t.shape[:2] for t in (q, k1, k2, v1, v2)}) != 1:
        return "q, keys and values need the same batch and heads"
    if q.shape[-1] > MAX_HEAD_DIM or v1.shape[-1] > MAX_HEAD_DIM:
        return f"head or value dim above {MAX_HEAD_DIM}"
    return None


def forward(q, k1, k2, v1, v2, *, scale: float, causal: bool = False, window: int = 0):
    """Exact tensor attention, ``(B, H, N, Dv)`` in ``q.dtype``."""
    reason = supports(q, k1, k2, v1, v2, causal, window)
    if reason is not None:
        raise KernelError(reason)
    batch, heads, n, d = q.shape
    q, k1, k2, v1, v2 = (t.contiguous() for t in (q, k1, k2, v1, v2))
    dv = v1.shape[-1]
    out = torch.empty(batch, heads, n, dv, device=q.device, dtype=q.dtype)
    block_m = 16 if INTERPRETED else 64
    grid = (batch * heads, triton.cdiv(n, block_m))
    _forward[grid](
        q, k1, k2, v1, v2, out,
        n, k1.shape[-2], k2.shape[-2], d, dv, float(scale),
        BLOCK_M=block_m, BLOCK_N=16 if INTERPRETED else 64,
        BLOCK_D=_block(d), BLOCK_DV=_block(dv),
        CAUSAL=bool(causal), WINDOW=int(window),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return out


TRITON_TENSOR = register_kernel(
    Kernel(
        variant="tensor",
        device_type="cuda",
        name="triton",
        forward=forward,
        supports=supports,
        priority=10,
    )
)
