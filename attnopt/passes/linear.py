"""linear, gla and hybrid: softmax attention replaced by a feature-map kernel (ALGORITHMS.md §3).

- ``linear``: ``y = φ(Q)·S / φ(Q)·z`` over all past keys (causal) or all keys (not causal).
- ``gla``: the same with data-dependent decay of the state, gates from the keys themselves
  (``log α = logsigmoid(k)/16``, no new parameters), one normaliser decayed alike.
- ``hybrid``: exact softmax over the last ``window`` keys plus the linear term over older keys,
  mixed by a per-head weight γ, one shared normaliser (training-free start; LoLCATs).

Feature maps: ``elu`` (elu+1), ``relu``, and ``hedgehog`` ``[softmax(xW) ⊕ softmax(−xW)]`` with
a learned ``W`` per head (identity at start). ``attnopt.calibrate`` trains W and γ.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attnopt.codegen.eager import linear as eager
from attnopt.codegen.layout import HeadsLayout
from attnopt.codegen.linear_ops import linear_forward
from attnopt.passes.base import Replacement, SiteModule, register_pass, site_attrs
from attnopt.rewriter.site import AttentionSite
from attnopt.targets import Target

GATE_DIVISOR = 16.0  # log α = logsigmoid(g)/16 keeps the decay slow (ALGORITHMS.md §3)


class FeatureMap(nn.Module):
    """φ applied per head to ``(B, H, N, d)``; hedgehog carries ``weight`` ``(H, d, d')``."""

    def __init__(self, kind: str, heads: int, head_dim: int, feature_dim: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "hedgehog":
            start = torch.eye(head_dim, feature_dim).expand(heads, -1, -1).clone()
            self.weight = nn.Parameter(start)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "elu":
            return F.elu(x.float()) + 1
        if self.kind == "relu":
            return F.relu(x.float())
        z = torch.einsum("bhnd,hdf->bhnf", x.float(), self.weight)
        return torch.cat([z.softmax(dim=-1), (-z).softmax(dim=-1)], dim=-1)


FEATURE_MAPS = ("hedgehog", "elu", "relu")


class LinearSite(SiteModule):
    """One rewritten site of the linear family; ``form`` is ``linear``, ``gla`` or ``hybrid``."""

    def __init__(self, form: str, attrs: dict, heads: int, head_dim: int, knobs: dict) -> None:
        super().__init__(attrs)
        self.form = form
        self.chunk = int(knobs["chunk"])
        self.window = int(knobs.get("window", 0))
        kv_heads = heads // attrs["kv_group"]
        kind, dim = knobs["feature_map"], int(knobs["feature_dim"]) or head_dim
        self.feature_q = FeatureMap(kind, heads, head_dim, dim)
        self.feature_k = FeatureMap(kind, kv_heads, head_dim, dim)
        if form == "hybrid":
            self.gamma = nn.Parameter(torch.ones(heads))

    def attend(self, heads: HeadsLayout) -> torch.Tensor:
        fq, fk = self.feature_q(heads.q), self.feature_k(heads.k)
        causal = self.attrs["causal"]
        if self.form == "hybrid":
            return eager.hybrid_attention(
                heads.q,
                heads.k,
                heads.v,
                fq,
                fk,
                self.gamma,
                scale=self.attrs["scale"],
                window=self.window,
                chunk=self.chunk,
            )
        gate = None
        if self.form == "gla":
            raw = heads.k.float()
            pick = torch.arange(fk.shape[-1], device=raw.device) % raw.shape[-1]
            gate = F.logsigmoid(raw[..., pick]) / GATE_DIVISOR
        return linear_forward(fq, fk, heads.v.float(), gate, causal=causal, chunk=self.chunk)


class _LinearFamily:
    """What the three forms share: where they apply, and building their module."""

    name = ""
    approximate = True
    causal_only = False
    knobs: dict[str, tuple] = {
        "feature_map": FEATURE_MAPS,
        "feature_dim": (0, 16, 32, 64),  # hedgehog's d' (0: the head dim); elu/relu keep d
        "chunk": (64, 32, 16),
    }

    def applies(self, site: AttentionSite, target: Target) -> str | None:
        if site.kind != "standard":
            return f"{site.kind} attention site"
        if site.dropout_p > 0:
            return f"dropout p={site.dropout_p} in training"
        if site.masks:
            return f"{site.mask_kind} mask: only causal or unmasked attention linearises"
        if site.window:
            return "sliding-window mask"
        if not isinstance(site.heads, int) or not isinstance(site.head_dim, int):
            return "needs a static head count and head dim (the feature maps are per head)"
        if self.causal_only and not site.causal:
            return f"{self.name} is causal; this site is not"
        if site.causal and str(site.q_len) != str(site.kv_len):
            return f"causal with {site.q_len} queries and {site.kv_len} keys (needs n == m)"
        return None

    def check_knob(self, name: str, value: int) -> str | None:
        """The chunked kernels cut sequences into power-of-two chunks (sub-chunks of 16)."""
        if name == "chunk" and value & (value - 1):
            return f"{self.name} chunk={value}; expected a power of two"
        return None

    def replacement(self, site: AttentionSite, **knobs: Any) -> Replacement:
        chosen = {name: knobs.get(name, choices[0]) for name, choices in self.knobs.items()}
        module = LinearSite(self.name, site_attrs(site), site.heads, site.head_dim, chosen)
        return Replacement(op=f"attnopt::{self.name}", attrs=chosen, module=module)


@register_pass
class LinearPass(_LinearFamily):
    name = "linear"


@register_pass
class GlaPass(_LinearFamily):
    name = "gla"
    causal_only = True


@register_pass
class HybridPass(_LinearFamily):
    name = "hybrid"
    causal_only = True
    knobs = {**_LinearFamily.knobs, "window": (64, 32, 128)}
