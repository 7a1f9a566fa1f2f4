"""conv_basis fast path (ALGORITHMS.md §2): segment recovery by galloping search over score
columns (``O(k·log n)`` columns of ``O(n·d)`` each), then per segment one causal FFT
convolution, numerator and denominator together (``V`` with a column of ones appended), one
division. Same contract as ``codegen/reference/conv_basis.py``.

Each segment ``t`` (columns ``[c_t, e_t)``, basis ``E_t = exp(S_t − shift)`` of length
``r_t = n − c_t``) adds ``E_t ∗ V[c_t:e_t]`` to rows ``c_t..n−1``: only positive terms, so no
cancellation, and its FFT length is the first 5-smooth size ``≥ r_t + (e_t − c_t) − 1``.
Heads whose segmentation is the same (every bias-only head of an ALiBi site) share the calls.
Heads with more than ``k_max`` segments are computed exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnopt.codegen.reference.conv_basis import matches, score_column


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


def _convolve(basis: torch.Tensor, values: torch.Tensor, rows: int) -> torch.Tensor:
    """First ``rows`` outputs of the causal convolution of ``basis (G, r)`` with
    ``values (G, m, c)`` along the length."""
    size = fast_len(basis.shape[-1] + values.shape[-2] - 1)
    spectrum = torch.fft.rfft(basis, n=size, dim=-1).unsqueeze(-1)
    spectrum = spectrum * torch.fft.rfft(values, n=size, dim=-2)
    return torch.fft.irfft(spectrum, n=size, dim=-2)[:, :rows]


def conv_basis_heads(
    firsts: list[torch.Tensor], starts: list[int], values: torch.Tensor
) -> torch.Tensor:
    """``Â·[V 1]`` for ``G`` heads sharing ``starts``; ``firsts[t] (G, n − c_t)`` are the
    segments' first score columns, ``values (G, n, dv + 1)``."""
    g, n, width = values.shape
    shift = torch.stack([f.amax(-1) for f in firsts], -1).amax(-1, keepdim=True)
    out = values.new_zeros(g, n, width)
    bounds = [*starts, n]
    for t, first in enumerate(firsts):
        c, e = bounds[t], bounds[t + 1]
        out[:, c:] += _convolve(torch.exp(first - shift), values[:, c:e], n - c)
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
    bound = content_bound(q, k.repeat_interleave(group, 1) if group > 1 else k, scale)
    ones = v.new_ones(*v.shape[:-1], 1, dtype=torch.float32)
    values = torch.cat([v.float(), ones], -1)
    out = torch.empty(b, h, n, v.shape[-1])
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
        both = conv_basis_heads(firsts, list(starts), vals)
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
