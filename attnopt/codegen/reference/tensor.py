"""Plain-torch tensor (higher-order) attention: the oracle its kernels are tested against, and
the polynomial approximation for bounded scores (ALGORITHMS.md §4).

Contract shared by every tensor kernel (reference, eager fused, Triton):

- ``q``: ``(B, H, N, D)``; ``k1``: ``(B, H, M1, D)``, ``k2``: ``(B, H, M2, D)``; ``v1``: ``(B, H,
  M1, Dv)``, ``v2``: ``(B, H, M2, Dv)``.
- Scores over key pairs: ``S[i, j, l] = scale·⟨q_i, k1_j ∘ k2_l⟩``; one softmax over the pair
  ``(j, l)``; ``y_i = Σ_{j,l} P[i, j, l] (v1_j ∘ v2_l)``.
- ``causal`` / ``window``: a pair is kept when both of its keys are, each by the exact kernels'
  rule (``codegen/reference/exact.py``, ``structural_keep``): with ``causal`` and ``window = w``
  that is ``i − w < j, l ≤ i`` when ``N == M``.
- Rows with no pair kept give 0, never NaN. Returns ``(B, H, N, Dv)`` in ``q.dtype``, computed
  in fp32.
"""

from __future__ import annotations

import math

import torch

from attnopt.codegen.reference.exact import structural_keep


def pair_keep(n: int, m1: int, m2: int, causal: bool, window: int, device) -> torch.Tensor | None:
    """``(N, M1, M2)`` bool: the pairs the causal / window flags keep (None: all of them)."""
    if not causal and window <= 0:
        return None
    keep1 = structural_keep(n, m1, causal, window, device)
    keep2 = structural_keep(n, m2, causal, window, device)
    return keep1[:, :, None] & keep2[:, None, :]


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
) -> torch.Tensor:
    """Naive tensor attention: materialises the ``(B, H, N, M1, M2)`` scores (the oracle)."""
    scores = torch.einsum("bhid,bhjd,bhld->bhijl", q.float(), k1.float(), k2.float()) * scale
    keep = pair_keep(q.shape[-2], k1.shape[-2], k2.shape[-2], causal, window, q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    flat = scores.flatten(-2)
    row_max = flat.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(flat - row_max)
    probs = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    probs = probs.view_as(scores)
    out = torch.einsum("bhijl,bhjd,bhld->bhid", probs, v1.float(), v2.float())
    return out.to(q.dtype)


def polynomial_features(x: torch.Tensor, degree: int, scale: float | None = None) -> torch.Tensor:
    """``[c_t · x^{⊗t}]_{t ≤ degree}`` flattened: ``(…, Σ_t D^t)``. Queries take ``c_t =
    scale^t / t!``, keys ``c_t = 1`` (``scale=None``), so that ``⟨φ(q), ψ(k1) ∘ ψ(k2)⟩ =
    Σ_t (scale·⟨q, k1∘k2⟩)^t / t!``."""
    power = x.new_ones(*x.shape[:-1], 1)
    parts = [power]
    for t in range(1, degree + 1):
        power = (power[..., :, None] * x[..., None, :]).flatten(-2)
        parts.append(power if scale is None else power * (scale**t / math.factorial(t)))
    return torch.cat(parts, dim=-1)


def _windowed_sum(t: torch.Tensor, causal: bool, window: int) -> torch.Tensor:
    """Over the key axis (-3): per query position, the sum over its kept keys (``N == M``):
    a prefix sum when causal, its difference over the last ``window`` keys when windowed."""
    if not causal:
        return t.sum(dim=-3, keepdim=True)
    total = t.cumsum(dim=-3)
    if window > 0 and window < t.shape[-3]:
        shifted = torch.zeros_like(total)
        shifted[..., window:, :, :] = total[..., :-window, :, :]
        total = total - shifted
    return total


def polynomial_tensor_attention(
    q: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    v1: torch.Tensor,
    v2: torch.Tensor,
    *,
    scale: float,
    degree: int,
    causal: bool = False,
    window: int = 0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``exp`` replaced by its degree-``g`` Taylor polynomial, factored through feature maps:
    numerator ``U1·((U2ᵀV1) ∘ (U3ᵀV2))``, denominator alike with ones; ``O(N·r·Dv)`` for
    ``r = Σ_t D^t``. Accurate only while ``|scale·⟨q, k1∘k2⟩|`` stays small (the pass measures
    it). Causal / windowed forms take per-position state sums (``N == M``); the non-causal
    window has no state form and is refused by the pass."""
    u1 = polynomial_features(q.float(), degree, scale)
    u2 = polynomial_features(k1.float(), degree)
    u3 = polynomial_features(k2.float(), degree)
    ones = v1.new_ones(*v1.shape[:-1], 1).float()
    val1 = torch.cat([v1.float(), ones], dim=-1)  # the last column carries the denominator
    val2 = torch.cat([v2.float(), ones], dim=-1)
    s1 = _windowed_sum(u2[..., :, None] * val1[..., None, :], causal, window)
    s2 = _windowed_sum(u3[..., :, None] * val2[..., None, :], causal, window)
    out = torch.einsum("bhnr,bhnrd->bhnd", u1, s1 * s2)
    return (out[..., :-1] / (out[..., -1:] + eps)).to(q.dtype)
