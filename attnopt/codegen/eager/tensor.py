"""Exact tensor attention fused in large torch GEMMs: the CPU path (ALGORITHMS.md §4).

Same contract as ``codegen/reference/tensor.py``. Per query block ``Qb`` (``block_q`` rows) and
key1 block ``K1b`` (``b1`` rows), the scores of all pairs against every visible key2 are one
GEMM, ``(Qb ⊙ K1b)`` flattened to ``(bq·b1, D)`` times ``K2ᵀ``, and the pair-weighted values one
more, ``P @ [V2, 1]`` (the ones column carries the denominator), then ``⊙ [V1, 1]`` summed over
the key1 block. The online softmax of exact attention runs over key1 blocks, so only one
``bq × b1 × M2`` tile of scores lives at a time (``tile_elems`` bounds it: a few MiB that stay in
cache), never the ``N × M1 × M2`` tensor. ``b1`` is derived from the tile bound, so each tile is
a handful of large ops: few enough that a loaded machine's thread barriers do not dominate.
Key1 / key2 ranges that the causal / window flags exclude for a whole query block are skipped
(a window ``w`` costs ``O(N·w²·D)``); only the tile edges that some rows of the block see and
others do not are masked.
"""

from __future__ import annotations

import math

import torch

from attnopt.codegen.reference.exact import key_range, structural_keep

BLOCK_Q = 16
TILE_ELEMS = 1 << 19  # fp32 scores per tile, over all batch·heads: 2 MiB, an L2's worth


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


def _edges(keep: torch.Tensor) -> tuple[int, int]:
    """``[a, b)``: the columns of a ``(rows, cols)`` keep block that every row keeps. Structural
    masks keep an interval per row, so only ``[0, a)`` and ``[b, cols)`` need masking; when the
    columns kept by all rows are not one interval the whole block is masked (``a = b = 0``)."""
    full = keep.all(dim=0).nonzero().flatten()
    if full.numel() == 0:
        return 0, 0
    a, b = int(full[0]), int(full[-1]) + 1
    return (a, b) if b - a == full.numel() else (0, 0)


def _mask_edges(scores: torch.Tensor, keep: torch.Tensor, span: tuple[int, int]) -> None:
    """In place: ``-inf`` where ``keep`` (``(bq, cols)``) drops a key2, outside ``span``."""
    for lo, hi in ((0, span[0]), (span[1], keep.shape[1])):
        if hi > lo:
            part = scores[..., lo:hi]
            part.masked_fill_(~keep[:, None, lo:hi], float("-inf"))


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
    block_q: int = BLOCK_Q,
    block_k: int | None = None,
    tile_elems: int = TILE_ELEMS,
) -> torch.Tensor:
    """Fused exact tensor attention: GEMM tiles, online softmax over key1 blocks (fp32 inside).
    ``block_k`` fixes the key1 block (tests); by default it fills ``tile_elems``."""
    lead = q.shape[:-2]
    n, m1, m2, dv = q.shape[-2], k1.shape[-2], k2.shape[-2], v1.shape[-1]
    bh = math.prod(lead)
    qf = q.float().reshape(bh, n, -1) * scale
    k1f = k1.float().reshape(bh, m1, -1)
    k2t = k2.float().reshape(bh, m2, -1).transpose(-2, -1)
    # the ones columns make the last output column the softmax denominator
    v1e = torch.cat([v1.float().reshape(bh, m1, dv), qf.new_ones(bh, m1, 1)], dim=-1)
    v2e = torch.cat([v2.float().reshape(bh, m2, dv), qf.new_ones(bh, m2, 1)], dim=-1)
    masked = causal or window > 0
    keep1 = structural_keep(n, m1, causal, window, q.device) if masked else None
    keep2 = structural_keep(n, m2, causal, window, q.device) if masked else None
    out = qf.new_zeros(bh, n, dv)
    for rows in _blocks(0, n, block_q):
        bq = rows[1] - rows[0]
        lo2, hi2 = _visible(n, m2, rows, causal, window)
        lo1, hi1 = _visible(n, m1, rows, causal, window)
        if hi2 <= lo2 or hi1 <= lo1:
            continue  # no pair visible: these rows stay 0
        span2 = hi2 - lo2
        b1 = block_k or max(1, tile_elems // (bh * bq * span2))
        k2b, v2b = k2t[..., lo2:hi2], v2e[:, lo2:hi2]
        sub2 = keep2[rows[0] : rows[1], lo2:hi2] if masked else None
        edges2 = _edges(sub2) if masked else (0, span2)
        qb = qf[:, rows[0] : rows[1]]
        run_max = qf.new_full((bh, bq), float("-inf"))
        acc = qf.new_zeros(bh, bq, dv + 1)
        for c0, c1 in _blocks(lo1, hi1, b1):
            pairs = (qb[:, :, None, :] * k1f[:, None, c0:c1, :]).reshape(bh, -1, qf.shape[-1])
            scores = (pairs @ k2b).view(bh, bq, c1 - c0, span2)
            if masked:
                _mask_edges(scores, sub2, edges2)
                sub1 = keep1[rows[0] : rows[1], c0:c1]
                if not bool(sub1.all()):
                    scores.masked_fill_(~sub1[:, :, None], float("-inf"))
            # the shift only keeps exp in range; the result does not depend on it
            tile_max = scores.detach().view(bh, bq, -1).amax(dim=-1)
            new_max = torch.maximum(run_max, tile_max)
            safe = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            probs = scores.sub_(safe[..., None, None]).exp_()
            weighted = (probs.view(bh, -1, span2) @ v2b).view(bh, bq, c1 - c0, dv + 1)
            tile = torch.einsum("bqjd,bjd->bqd", weighted, v1e[:, c0:c1])
            acc = acc * torch.exp(run_max - safe)[..., None] + tile
            run_max = new_max
        denom = acc[..., -1:].clamp_min(torch.finfo(torch.float32).tiny)
        out[:, rows[0] : rows[1]] = acc[..., :-1] / denom
    return out.reshape(*lead, n, dv).to(q.dtype)
