"""Plain-torch linear attention (not gated): the oracle the linear kernels are tested against.

Contract shared by every linear kernel (ALGORITHMS.md §3); the caller applies the feature map:

- ``q``: ``(B, H, N, Dk)`` holding φ(Q); ``k``: ``(B, Hkv, M, Dk)`` holding φ(K); ``v``:
  ``(B, Hkv, M, Dv)``; ``H % Hkv == 0`` (query head ``h`` reads kv head ``h // (H // Hkv)``).
- ``causal``: token ``t`` reads the state of keys ``0..t``, ``S_t = Σ φ(k_s) v_sᵀ`` and
  ``z_t = Σ φ(k_s)``, and ``y_t = φ(q_t)ᵀ S_t / (φ(q_t)ᵀ z_t + eps)``; queries and keys are the
  same positions, so ``N == M``. Otherwise ``y = φ(Q)(φ(K)ᵀ V) / (φ(Q)(φ(K)ᵀ 1) + eps)``, any M.
- ``eps`` keeps rows whose denominator is 0 (all-zero ReLU features) at 0 rather than NaN.
- Returns ``(B, H, N, Dv)`` in ``q.dtype``, computed in fp32.
"""

from __future__ import annotations

import torch


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Linear attention in fp32 as the recurrence over tokens (causal) or the closed form."""
    group = q.shape[1] // k.shape[1]
    qf = q.float()
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    if not causal:
        state = kf.transpose(-2, -1) @ vf
        norm = kf.sum(dim=-2)
        out = (qf @ state) / ((qf @ norm[..., None]) + eps)
        return out.to(q.dtype)
    batch, heads, n, _ = qf.shape
    state = qf.new_zeros(batch, heads, kf.shape[-1], vf.shape[-1])
    norm = qf.new_zeros(batch, heads, kf.shape[-1])
    out = qf.new_empty(batch, heads, n, vf.shape[-1])
    for t in range(n):
        state = state + kf[:, :, t, :, None] * vf[:, :, t, None, :]
        norm = norm + kf[:, :, t]
        numerator = (qf[:, :, t, :, None] * state).sum(dim=-2)
        denominator = (qf[:, :, t] * norm).sum(dim=-1, keepdim=True)
        out[:, :, t] = numerator / (denominator + eps)
    return out.to(q.dtype)


def _to_heads(t: torch.Tensor | None, group: int) -> torch.Tensor | None:
    """kv-head tensors repeated to the query heads, in fp32."""
    if t is None:
        return None
    return t.float().repeat_interleave(group, dim=1) if group > 1 else t.float()


def gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    *,
    scale: float,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GLA as the token recurrence ``S_t = Diag(α_t) S_{t−1} + k_t v_tᵀ``, ``y_t = s·q_tᵀ S_t``.

    ``log_alpha`` ``(B, Hkv, N, Dk)`` holds ``log α_t ≤ 0`` beside ``k``; ``state`` ``(B, H, Dk,
    Dv)`` is the incoming state (zeros if None). Causal only (N == M). Returns ``(out, state)``:
    ``out`` ``(B, H, N, Dv)`` in ``q.dtype`` and the final fp32 state.
    """
    group = q.shape[1] // k.shape[1]
    qf, kf, vf, gf = (
        q.float(),
        _to_heads(k, group),
        _to_heads(v, group),
        _to_heads(log_alpha, group),
    )
    batch, heads, n, dk = qf.shape
    if state is None:
        state = qf.new_zeros(batch, heads, dk, vf.shape[-1])
    out = qf.new_empty(batch, heads, n, vf.shape[-1])
    for t in range(n):
        state = gf[:, :, t, :, None].exp() * state + kf[:, :, t, :, None] * vf[:, :, t, None, :]
        out[:, :, t] = scale * (qf[:, :, t, :, None] * state).sum(dim=-2)
    return out.to(q.dtype), state


def normalised_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    *,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Gated linear attention with its normaliser decayed like the state (the ``gla`` pass):
    ``y_t = φ(q_t)ᵀ S_t / (φ(q_t)ᵀ z_t + eps)``, ``z_t = α_t ⊙ z_{t−1} + φ(k_t)``."""
    ones = v.new_ones(*v.shape[:-1], 1)
    out, _ = gated_linear_attention(
        q.float(), k.float(), torch.cat([v.float(), ones.float()], dim=-1), log_alpha, scale=1.0
    )
    return (out[..., :-1] / (out[..., -1:] + eps)).to(q.dtype)


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
) -> torch.Tensor:
    """Causal sliding-window softmax plus linear attention over older keys, one normaliser.

    ``y_i = (Σ_{i−w<j≤i} γ e^{s q_i·k_j − c_i} v_j + Σ_{j≤i−w} φ(q_i)·φ(k_j) v_j) / (same with
    1 for v)``, ``c_i`` the row max of the window scores (ALGORITHMS.md §3, LoLCATs). ``fq``/``fk``
    are φ(q)/φ(k); ``gamma`` ``(H,)`` the per-head window weight. Quadratic: an oracle only.
    """
    group = q.shape[1] // k.shape[1]
    qf, kf, vf = q.float(), _to_heads(k, group), _to_heads(v, group)
    fqf, fkf = fq.float(), _to_heads(fk, group)
    n = qf.shape[-2]
    rows = torch.arange(n)[:, None]
    cols = torch.arange(n)[None, :]
    in_window = (cols <= rows) & (rows - cols < window)
    older = cols <= rows - window
    scores = (qf @ kf.transpose(-2, -1)) * scale
    scores = scores.masked_fill(~in_window, float("-inf"))
    top = scores.amax(dim=-1, keepdim=True)
    soft = torch.exp(scores - top) * gamma.float()[None, :, None, None]
    lin = (fqf @ fkf.transpose(-2, -1)).masked_fill(~older, 0.0)
    weights = soft + lin
    out = (weights @ vf) / (weights.sum(dim=-1, keepdim=True) + eps)
    return out.to(q.dtype)
