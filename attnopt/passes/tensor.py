"""tensor: naive tensor attention (a site of kind ``"tensor"``) rewritten to the fused kernel,
or to the polynomial approximation when the scores are small enough (ALGORITHMS.md §4).

Knobs: ``form`` ``auto`` (the polynomial while every call so far had a small enough score range,
the exact fused kernel from the first call that did not: the calibration batches decide, and a
later out-of-range input never gets the approximation) or ``fused`` (always exact); ``degree`` of
the Taylor polynomial; ``max_range``: the largest ``|s·⟨q, k1∘k2⟩|`` the polynomial is used for.
The range is measured per call as the bound ``s·maxᵢ Σ_d |q_id|·maxⱼ|k1_jd|·maxₗ|k2_ld|``, in
``O((N + M)·D)``; it is never below the true range.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnopt.codegen.reference.tensor import polynomial_tensor_attention
from attnopt.codegen.tensor_ops import tensor_forward
from attnopt.passes.base import Replacement, register_pass, site_attrs
from attnopt.rewriter.site import AttentionSite
from attnopt.targets import Target


def score_bound(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, scale: float) -> float:
    """An upper bound on ``|scale·⟨q_i, k1_j ∘ k2_l⟩|`` over every ``(B, H)`` and triple."""
    keys = k1.float().abs().amax(dim=-2) * k2.float().abs().amax(dim=-2)  # (B, H, D)
    rows = (q.float().abs() * keys[..., None, :]).sum(dim=-1)
    return abs(scale) * float(rows.amax()) if rows.numel() else 0.0


def _fold(t: torch.Tensor) -> torch.Tensor:
    """``(*L, N, D)`` as the kernels' ``(L, 1, N, D)``."""
    return t.reshape(-1, 1, *t.shape[-2:])


class TensorRewrite(nn.Module):
    """Called as ``(q, k1, v1, mask, k2, v2)`` (the splice's order: the second key and value
    sets come after the standard operands); returns ``(*L, N, Dv)`` in ``q``'s dtype."""

    def __init__(self, attrs: dict, form: str, degree: int, max_range: float) -> None:
        super().__init__()
        self.attrs, self.form = dict(attrs), form
        self.degree, self.max_range = int(degree), float(max_range)
        self.measured = 0.0  # the largest score bound seen
        self.polynomial_calls = 0
        self.fused_calls = 0

    def forward(self, q, k1, v1, mask, k2, v2) -> torch.Tensor:
        lead = torch.broadcast_shapes(*(t.shape[:-2] for t in (q, k1, k2, v1, v2)))
        q4, k14, k24, v14, v24 = (
            _fold(t.expand(*lead, *t.shape[-2:])) for t in (q, k1, k2, v1, v2)
        )
        scale, causal, window = (self.attrs[key] for key in ("scale", "causal", "window"))
        polynomial = self.form == "auto" and self._polynomial_fits(q4, k14, k24)
        if polynomial and self.measured <= self.max_range:
            self.measured = max(self.measured, score_bound(q4, k14, k24, scale))
        if polynomial and self.measured <= self.max_range:
            self.polynomial_calls += 1
            out = polynomial_tensor_attention(
                q4,
                k14,
                k24,
                v14,
                v24,
                scale=scale,
                degree=self.degree,
                causal=causal,
                window=window,
            )
        else:
            self.fused_calls += 1
            out = tensor_forward(q4, k14, k24, v14, v24, scale=scale, causal=causal, window=window)
        return out.reshape(*lead, q.shape[-2], v1.shape[-1]).to(q.dtype)

    def _polynomial_fits(self, q, k1, k2) -> bool:
        """The state form needs queries and keys at the same positions when masked."""
        masked = self.attrs["causal"] or self.attrs["window"] > 0
        same = q.shape[-2] == k1.shape[-2] == k2.shape[-2]
        return not masked or (same and self.attrs["causal"])

    def note(self) -> str:
        """What ran and why, for the report's trial: the measured range decides."""
        if self.form == "fused":
            return "fused exact kernel"
        ran = f"polynomial degree {self.degree} on {self.polynomial_calls} calls"
        if self.measured > self.max_range:
            return (
                f"polynomial refused: measured score range {self.measured:.3g} > max_range "
                f"{self.max_range:g} ({ran} before); fused exact kernel from then on"
            )
        return f"{ran}, measured score range {self.measured:.3g} <= {self.max_range:g}"


@register_pass
class TensorPass:
    name = "tensor"
    approximate = True  # the polynomial form is; ``form="fused"`` is exact
    knobs: dict[str, tuple] = {
        "form": ("auto", "fused"),
        "degree": (4, 2, 3, 6),
        "max_range": (1.0, 0.5, 2.0),
    }

    def applies(self, site: AttentionSite, target: Target) -> str | None:
        if site.kind != "tensor":
            return "not tensor attention (no pair of key sets)"
        if site.dropout_p > 0:
            return f"dropout p={site.dropout_p} in training"
        if site.masks:
            return f"{site.mask_kind} mask over key pairs"
        return None

    def replacement(self, site: AttentionSite, **knobs: Any) -> Replacement:
        chosen = {name: knobs.get(name, choices[0]) for name, choices in self.knobs.items()}
        module = TensorRewrite(site_attrs(site), **chosen)
        return Replacement(op="attnopt::tensor", attrs=chosen, module=module)
