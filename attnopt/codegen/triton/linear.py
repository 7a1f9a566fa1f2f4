"""Triton kernels for the linear family (ALGORITHMS.md §3): chunked prefill and the fused
recurrent step for decoding.

Contract: ``codegen/linear_ops.py`` (φ(q) ``(B, H, N, F)``, φ(k) ``(B, Hkv, M, F)``, v ``(B, Hkv,
M, Dv)``, optional gates ``log α`` beside φ(k), normalised output); oracles in
``codegen/reference/linear.py``. One program per (batch·head, block of value columns) walks the
sequence in chunks of ``CHUNK`` tokens with the ``F × BLOCK_V`` state ``S`` and the normaliser
``z`` in fp32 registers:

    b = cumsum(log α) in the chunk      q̃ = q·e^{b}    k̃ = k·e^{−b}    k̂ = k·e^{b_last − b}
    A = tril(q̃ k̃ᵀ)                    out = (q̃ S + A v) / (q̃·z + rowsum A + eps)
    S = e^{b_last}·S + k̂ᵀ v            z = e^{b_last}·z + colsum k̂

``e^{−b}`` grows with the decay inside one chunk only (at most ``CHUNK·max|log α|``; with the
pass's gates ``logsigmoid(k)/16`` and ``CHUNK = 16`` it stays far below fp32's range). Not causal:
a first sweep sums every key into ``S, z``, a second writes ``q S / (q z)``. The recurrent step
updates ``S, z`` in place for one token in ``O(F·Dv)``, constant memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnopt.codegen.registry import Kernel, register_kernel
from attnopt.codegen.triton.exact import INTERPRETED
from attnopt.errors import KernelError

EPS = 1e-6
MAX_FEATURE = 256  # the state tile (F × BLOCK_V fp32) lives in registers


@triton.jit
def _rows(ptr, base, t, tmask, cols, cmask, width):
    """Rows ``base + t`` of a row-major ``(·, width)`` tensor, columns ``cols``, fp32, 0 outside."""
    offsets = (base + t[:, None]) * width + cols[None, :]
    return tl.load(ptr + offsets, mask=tmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _chunk_forward(
    Q, K, V, G, Out,
    N, M, H, GROUP, F, DV, eps,
    CHUNK: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr,
    CAUSAL: tl.constexpr, GATED: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    vb = tl.program_id(1)
    b = bh // H
    hk = (bh % H) // GROUP
    kv = b * (H // GROUP) + hk
    rows = tl.arange(0, CHUNK)
    feats = tl.arange(0, BLOCK_F)
    cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    fmask = feats < F
    cmask = cols < DV
    state = tl.zeros((BLOCK_F, BLOCK_V), dtype=tl.float32)
    norm = tl.zeros((BLOCK_F,), dtype=tl.float32)
    if not CAUSAL:
        for start in range(0, M, CHUNK):
            t = start + rows
            tmask = t < M
            k = _rows(K, kv * M, t, tmask, feats, fmask, F)
            v = _rows(V, kv * M, t, tmask, cols, cmask, DV)
            state += tl.dot(tl.trans(k), v)
            norm += tl.sum(k, axis=0)
    for start in range(0, N, CHUNK):
        t = start + rows
        tmask = t < N
        q = _rows(Q, bh * N, t, tmask, feats, fmask, F)
        if CAUSAL:
            k = _rows(K, kv * M, t, tmask, feats, fmask, F)
            v = _rows(V, kv * M, t, tmask, cols, cmask, DV)
            if GATED:
                g = _rows(G, kv * M, t, tmask, feats, fmask, F)
                cum = tl.cumsum(g, axis=0)
                last = tl.sum(g, axis=0)
                q_in = q * tl.exp(cum)
                k_in = k * tl.exp(-cum)
                k_out = k * tl.exp(last[None, :] - cum)
            else:
                q_in = q
                k_in = k
                k_out = k
            a = tl.dot(q_in, tl.trans(k_in))
            a = tl.where(rows[:, None] >= rows[None, :], a, 0.0)
            num = tl.dot(q_in, state) + tl.dot(a, v)
            den = tl.sum(q_in * norm[None, :], axis=1) + tl.sum(a, axis=1)
            if GATED:
                decay = tl.exp(last)
                state = state * decay[:, None]
                norm = norm * decay
            state += tl.dot(tl.trans(k_out), v)
            norm += tl.sum(k_out, axis=0)
        else:
            num = tl.dot(q, state)
            den = tl.sum(q * norm[None, :], axis=1)
        out = num / (den[:, None] + eps)
        tl.store(Out + (bh * N + t[:, None]) * DV + cols[None, :], out.to(Out.dtype.element_ty),
                 mask=tmask[:, None] & cmask[None, :])  # fmt: skip


@triton.jit
def _recurrent_step(
    Q, K, V, G, S, Z, Out,
    H, GROUP, F, DV, eps,
    BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr, GATED: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b = bh // H
    kv = b * (H // GROUP) + (bh % H) // GROUP
    feats = tl.arange(0, BLOCK_F)
    cols = tl.arange(0, BLOCK_V)
    fmask = feats < F
    cmask = cols < DV
    smask = fmask[:, None] & cmask[None, :]
    q = tl.load(Q + bh * F + feats, mask=fmask, other=0.0).to(tl.float32)
    k = tl.load(K + kv * F + feats, mask=fmask, other=0.0).to(tl.float32)
    v = tl.load(V + kv * DV + cols, mask=cmask, other=0.0).to(tl.float32)
    state = tl.load(S + (bh * F + feats[:, None]) * DV + cols[None, :], mask=smask, other=0.0)
    norm = tl.load(Z + bh * F + feats, mask=fmask, other=0.0)
    if GATED:
        decay = tl.exp(tl.load(G + kv * F + feats, mask=fmask, other=0.0).to(tl.float32))
        state = state * decay[:, None]
        norm = norm * decay
    state += k[:, None] * v[None, :]
    norm += k
    out = tl.sum(q[:, None] * state, axis=0) / (tl.sum(q * norm, axis=0) + eps)
    tl.store(S + (bh * F + feats[:, None]) * DV + cols[None, :], state, mask=smask)
    tl.store(Z + bh * F + feats, norm, mask=fmask)
    tl.store(Out + bh * DV + cols, out.to(Out.dtype.element_ty), mask=cmask)


def _block(size: int) -> int:
    return max(16, triton.next_power_of_2(size))


def supports(fq, fk, v, log_alpha, causal: bool) -> str | None:
    """None, or why these inputs are outside the kernel's contract."""
    if fq.device.type != "cuda" and not INTERPRETED:
        return "Triton runs on CUDA tensors (or in the interpreter)"
    if fq.dim() != 4 or fk.dim() != 4 or v.dim() != 4 or fq.shape[1] % fk.shape[1]:
        return "needs (B, H, N, F), (B, Hkv, M, F), (B, Hkv, M, Dv) with H % Hkv == 0"
    if fq.shape[-1] > MAX_FEATURE or v.shape[-1] > MAX_FEATURE:
        return f"feature or value dim above {MAX_FEATURE}"
    if causal and fq.shape[-2] != fk.shape[-2]:
        return "causal needs as many keys as queries"
    if log_alpha is not None and not causal:
        return "gates are causal"
    return None


def forward(fq, fk, v, log_alpha, *, causal: bool, chunk: int = 16) -> torch.Tensor:
    """Chunked prefill; ``chunk`` (a power of two ≥ 16) tokens per step."""
    reason = supports(fq, fk, v, log_alpha, causal)
    if reason is not None:
        raise KernelError(reason)
    chunk = max(16, triton.next_power_of_2(min(chunk, 64)))
    batch, heads, n, feature = fq.shape
    fq, fk, v = (t.contiguous() for t in (fq, fk, v))
    gate = fk if log_alpha is None else log_alpha.float().contiguous()
    out = torch.empty(batch, heads, n, v.shape[-1], device=fq.device, dtype=v.dtype)
    block_v = min(_block(v.shape[-1]), 64)
    grid = (batch * heads, triton.cdiv(v.shape[-1], block_v))
    _chunk_forward[grid](
        fq, fk, v, gate, out,
        n, fk.shape[-2], heads, heads // fk.shape[1], feature, v.shape[-1], EPS,
        CHUNK=chunk, BLOCK_F=_block(feature), BLOCK_V=block_v,
        CAUSAL=causal, GATED=log_alpha is not None,
    )  # fmt: skip
    return out


def step(fq, fk, v, log_alpha, state: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """One decoding token: ``fq (B, H, F)``, ``fk``/``log_alpha`` ``(B, Hkv, F)``, ``v (B, Hkv,
    Dv)``; ``state (B, H, F, Dv)`` and ``norm (B, H, F)`` (fp32) are updated in place."""
    batch, heads, feature = fq.shape
    for t in (state, norm):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise KernelError("state and norm must be contiguous fp32 tensors")
    fq, fk, v = (t.contiguous() for t in (fq, fk, v))
    gate = fk if log_alpha is None else log_alpha.float().contiguous()
    out = torch.empty(batch, heads, v.shape[-1], device=fq.device, dtype=v.dtype)
    _recurrent_step[(batch * heads,)](
        fq, fk, v, gate, state, norm, out,
        heads, heads // fk.shape[1], feature, v.shape[-1], EPS,
        BLOCK_F=_block(feature), BLOCK_V=_block(v.shape[-1]), GATED=log_alpha is not None,
    )  # fmt: skip
    return out


TRITON_LINEAR = register_kernel(
    Kernel(
        variant="linear",
        device_type="cuda",
        name="triton",
        forward=forward,
        supports=supports,
        priority=10,
    )
)
