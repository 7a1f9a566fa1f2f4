"""Chunked linear, gated linear and hybrid attention in batched torch ops (ALGORITHMS.md §3).

Same contracts as ``codegen/reference/linear.py``; the cost is ``O(n·C·d + n·d·dv)`` per head
instead of the reference's token loop (or its quadratic oracle for ``hybrid``). Sequences are cut
into chunks of ``C`` tokens: inside a chunk the interactions are one masked matmul, between chunks
a ``Dk × Dv`` state carries the past. Gates (``log α ≤ 0``) enter as cumulative sums ``b`` inside
the chunk; every exponent is taken against a reference point that keeps it ≤ 0 (between
sub-chunks of 16, and for the state) or within half a sub-chunk of decay (on the diagonal
sub-chunks), so ``e^{−b}`` cannot overflow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUB = 16  # sub-chunk length on the diagonal, where exponents are not sign-bounded


def _heads(t: torch.Tensor | None, group: int) -> torch.Tensor | None:
    if t is None:
        return None
    return t.float().repeat_interleave(group, dim=1) if group > 1 else t.float()


def _chunks(t: torch.Tensor, chunk: int) -> torch.Tensor:
    """``(B, H, N, D)`` zero-padded to whole chunks, as ``(B, H, N/C, C, D)``."""
    pad = (-t.shape[-2]) % chunk
    if pad:
        t = F.pad(t, (0, 0, 0, pad))
    return t.reshape(*t.shape[:2], -1, chunk, t.shape[-1])


def _intra_gated(q: torch.Tensor, k: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``A_ij = Σ_c q_ic k_jc e^{b_ic − b_jc}`` for ``j ≤ i`` inside each chunk, else 0."""
    size = q.shape[-2]
    sub = min(SUB, size)
    a = q.new_zeros(*q.shape[:-1], size)
    for start in range(0, size, sub):
        block = slice(start, start + sub)
        mid = b[..., start + sub // 2, None, :]
        qa = q[..., block, :] * (b[..., block, :] - mid).exp()
        ka = k[..., block, :] * (mid - b[..., block, :]).exp()
        a[..., block, block] = (qa @ ka.transpose(-2, -1)).tril()
        if start + sub < size:
            last = b[..., start + sub - 1, None, :]
            later = slice(start + sub, size)
            qa = q[..., later, :] * (b[..., later, :] - last).exp()
            ka = k[..., block, :] * (last - b[..., block, :]).exp()
            a[..., later, block] = qa @ ka.transpose(-2, -1)
    return a


def chunk_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor | None = None,
    *,
    chunk: int = 64,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y_t = q_tᵀ S_t`` for ``S_t = Diag(α_t) S_{t−1} + k_t v_tᵀ`` (``α = 1`` without gates).

    Inputs already at the query heads (``(B, H, N, D)``, fp32). Returns ``(y, final state)``.
    """
    n = q.shape[-2]
    qc, kc, vc = _chunks(q, chunk), _chunks(k, chunk), _chunks(v, chunk)
    if log_alpha is None:
        a = (qc @ kc.transpose(-2, -1)).tril()
        q_in, k_out, decay = qc, kc, None
    else:
        b = _chunks(log_alpha, chunk).cumsum(dim=-2)
        last = b[..., -1:, :]
        a = _intra_gated(qc, kc, b)
        q_in, k_out, decay = qc * b.exp(), kc * (last - b).exp(), last.exp().transpose(-2, -1)
    absorbed = k_out.transpose(-2, -1) @ vc  # each chunk's keys, decayed to its end
    batch, heads, count = qc.shape[:3]
    if state is None:
        state = q.new_zeros(batch, heads, q.shape[-1], v.shape[-1])
    incoming = []
    for c in range(count):
        incoming.append(state)
        state = (state if decay is None else decay[:, :, c] * state) + absorbed[:, :, c]
    out = q_in @ torch.stack(incoming, dim=2) + a @ vc
    return out.reshape(batch, heads, -1, v.shape[-1])[:, :, :n], state


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    eps: float = 1e-6,
    chunk: int = 64,
) -> torch.Tensor:
    """``reference.linear_attention``: the normaliser rides along as a column of ones in v."""
    group = q.shape[1] // k.shape[1]
    qf, kf, vf = q.float(), _heads(k, group), _heads(v, group)
    if not causal:
        state = kf.transpose(-2, -1) @ vf
        norm = kf.sum(dim=-2)[..., None]
        return ((qf @ state) / ((qf @ norm) + eps)).to(q.dtype)
    ones = vf.new_ones(*vf.shape[:-1], 1)
    out, _ = chunk_recurrence(qf, kf, torch.cat([vf, ones], dim=-1), chunk=chunk)
    return (out[..., :-1] / (out[..., -1:] + eps)).to(q.dtype)


def gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    *,
    scale: float,
    chunk: int = 64,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.gated_linear_attention``, chunked."""
    group = q.shape[1] // k.shape[1]
    out, state = chunk_recurrence(
        q.float(),
        _heads(k, group),
        _heads(v, group),
        _heads(log_alpha, group),
        chunk=chunk,
        state=state,
    )
    return (scale * out).to(q.dtype), state


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    *,
    scale: float,
    window: int,
    eps: float = 1e-6,
    chunk: int = 64,
) -> torch.Tensor:
    """``reference.hybrid_attention`` in ``O(n·w)``: the window as blocks of ``w`` queries
    against their own and the previous block of keys; the older keys as causal linear attention
    over keys shifted ``w`` places right (``φ(k_{t−w})``, zeros before)."""
    group = q.shape[1] // k.shape[1]
    qf, kf, vf = q.float(), _heads(k, group), _heads(v, group)
    fqf, fkf = fq.float(), _heads(fk, group)
    n, w = qf.shape[-2], window
    ones = vf.new_ones(*vf.shape[:-1], 1)
    v1 = torch.cat([vf, ones], dim=-1)
    shifted_k = F.pad(fkf, (0, 0, w, 0))[..., :n, :]
    shifted_v = F.pad(v1, (0, 0, w, 0))[..., :n, :]
    older, _ = chunk_recurrence(fqf, shifted_k, shifted_v, chunk=chunk)
    qb = _chunks(qf, w)  # (B, H, nb, w, d)
    keys = _chunks(F.pad(kf, (0, 0, w, 0)), w)  # block i of keys holds tokens (i−1)w .. iw−1
    vals = _chunks(F.pad(v1, (0, 0, w, 0)), w)
    count = qb.shape[2]
    keys2 = torch.cat([keys[:, :, :count], keys[:, :, 1 : count + 1]], dim=-2)
    vals2 = torch.cat([vals[:, :, :count], vals[:, :, 1 : count + 1]], dim=-2)
    scores = (qb @ keys2.transpose(-2, -1)) * scale
    row = torch.arange(w)[:, None] + w  # position in the 2w-key frame
    col = torch.arange(2 * w)[None, :]
    keep = (col <= row) & (row - col < w)
    first = torch.zeros(count, 1, 1, dtype=torch.bool)
    first[0] = True
    keep = keep & ~(first & (col < w))  # the first block has no previous keys
    scores = scores.masked_fill(~keep, float("-inf"))
    top = scores.amax(dim=-1, keepdim=True)
    soft = torch.exp(scores - top) * gamma.float()[None, :, None, None, None]
    window_part = (soft @ vals2).reshape(*qf.shape[:2], -1, v1.shape[-1])[:, :, :n]
    total = window_part + older
    return (total[..., :-1] / (total[..., -1:] + eps)).to(q.dtype)
