"""Exact tensor attention fused in large torch GEMMs: the CPU path (ALGORITHMS.md §4).

Same contract as ``codegen/reference/tensor.py``. Per query block ``Qb`` (``block_q`` rows) and
key1 block ``K1b`` (``b1`` rows), the scores of all pairs against every visible key2 are one
GEMM, ``(Qb ⊙ K1b)`` flattened to ``(bq·b1, D)`` times ``K2ᵀ``, and the pair-weighted values one
more, ``P @ [V2, 1]`` (the ones column carries the denominator), then ``⊙ [V1, 1]`` summed over
the key1 block. The online softmax of exact attention runs over key1 blocks, so only one
``bq × b1 × M2`` tile of scores lives at a time (``tile_elems`` bounds it: a few MiB that stay in
cache), never the ``N × M1 × M2`` tensor; ``b1`` is derived from that bound. Per tile: one
product, the two GEMMs, one ``exp`` (the running max is subtracted inside the first GEMM) and a
small reduction. With several intra-op threads the query blocks are split among that many
Python threads running one intra-op thread each (``_in_workers``), not each op across threads:
a loop of mid-sized ops pays a fork and join per op, which on a shared CPU under libgomp's
spinning wait costs a time slice each (10-50x slower than one thread, measured).
Key1 / key2 ranges that the causal / window flags exclude for a whole query block are skipped
(a window ``w`` costs ``O(N·w²·D)``); only the tile edges that some rows of the block see and
others do not are masked.
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import torch

from attnopt.codegen.reference.exact import key_range, structural_keep

BLOCK_Q = 16
TILE_ELEMS = 1 << 19  # fp32 scores per tile, over its batch·heads: 2 MiB, an L2's worth


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
    ``block_k`` fixes the key1 block (tests); by default it fills ``tile_elems``. A tile stays
    within ``tile_elems`` unless ``block_q`` rows of one head against all keys exceed it.
    With gradients, the backward recomputes the tiles from the saved log-sum-exp (as
    FlashAttention does), so training holds no ``n × m × m`` tensor either."""
    sizes = (q.shape[-2], k1.shape[-2], k2.shape[-2])
    tiling = _Tiling(*sizes, causal, window, (block_q, block_k, tile_elems))
    args = (q, k1, k2, v1, v2)
    if torch.is_grad_enabled() and any(t.requires_grad for t in args):
        return _Fused.apply(scale, tiling, *args)
    return _forward(_prepare(args, scale), tiling)[0].reshape(*q.shape[:-1], -1).to(q.dtype)


class _Tiling:
    """Sizes and flags shared by the forward and the backward sweep."""

    def __init__(self, n, m1, m2, causal, window, blocks) -> None:
        self.n, self.m1, self.m2, self.causal, self.window = n, m1, m2, causal, window
        self.block_q, self.block_k, self.tile_elems = blocks

    def masks(self, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.causal and self.window <= 0:
            return None
        return tuple(
            structural_keep(self.n, m, self.causal, self.window, device) for m in (self.m1, self.m2)
        )

    def sweep(self, bh: int):
        """``(group, rows, span2, key1 blocks)``: batch·heads in groups small enough that a
        one-key1 tile still fits the bound, query blocks, and the key ranges each one sees."""
        n, m2, bq = self.n, self.m2, self.block_q
        group = max(1, self.tile_elems // (min(bq, max(n, 1)) * max(m2, 1)))
        for g in _blocks(0, bh, group):
            for rows in _blocks(0, n, bq):
                lo2, hi2 = _visible(n, m2, rows, self.causal, self.window)
                lo1, hi1 = _visible(n, self.m1, rows, self.causal, self.window)
                if hi2 <= lo2 or hi1 <= lo1:
                    continue  # no pair visible: these rows stay 0
                tile_rows = (g[1] - g[0]) * (rows[1] - rows[0]) * (hi2 - lo2)
                b1 = self.block_k or max(1, self.tile_elems // tile_rows)
                yield g, rows, (lo2, hi2), _blocks(lo1, hi1, b1)


def _prepare(args, scale: float):
    """fp32, batch·heads flattened; ``q`` scaled; the ones columns that put the shift into the
    scores GEMM (k1, k2) and the softmax denominator into the last output column (v1, v2)."""
    q, k1, k2, v1, v2 = args
    bh = math.prod(q.shape[:-2])
    qf = q.float().reshape(bh, q.shape[-2], -1) * scale

    def ones(t: torch.Tensor) -> torch.Tensor:
        flat = t.float().reshape(bh, t.shape[-2], -1)
        return torch.cat([flat, flat.new_ones(bh, t.shape[-2], 1)], dim=-1)

    return qf, (ones(k1), ones(k2).transpose(-2, -1), ones(v1), ones(v2))


def _forward(prepared, tiling: _Tiling) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: ``(BH, N, Dv)`` and the log-sum-exp per query (``+inf`` with no pair)."""
    qf, keys = prepared
    bh, n, dv = qf.shape[0], qf.shape[1], keys[2].shape[-1] - 1
    masks = tiling.masks(qf.device)
    out = qf.new_zeros(bh, n, dv)
    lse = qf.new_full((bh, n), float("inf"))

    def work(items) -> None:  # writes disjoint rows of out and lse
        for (g0, g1), rows, span2, key1_blocks in items:
            qb = qf[g0:g1, rows[0] : rows[1]]
            block = _QueryBlock(qb, tuple(t[g0:g1] for t in keys), rows, span2, masks)
            for cols1 in key1_blocks:
                block.add(cols1)
            out[g0:g1, rows[0] : rows[1]], lse[g0:g1, rows[0] : rows[1]] = block.result()

    _in_workers(list(tiling.sweep(bh)), work, qf.device)
    return out, lse


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    """One pool per worker count for the process: no thread start-up on every call."""
    return ThreadPoolExecutor(workers, thread_name_prefix="attnopt-tensor")


def _in_workers(items: list, work, device: torch.device) -> list:
    """``work`` over the query blocks, split round-robin among ``torch.get_num_threads()``
    Python threads with one intra-op thread each (CPU): one fork and join per call instead of
    one per torch op, whose waits dominate when the cores are shared (libgomp's spinning
    wait). The tiles' torch ops release the GIL."""
    threads = torch.get_num_threads()
    workers = min(threads, len(items)) if device.type == "cpu" else 1
    if workers <= 1:
        with torch.no_grad():
            return [work(items)]

    inference = torch.is_inference_mode_enabled()  # thread-local, as grad mode is

    def run(part: list):
        torch.set_num_threads(1)  # this thread's OpenMP / MKL setting
        with torch.inference_mode(inference), torch.no_grad():
            return work(part)

    try:
        return list(_pool(workers).map(run, [items[w::workers] for w in range(workers)]))
    finally:
        torch.set_num_threads(threads)  # the default that later threads start with


class _Fused(torch.autograd.Function):
    """The fused form with a backward that recomputes each tile's probabilities from the
    log-sum-exp: ``dS = P ∘ (dP − rowsum(dO ∘ O))`` with ``dP = (dO ∘ V1) @ V2ᵀ``, and every
    gradient one GEMM or one weighted sum per tile."""

    @staticmethod
    def forward(ctx, scale, tiling, q, k1, k2, v1, v2):
        out, lse = _forward(_prepare((q, k1, k2, v1, v2), scale), tiling)
        ctx.save_for_backward(q, k1, k2, v1, v2, out, lse)
        ctx.scale, ctx.tiling = scale, tiling
        return out.reshape(*q.shape[:-1], -1).to(q.dtype)

    @staticmethod
    def backward(ctx, d_out):
        *inputs, out, lse = ctx.saved_tensors
        qf, keys = _prepare(inputs, ctx.scale)
        grads = _backward(qf, keys, d_out.float().reshape(out.shape), out, lse, ctx.tiling)
        grads[0] = grads[0] * ctx.scale
        return (
            None,
            None,
            *(g.reshape(t.shape).to(t.dtype) for g, t in zip(grads, inputs, strict=True)),
        )


def _backward(qf, keys, d_out, out, lse, tiling: _Tiling) -> list[torch.Tensor]:
    """``[dq/scale, dk1, dk2, dv1, dv2]`` (fp32, flattened), one tile at a time."""
    k1e, k2e, v1e, v2e = keys
    k1f, k2f, v1f, v2f = k1e[..., :-1], k2e[:, :-1].transpose(-2, -1), v1e[..., :-1], v2e[..., :-1]
    row_dot = (d_out * out).sum(dim=-1)  # Σ_{j,l} P·dP per query
    safe_lse = lse.masked_fill(torch.isinf(lse), -_DROP)  # rows with no pair: P ≈ 0
    masks = tiling.masks(qf.device)

    def work(items) -> list[torch.Tensor]:  # this worker's share of every gradient
        grads = [torch.zeros_like(t) for t in (qf, k1f, k2f, v1f, v2f)]
        dq, dk1, dk2, dv1, dv2 = grads
        for (g0, g1), rows, (lo2, hi2), key1_blocks in items:
            r0, r1, g = rows[0], rows[1], slice(g0, g1)
            qb, dob = qf[g, r0:r1], d_out[g, r0:r1]
            block = _QueryBlock(qb, tuple(t[g] for t in keys), rows, (lo2, hi2), masks)
            k2b, v2b = k2f[g, lo2:hi2], v2f[g, lo2:hi2]
            for c0, c1 in key1_blocks:
                probs = block.probs((c0, c1), safe_lse[g, r0:r1])[0]  # (G, bq·b1, span2)
                k1b, v1b = k1f[g, c0:c1], v1f[g, c0:c1]
                shape = (g1 - g0, r1 - r0, c1 - c0)
                pairs = (qb[:, :, None, :] * k1b[:, None]).reshape(g1 - g0, -1, qb.shape[-1])
                do_v1 = (dob[:, :, None, :] * v1b[:, None]).reshape(g1 - g0, -1, v1b.shape[-1])
                d_scores = (do_v1 @ v2b.transpose(-2, -1)).view(*shape, -1)
                d_scores = d_scores.sub_(row_dot[g, r0:r1, None, None]).view_as(probs)
                d_scores = d_scores.mul_(probs)
                back = (d_scores @ k2b).view(*shape, -1)  # Σ_l dS k2_l per (i, j)
                dq[g, r0:r1] += (back * k1b[:, None]).sum(dim=2)
                dk1[g, c0:c1] += (back * qb[:, :, None]).sum(dim=1)
                dk2[g, lo2:hi2] += d_scores.transpose(-2, -1) @ pairs
                weighted = (probs @ v2b).view(*shape, -1)  # Σ_l P v2_l per (i, j)
                dv1[g, c0:c1] += (weighted * dob[:, :, None]).sum(dim=1)
                dv2[g, lo2:hi2] += probs.transpose(-2, -1) @ do_v1
        return grads

    shares = _in_workers(list(tiling.sweep(qf.shape[0])), work, qf.device)
    return [sum(parts[1:], parts[0]) for parts in zip(*shares, strict=True)]


class _QueryBlock:
    """The online softmax of one query block over key1 blocks. The shift that keeps ``exp`` in
    range is the running max (exact for the first tile, taken by ``amax``); later tiles subtract
    it inside the scores GEMM and skip the max pass, and a tile whose sums leave range (scores
    far above the shift) is redone with its exact max. Runs without autograd (``_Fused`` has its
    own backward)."""

    def __init__(self, qb, keys, rows, span2, masks) -> None:
        self.qb, (self.k1, k2e, self.v1, v2e) = qb, keys
        self.k2, self.v2 = k2e[..., span2[0] : span2[1]], v2e[:, span2[0] : span2[1]]
        self.keep1 = self.keep2 = None
        if masks is not None:
            self.keep1 = masks[0][rows[0] : rows[1]]
            self.keep2 = masks[1][rows[0] : rows[1], span2[0] : span2[1]]
            self.edges2 = _edges(self.keep2)
        bh, bq = qb.shape[0], qb.shape[1]
        self.shift = qb.new_full((bh, bq), float("-inf"))
        self.acc = qb.new_zeros(bh, bq, self.v1.shape[-1])

    def add(self, cols1: tuple[int, int]) -> None:
        old = self.shift
        exact = not bool(torch.isfinite(old).all())
        tile, shift = self._tile(cols1, None if exact else old)
        if not exact and not _in_range(tile):
            tile, shift = self._tile(cols1, None)
        # rows with nothing kept so far (shift -inf) drop what they summed: only floored entries
        self.acc = self.acc * torch.exp(old - _finite(shift))[..., None] + tile
        self.shift = shift

    def _tile(self, cols1, shift):
        """``Σ_{j,l} exp(s_ijl − shift_i)(v1_j ∘ v2_l)`` and its sum over one key1 block, with
        the shift (see ``probs``)."""
        probs, shift = self.probs(cols1, shift)
        c0, c1 = cols1
        weighted = (probs @ self.v2).view(*self.qb.shape[:2], c1 - c0, -1)
        return torch.einsum("bqjd,bjd->bqd", weighted, self.v1[:, c0:c1]), shift

    def probs(self, cols1, shift):
        """``exp(s_ijl − shift_i)`` over one key1 block as ``(BH, bq·b1, span2)``; with
        ``shift=None`` the shift is the larger of the running one and the tile's max (``-inf``
        for rows with no pair kept yet)."""
        c0, c1 = cols1
        bh, bq, d = self.qb.shape
        # q ∘ k1 with a last column -shift (q's last column times k1's column of ones)
        column = self.qb.new_zeros(bh, bq, 1) if shift is None else -shift[..., None]
        pairs = torch.cat([self.qb, column], -1)[:, :, None, :] * self.k1[:, None, c0:c1, :]
        if self.keep1 is not None:
            dropped = ~self.keep1[:, c0:c1]
            if bool(dropped.any()):
                pairs[..., -1].masked_fill_(dropped, _DROP)
        scores = (pairs.view(bh, -1, d + 1) @ self.k2).view(bh, bq, c1 - c0, -1)
        if self.keep2 is not None:
            _mask_edges(scores, self.keep2, self.edges2)
        if shift is None:
            tile_max = scores.view(bh, bq, -1).amax(dim=-1)
            tile_max = tile_max.masked_fill(tile_max <= _DROP / 2, float("-inf"))
            shift = torch.maximum(self.shift, tile_max)
            scores = scores.sub_(_finite(shift)[..., None, None])
        return scores.clamp_min_(_FLOOR).exp_().view(bh, bq * (c1 - c0), -1), shift

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``acc / denominator`` (0 for rows with no pair kept) and the log-sum-exp."""
        denom = self.acc[..., -1:].clamp_min(torch.finfo(torch.float32).tiny)
        none_kept = torch.isinf(self.shift)
        out = (self.acc[..., :-1] / denom).masked_fill(none_kept[..., None], 0.0)
        lse = (self.shift + denom[..., 0].log()).masked_fill(none_kept, float("inf"))
        return out, lse


def _finite(shift: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(shift), torch.zeros_like(shift), shift)


_DROP = -1e30  # a dropped key1's shift column: exp underflows to 0 with no inf in the GEMM
# exp's fast vector path covers inputs above about -87.3 only; below it (the masked -inf, the
# dropped key1, scores far under the row max) it is 10-300x slower, and products of values with
# weights near 1e-38 are denormal, slow in the GEMM. Flooring at -60 adds at most e^-60 ≈ 1e-26
# per pair to a denominator of at least 1 (its max pair): nothing at fp32 precision.
_FLOOR = -60.0
_LIMIT = 2.0**64  # a tile sum above this means scores far above the shift: redo it exactly


def _in_range(tile: torch.Tensor) -> bool:
    return bool(torch.isfinite(tile).all()) and bool((tile[..., -1] <= _LIMIT).all())
