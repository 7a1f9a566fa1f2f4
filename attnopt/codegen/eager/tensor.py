"""Exact tensor attention fused in batched torch ops: the CPU path (ALGORITHMS.md §4).

Same contract as ``codegen/reference/tensor.py``. The online softmax of exact attention runs over
the flattened pair index: queries in blocks of ``block``, ``j`` and ``l`` in blocks of ``block``,
so at most one ``block³`` tile of scores lives at a time and memory is ``O(N·Dv + block³)``, never
the ``N × M1 × M2`` tensor. Tiles that the causal / window flags exclude entirely are skipped,
so a window ``w`` costs ``O(N·w²·D)``. For a tile, ``Σ_{j,l} p[i,j,l] (v1_j ∘ v2_l) =
Σ_j v1_j ∘ (p[i,j,:] · V2)``: one batched matmul and a weighted sum, no pair values built.
"""

from __future__ import annotations

import torch

from attnopt.codegen.reference.exact import key_range, structural_keep

BLOCK = 64  # a 64³ fp32 tile is 1 MiB; fewer, larger torch calls on CPU


def _blocks(lo: int, hi: int, block: int) -> list[tuple[int, int]]:
    return [(s, min(s + block, hi)) for s in range(lo, hi, block)]


def _visible(n: int, m: int, rows: tuple[int, int], causal: bool, window: int) -> tuple[int, int]:
    """``[first, last)`` of the keys some query of ``rows`` may see."""
    first, last = key_range(n, m, causal, window)
    offset = m - n
    if causal:
        last = min(last, rows[1] - 1 + offset + 1)
    if window > 0:
        first = max(first, rows[0] + offset - window + 1)
        if not causal:
            last = min(last, rows[1] - 1 + offset + window)
    return first, max(first, last)


def tensor_attention(
    q: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    v1: torch.Tensor,
    v2: torch.Tensor,
    *,
    scale: float,
    causal: bool = False,
    window: int = 0,
    block: int = BLOCK,
) -> torch.Tensor:
    """Fused exact tensor attention, blocked online softmax over key pairs (fp32 inside)."""
    n, m1, m2 = q.shape[-2], k1.shape[-2], k2.shape[-2]
    qf, k1f, k2f, v1f, v2f = (t.float() for t in (q, k1, k2, v1, v2))
    masked = causal or window > 0
    keep1 = structural_keep(n, m1, causal, window, q.device) if masked else None
    keep2 = structural_keep(n, m2, causal, window, q.device) if masked else None
    out = qf.new_zeros(*q.shape[:-1], v1.shape[-1])
    for rows in _blocks(0, n, block):
        qb = qf[..., rows[0] : rows[1], :] * scale
        run_max = qb.new_full(qb.shape[:-1], float("-inf"))
        run_sum = qb.new_zeros(qb.shape[:-1])
        acc = qb.new_zeros(*qb.shape[:-1], v1.shape[-1])
        for cols1 in _blocks(*_visible(n, m1, rows, causal, window), block):
            # (…, bq, b1, D): q_i ∘ k1_j, so that a matmul with k2ᵀ gives the scores tile
            qk1 = qb[..., :, None, :] * k1f[..., None, cols1[0] : cols1[1], :]
            for cols2 in _blocks(*_visible(n, m2, rows, causal, window), block):
                scores = qk1 @ k2f[..., None, cols2[0] : cols2[1], :].transpose(-2, -1)
                if masked:
                    pair = (
                        keep1[rows[0] : rows[1], cols1[0] : cols1[1], None]
                        & keep2[rows[0] : rows[1], None, cols2[0] : cols2[1]]
                    )
                    scores = scores.masked_fill(~pair, float("-inf"))
                tile_max = scores.amax(dim=(-2, -1))
                new_max = torch.maximum(run_max, tile_max)
                safe = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
                correction = torch.exp(run_max - safe)
                p = torch.exp(scores - safe[..., None, None])
                run_sum = run_sum * correction + p.sum(dim=(-2, -1))
                pv2 = p @ v2f[..., None, cols2[0] : cols2[1], :]  # (…, bq, b1, Dv)
                tile = (pv2 * v1f[..., None, cols1[0] : cols1[1], :]).sum(dim=-2)
                acc = acc * correction[..., None] + tile
                run_max = new_max
        denom = run_sum.clamp_min(torch.finfo(torch.float32).tiny)
        out[..., rows[0] : rows[1], :] = acc / denom[..., None]
    return out.to(q.dtype)
