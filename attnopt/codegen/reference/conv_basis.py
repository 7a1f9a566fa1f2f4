"""conv_basis reference (ALGORITHMS.md §2): loop-explicit fp32, the oracle of the fast path.

Causal scores ``H[i, j] = scale·q_i·k_j + mask[i, j]`` (``i ≥ j``) are read column by column.
A *segment* is a run of columns ``[c, e)`` whose part from the diagonal down is, within ``tau``,
a prefix of the segment's first column ``S = H[c:, c]``: ``|H[j + l, j] − S[l]| ≤ tau``. The
reference checks every column (``O(n²·d)``); the fast path (``codegen/eager/conv_basis.py``)
finds the same boundaries by galloping search. With the segment starts ``c_1 = 0 < … < c_k``,
the approximate weights are ``Â[j + l, j] = exp(S_t[l])`` for column ``j`` in segment ``t``, and
``Ŷ = Â·V / Â·1``. If every causal score is within ``ε`` of that structure,
``‖Y − Ŷ‖∞ ≤ (e^{2ε} − 1)·‖V‖∞``.
"""

from __future__ import annotations

import torch


def score_column(q, k, mask, scale: float, j: int) -> torch.Tensor:
    """``H[j:, j]`` of one head: ``q (n, d)``, ``k (n, d)``, ``mask (n, n)`` additive or None."""
    col = (q[j:].float() @ k[j].float()) * scale
    if mask is not None:
        col = col + mask[j:, j].float()
    return col


def matches(col: torch.Tensor, first: torch.Tensor, tau: float) -> bool:
    """Column (from its diagonal down) is a prefix of the segment's first column within tau."""
    return bool((col - first[: col.shape[0]]).abs().max() <= tau)


def recover_segments_reference(q, k, mask, scale: float, tau: float, k_max: int) -> list[int]:
    """Segment starts of one head, every column checked; more than ``k_max`` segments stop the
    scan early and return ``k_max + 1`` starts (the caller reads that as "not representable")."""
    n = q.shape[0]
    starts = [0]
    first = score_column(q, k, mask, scale, 0)
    for j in range(1, n):
        col = score_column(q, k, mask, scale, j)
        if not matches(col, first, tau):
            starts.append(j)
            if len(starts) > k_max:
                return starts
            first = col
    return starts


def basis_weights(q, k, mask, scale: float, starts: list[int]) -> torch.Tensor:
    """The ``n × n`` matrix ``Â`` (before normalisation, shifted by one global constant)."""
    n = q.shape[0]
    firsts = [score_column(q, k, mask, scale, c) for c in starts]
    shift = max(float(f.max()) for f in firsts)
    weights = torch.zeros(n, n)
    bounds = [*starts, n]
    for t, first in enumerate(firsts):
        basis = torch.exp(first - shift)
        for j in range(bounds[t], bounds[t + 1]):
            for i in range(j, n):
                weights[i, j] = basis[i - j]
    return weights


def conv_basis_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float,
    tau: float,
    k_max: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of ``q (B, H, n, d)``, ``k``/``v (B, Hkv, n, ·)``, additive ``mask``
    broadcastable to ``(B, H, n, n)``. Returns ``(out, ks)``: ``ks (B, H)`` the segment counts;
    heads with more than ``k_max`` segments (``ks > k_max``) are computed exactly."""
    b, h, n, _ = q.shape
    group = h // k.shape[1]
    full = None if mask is None else mask.float().expand(b, h, n, n)
    out = torch.zeros(b, h, n, v.shape[-1])
    ks = torch.zeros(b, h, dtype=torch.long)
    for bi in range(b):
        for hi in range(h):
            qh, kh, vh = q[bi, hi], k[bi, hi // group], v[bi, hi // group].float()
            mh = None if full is None else full[bi, hi]
            starts = recover_segments_reference(qh, kh, mh, scale, tau, k_max)
            ks[bi, hi] = len(starts)
            if len(starts) > k_max:
                starts = list(range(n))  # one segment per column: the exact matrix
            weights = basis_weights(qh, kh, mh, scale, starts)
            out[bi, hi] = (weights @ vh) / weights.sum(dim=-1, keepdim=True)
    return out, ks
