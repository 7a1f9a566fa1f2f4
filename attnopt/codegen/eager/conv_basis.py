"""conv_basis fast path (ALGORITHMS.md §2): segment recovery by galloping search over score
columns (``O(k·log n)`` columns of ``O(n·d)`` each), then per segment one causal FFT
convolution, numerator and denominator together (``V`` with a column of ones appended), one
division. Same contract as ``codegen/reference/conv_basis.py``.

Each segment ``t`` (columns ``[c_t, e_t)``, basis ``E_t = exp(S_t − max S_t)`` of length
``r_t = n − c_t``) adds ``E_t ∗ V[c_t:e_t]`` to rows ``c_t..n−1``: only positive terms, so no
cancellation; rows rescale the segments' parts by their maxima; its FFT length is the first
5-smooth size ``≥ r_t + (e_t − c_t) − 1``.
Heads whose segmentation is the same (every bias-only head of an ALiBi site) share the calls.
Heads with more than ``k_max`` segments are computed exactly.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from attnopt.codegen.reference.conv_basis import matches, score_column

FP32_RANGE = 6.0  # e^6 × fp32 FFT rounding (~1e-7·log n) stays near 1e-4 of a row's sum


@functools.lru_cache(maxsize=256)
def fast_len(n: int) -> int:
    """The smallest ``2^a·3^b·5^c ≥ n`` (pocketfft and cuFFT are fastest on such sizes)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            size = p35
            while size < n:
                size *= 2
            best = min(best, size)
            p35 *= 3
        p5 *= 5
    return best


def _segment_end(q, k, mask, scale: float, c: int, first, tau: float) -> int:
    """The first column after ``c`` that does not extend the segment (``n`` if none): doubling
    steps from ``c``, then bisection between the last match and the first miss."""
    n = q.shape[0]
    good, step = c, 1
    while True:
        j = c + step
        if j >= n:
            bad = n
            break
        if not matches(score_column(q, k, mask, scale, j), first, tau):
            bad = j
            break
        good, step = j, step * 2
    while bad - good > 1:
        mid = (good + bad) // 2
        if matches(score_column(q, k, mask, scale, mid), first, tau):
            good = mid
        else:
            bad = mid
    return bad


def recover_segments(q, k, mask, scale: float, tau: float, k_max: int) -> list[int]:
    """Segment starts of one head (``q``, ``k`` ``(n, d)``, ``mask (n, n)`` or None); stops at
    ``k_max + 1`` starts, which means "not representable"."""
    n = q.shape[0]
    starts = [0]
    while True:
        c = starts[-1]
        end = _segment_end(q, k, mask, scale, c, score_column(q, k, mask, scale, c), tau)
        if end >= n:
            return starts
        starts.append(end)
        if len(starts) > k_max:
            return starts


def content_bound(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale·max‖q_i‖·max‖k_j‖`` per head of ``(B, H, n, d)``: no ``|q·k|`` term exceeds it,
    so a head whose bound is ≤ tau has bias-only scores (k = 1, basis from the bias)."""
    return scale * q.float().norm(dim=-1).amax(-1) * k.float().norm(dim=-1).amax(-1)


def _convolve(basis: torch.Tensor, values: torch.Tensor, rows: int, wide: bool) -> torch.Tensor:
    """First ``rows`` outputs of the causal convolution of ``basis (G, r)`` with
    ``values (G, m, c)`` along the length; in fp64 when ``wide``."""
    size = fast_len(basis.shape[-1] + values.shape[-2] - 1)
    if wide:
        basis, values = basis.double(), values.double()
    spectrum = torch.fft.rfft(basis, n=size, dim=-1).unsqueeze(-1)
    spectrum = spectrum * torch.fft.rfft(values, n=size, dim=-2)
    return torch.fft.irfft(spectrum, n=size, dim=-2)[:, :rows].float()


def conv_basis_heads(
    firsts: list[torch.Tensor], starts: list[int], values: torch.Tensor, diagonal: torch.Tensor
) -> torch.Tensor:
    """``Â·[V 1]`` for ``G`` heads sharing ``starts``, up to a positive factor per row;
    ``firsts[t] (G, n − c_t)`` are the segments' first score columns, ``values (G, n, dv+1)``.

    Each segment is convolved against its own maximum (so the FFT's rounding is relative to
    that segment's weights, not to the largest score of the head), and the rows combine the
    segments as online softmax combines blocks: a running maximum per row. A row's weight sum
    is at least ``exp(diagonal[i] − peak_t)`` on segment ``t``'s scale; where that falls below
    ``e^−FP32_RANGE`` for some row the fp32 FFT's rounding would swamp it, and that segment's
    convolution runs in fp64 (``diagonal (G, n)``: the scores ``H[i, i]``)."""
    g, n, width = values.shape
    floor = diagonal.flip(-1).cummin(-1).values.flip(-1)  # min over rows ≥ i
    fused = values.is_cuda
    if fused:
        from attnopt.codegen.triton.conv_basis import merge

        out, top = values.new_empty(g, n, width), values.new_empty(g, n)
    bounds = [*starts, n]
    for t, first in enumerate(firsts):
        c, e = bounds[t], bounds[t + 1]
        peak = first.amax(-1, keepdim=True)[..., None]  # (G, 1, 1)
        wide = bool((peak[:, 0, 0] - floor[:, c]).amax() > FP32_RANGE)
        part = _convolve(torch.exp(first - peak[..., 0]), values[:, c:e], n - c, wide)
        if fused:
            merge(out, top, part, peak.reshape(g), c, first=t == 0)
        elif t == 0:  # the first segment starts at row 0: nothing to rescale yet
            out, top = part, peak.expand(g, n, 1).clone()
        else:
            new = torch.maximum(top[:, c:], peak)
            out[:, c:] = out[:, c:] * torch.exp(top[:, c:] - new) + part * torch.exp(peak - new)
            top[:, c:] = new
    return out


def conv_basis_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float,
    tau: float,
    k_max: int,
    bias_heads: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal conv-basis attention, ``(out, ks)`` as in the reference. ``bias_heads (H,)``
    marks heads whose mask is a Toeplitz position bias (checked by the caller): where their
    content bound is ≤ tau the basis is the bias column itself, with no search."""
    b, h, n, _ = q.shape
    group = h // k.shape[1]
    full = None if mask is None else mask.float().expand(b, h, n, n)
    k_full = k.repeat_interleave(group, 1) if group > 1 else k
    bound = content_bound(q, k_full, scale)
    diagonals = (q.float() * k_full.float()).sum(-1) * scale
    if full is not None:
        diagonals = diagonals + full.diagonal(dim1=-2, dim2=-1)
    ones = v.new_ones(*v.shape[:-1], 1, dtype=torch.float32)
    values = torch.cat([v.float(), ones], -1)
    out = torch.empty(b, h, n, v.shape[-1], device=q.device)
    ks = torch.zeros(b, h, dtype=torch.long)
    groups: dict[tuple[int, ...], list[tuple[int, int, list]]] = {}
    exact = []
    for bi in range(b):
        for hi in range(h):
            qh, kh = q[bi, hi], k[bi, hi // group]
            mh = None if full is None else full[bi, hi]
            if bias_heads is not None and bool(bias_heads[hi]) and bound[bi, hi] <= tau:
                starts, firsts = [0], [mh[:, 0]]
            else:
                starts = recover_segments(qh, kh, mh, scale, tau, k_max)
                firsts = [score_column(qh, kh, mh, scale, c) for c in starts]
            ks[bi, hi] = len(starts)
            if len(starts) > k_max:
                exact.append((bi, hi))
            else:
                groups.setdefault(tuple(starts), []).append((bi, hi, firsts))
    for starts, members in groups.items():
        firsts = [torch.stack([m[2][t] for m in members]) for t in range(len(starts))]
        vals = torch.stack([values[bi, hi // group] for bi, hi, _ in members])
        diagonal = torch.stack([diagonals[bi, hi] for bi, hi, _ in members])
        both = conv_basis_heads(firsts, list(starts), vals, diagonal)
        if both.is_cuda:
            from attnopt.codegen.triton.conv_basis import normalise

            result = normalise(both)
        else:
            result = both[..., :-1] / both[..., -1:]
        for index, (bi, hi, _) in enumerate(members):
            out[bi, hi] = result[index]
    for bi, hi in exact:
        mh = None if full is None else full[bi, hi][None, None]
        kv = hi // group
        out[bi, hi] = F.scaled_dot_product_attention(
            q[bi, hi][None, None].float(),
            k[bi, kv][None, None].float(),
            v[bi, kv][None, None].float(),
            attn_mask=None if mh is None else mh + _causal(n, q.device),
            is_causal=mh is None,
            scale=scale,
        )[0, 0]
    return out, ks


def _causal(n: int, device) -> torch.Tensor:
    return torch.full((n, n), float("-inf"), device=device).triu(1)
