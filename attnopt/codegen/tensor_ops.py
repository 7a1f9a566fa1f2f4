"""Dispatch for exact tensor attention (ALGORITHMS.md §4).

Kernels register under variant ``"tensor"`` with the contract of ``codegen/reference/tensor.py``:
``forward(q, k1, k2, v1, v2, *, scale, causal, window) -> out`` and ``supports(q, k1, k2, v1,
v2, causal, window)`` returning None or why not. The fused torch form in
``codegen/eager/tensor.py`` is registered for every device and is the one autograd goes
through (fine-tuning).
"""

from __future__ import annotations

import torch

from attnopt.codegen.eager import tensor as eager
from attnopt.codegen.registry import Kernel, kernels_for, register_kernel

EAGER = register_kernel(
    Kernel(variant="tensor", device_type="any", name="eager", forward=eager.tensor_attention)
)

import attnopt.codegen.backends  # noqa: E402,F401  (registers the compiled kernels)


def tensor_forward(
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
    """The best registered tensor kernel for these inputs; eager whenever gradients flow."""
    args = (q, k1, k2, v1, v2)
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in args)
    for kernel in kernels_for("tensor", q.device.type):
        if wants_grad and kernel is not EAGER:
            continue
        if kernel.supports is None or kernel.supports(*args, causal, window) is None:
            return kernel.forward(*args, scale=scale, causal=causal, window=window)
    return EAGER.forward(*args, scale=scale, causal=causal, window=window)
