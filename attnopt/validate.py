"""Compare a rewritten site or model with the original, in one measure every stage reports."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

#: Exact variants must agree with the original within this (max error relative to max |ref|,
#: floored at 1) unless the user gives a tolerance.
DEFAULT_TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def tolerance_for(dtype: torch.dtype, user_tolerance: float | None) -> float:
    if user_tolerance is not None:
        return user_tolerance
    return DEFAULT_TOLERANCE.get(dtype, 1e-5)


def max_error(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |a - b| / max(1, max |b|)``; where the reference is NaN (rows the original masks
    entirely) any finite value is accepted."""
    a, b = candidate.detach(), reference.detach()
    if a.shape != b.shape:
        return float("inf")
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        a, b = a.float(), b.float()
    if a.numel() == 0:
        return 0.0
    agree = (a == b) | torch.isnan(b)  # equal (infinities of one sign too), or reference NaN
    diff = (a - b).abs().masked_fill(agree, 0.0)
    if bool(torch.isnan(diff).any()):
        return float("inf")
    magnitude = b.abs().masked_fill(~torch.isfinite(b), 0.0).max()
    return float(diff.max()) / max(1.0, float(magnitude))


def compare_outputs(candidate: Any, reference: Any) -> float:
    """The worst ``max_error`` over all floating-point tensors of two output structures;
    ``inf`` when the structures, shapes or dtypes differ."""
    leaves_a, spec_a = pytree.tree_flatten(candidate)
    leaves_b, spec_b = pytree.tree_flatten(reference)
    if spec_a != spec_b:
        return float("inf")
    worst = 0.0
    for a, b in zip(leaves_a, leaves_b, strict=True):
        if isinstance(b, torch.Tensor):
            if not isinstance(a, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
                return float("inf")
            if b.is_floating_point():
                worst = max(worst, max_error(a, b))
            elif not torch.equal(a, b):
                return float("inf")
        elif a != b:
            return float("inf")
    return worst
