"""Prefix-NTK attention as exact attention over the input keys plus the prefix terms in the
epilogue (ALGORITHMS.md §5); same contract as ``codegen/reference/prefix_ntk.py``.

The exact part yields ``(out, lse)`` per row; with ``m = max(lse, 0)`` the combination
``y = (out·e^{lse−m} + e^{−m} φᵀZ) / (e^{lse−m} + e^{−m} φᵀz)`` never exponentiates a positive
number, and a row with no visible input key (``lse = −inf``) reads the prefix terms alone.
The work is ``O(N·M·D + N·D'·Dv)``: the prefix length does not appear.
"""

from __future__ import annotations

import torch

from attnopt.codegen.reference.exact import exact_attention


def _wants_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _exact(
    q, k, v, scale: float, causal: bool, mask=None, fill: float = float("-inf")
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU's fused flash kernel when nothing needs a gradient (it returns the log-sum-exp but
    no gradient through it) and there is no mask, the differentiable reference otherwise."""
    wants_grad = _wants_grad(q, k, v)
    top_left_ok = not causal or q.shape[-2] == k.shape[-2]  # the fused kernel's causal
    same_dim = v.shape[-1] == q.shape[-1]
    if q.device.type == "cpu" and not wants_grad and top_left_ok and same_dim and mask is None:
        heads = q.shape[1]
        group = heads // k.shape[1]
        if group > 1:
            k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.float(), k.float(), v.float(), 0.0, causal, scale=scale
        )
        return out, lse
    return exact_attention(q.float(), k, v, mask, scale=scale, causal=causal, fill=fill)


def combine(
    out: torch.Tensor, lse: torch.Tensor, fq: torch.Tensor, Z: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """The epilogue: the prefix terms added to the exact part's numerator and denominator."""
    m = lse.clamp_min(0.0)[..., None]
    inside = torch.exp(lse[..., None] - m)
    outside = torch.exp(-m)
    numerator = out.float() * inside + outside * torch.einsum("bhnf,hfe->bhne", fq, Z.float())
    denominator = inside + outside * (fq @ z.float()[None, :, :, None]).clamp_min(0.0)
    return numerator / denominator.clamp_min(torch.finfo(torch.float32).tiny)


def prefix_ntk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    Z: torch.Tensor,
    z: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float,
    causal: bool = False,
    fill: float = float("-inf"),
) -> torch.Tensor:
    """``mask`` (over the input keys, as in the exact contract) is applied to the exact part.
    CUDA tensors without gradients go to the Triton exact kernel (``codegen/triton``)."""
    if q.device.type == "cuda" and not _wants_grad(q, k, v):
        from attnopt.codegen.triton import prefix_ntk as triton_ntk  # imports triton

        return triton_ntk.prefix_ntk_attention(
            q, k, v, fq, Z, z, mask, scale=scale, causal=causal, fill=fill
        )
    out, lse = _exact(q, k, v, scale, causal, mask, fill)
    return combine(out, lse, fq.float(), Z, z).to(q.dtype)
