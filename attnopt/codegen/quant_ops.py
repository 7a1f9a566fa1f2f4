"""Dispatch for the ``quant`` variant (ALGORITHMS.md §6).

Kernels register under variant ``"quant"`` with the contract of ``codegen/reference/quant.py``:
``forward(q, k, v, mask, *, scale, causal, window, fill, bits, pv) -> out`` and
``supports(q, k, v, mask, causal, window, bits, pv)`` returning None or why not. The reference
is registered for every device at priority 0, so there is always a kernel (a GPU without FP8
tensor cores runs ``pv="fp8"`` there, emulated).
"""

from __future__ import annotations

import torch

from attnopt.codegen.eager import quant as cpu
from attnopt.codegen.reference.quant import quant_attention
from attnopt.codegen.registry import Kernel, kernels_for, register_kernel

REFERENCE = register_kernel(
    Kernel(variant="quant", device_type="any", name="reference", forward=quant_attention)
)
CPU = register_kernel(
    Kernel(
        variant="quant",
        device_type="cpu",
        name="int_mm",
        forward=cpu.quant_attention_cpu,
        supports=cpu.supports,
        priority=10,
    )
)

import attnopt.codegen.backends  # noqa: E402,F401  (registers the compiled kernels)


def quant_forward(q, k, v, mask, *, bits: int, pv: str, **flags) -> torch.Tensor:
    """The best registered quant kernel that accepts these inputs (``flags``: scale, causal,
    window, fill)."""
    for kernel in kernels_for("quant", q.device.type):
        why = None
        if kernel.supports is not None:
            why = kernel.supports(q, k, v, mask, flags["causal"], flags["window"], bits, pv)
        if why is None:
            return kernel.forward(q, k, v, mask, **flags, bits=bits, pv=pv)
    return REFERENCE.forward(q, k, v, mask, **flags, bits=bits, pv=pv)
