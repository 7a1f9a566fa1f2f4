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


#: Per-site metrics of ALGORITHMS.md (``cos`` a floor, the others ceilings) and the model-level
#: ``model_rel_l1``; approximate variants default to ``cos ≥ 0.99``, ``rel_l1 ≤ 0.05``.
SITE_METRICS = ("cos", "rel_l1", "rmse")
DEFAULT_BUDGET = {"cos": 0.99, "rel_l1": 0.05}


class ErrorSums:
    """Running sums over many batches, so metrics cover every calibration batch at once (the
    same as computing them on all outputs concatenated). Positions where the reference is not
    finite (rows the original masks entirely) are left out."""

    def __init__(self) -> None:
        self.dot = self.sq_a = self.sq_b = self.l1_diff = self.l1_b = self.sq_diff = 0.0
        self.count = 0
        self.max_error = 0.0

    def add(self, candidate: torch.Tensor, reference: torch.Tensor) -> None:
        a, b = candidate.detach().double(), reference.detach().double()
        self.max_error = max(self.max_error, max_error(candidate, reference))
        keep = torch.isfinite(b)
        a, b = a[keep], b[keep]
        diff = a - b
        self.dot += float((a * b).sum())
        self.sq_a += float((a * a).sum())
        self.sq_b += float((b * b).sum())
        self.l1_diff += float(diff.abs().sum())
        self.l1_b += float(b.abs().sum())
        self.sq_diff += float((diff * diff).sum())
        self.count += b.numel()

    def add_outputs(self, candidate: Any, reference: Any) -> None:
        """Every floating-point tensor of two output structures of the same shape."""
        for a, b in zip(pytree.tree_leaves(candidate), pytree.tree_leaves(reference), strict=True):
            if isinstance(b, torch.Tensor) and b.is_floating_point():
                self.add(a, b)

    def metrics(self) -> dict[str, float]:
        norms = (self.sq_a * self.sq_b) ** 0.5
        return {
            "cos": self.dot / norms if norms > 0 else float(self.sq_a == self.sq_b),
            "rel_l1": self.l1_diff / self.l1_b if self.l1_b > 0 else float(self.l1_diff > 0),
            "rmse": (self.sq_diff / max(1, self.count)) ** 0.5,
            "max_error": self.max_error,
        }


def violations(metrics: dict[str, float], limits: dict[str, float]) -> list[str]:
    """What in ``metrics`` breaks ``limits`` (``cos`` is a floor, the rest ceilings)."""
    broken = []
    for name, limit in limits.items():
        value = metrics[name]
        if value != value or (value < limit if name == "cos" else value > limit):
            sign = "<" if name == "cos" else ">"
            broken.append(f"{name} {value:.4g} {sign} {limit:g}")
    return broken
