"""Dispatch for the linear family (``linear``, ``gla``, and ``hybrid``'s older-key term).

Kernels register under variant ``"linear"`` with the contract
``forward(fq, fk, v, log_alpha, *, causal, chunk) -> out``: φ(q) ``(B, H, N, F)``, φ(k) ``(B,
Hkv, M, F)``, v ``(B, Hkv, M, Dv)``, gates ``log α`` like φ(k) or None, and the normalised output
``y = φ(q)ᵀS / (φ(q)ᵀz + eps)`` ``(B, H, N, Dv)`` (state and normaliser decayed alike when
gated; gated calls are causal). ``supports(fq, fk, v, log_alpha, causal)`` returns None or why
not. The batched-torch form in ``codegen/eager/linear.py`` is registered for every device and
is the one autograd goes through (calibration, fine-tuning).
"""

from __future__ import annotations

import torch

from attnopt.codegen.eager import linear as eager
from attnopt.codegen.registry import Kernel, kernels_for, register_kernel

EPS = 1e-6


def _eager_forward(fq, fk, v, log_alpha, *, causal: bool, chunk: int) -> torch.Tensor:
    if log_alpha is None:
        return eager.linear_attention(fq, fk, v, causal=causal, eps=EPS, chunk=chunk)
    ones = v.new_ones(*v.shape[:-1], 1)
    out, _ = eager.gated_linear_attention(
        fq, fk, torch.cat([v, ones], dim=-1), log_alpha, scale=1.0, chunk=chunk
    )
    return out[..., :-1] / (out[..., -1:] + EPS)


EAGER = register_kernel(
    Kernel(variant="linear", device_type="any", name="eager", forward=_eager_forward)
)

import attnopt.codegen.backends  # noqa: E402,F401  (registers the compiled kernels)


def linear_forward(fq, fk, v, log_alpha, *, causal: bool, chunk: int) -> torch.Tensor:
    """The best registered linear kernel for these inputs; eager whenever gradients flow."""
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (fq, fk, v, log_alpha)
    )
    for kernel in kernels_for("linear", fq.device.type):
        if wants_grad and kernel is not EAGER:
            continue
        if kernel.supports is None or kernel.supports(fq, fk, v, log_alpha, causal) is None:
            return kernel.forward(fq, fk, v, log_alpha, causal=causal, chunk=chunk)
    return EAGER.forward(fq, fk, v, log_alpha, causal=causal, chunk=chunk)
