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
