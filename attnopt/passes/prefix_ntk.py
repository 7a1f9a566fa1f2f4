"""prefix_ntk: a long input-independent prefix of the keys and values replaced by ``Z, z``
(NTK-attention, ALGORITHMS.md §5).

A site whose K/V are ``[P_K; K]``, ``[P_V; V]`` pays ``O(n·p·d)`` for a prefix that never
changes. ``PrefixNTKSite`` reads only the input keys exactly and adds ``φ(q)ᵀZ``, ``φ(q)ᵀz`` to
the numerator and denominator, so the cost no longer grows with ``p``. ``Z, z`` start from the
prefix (``Σ φ(k_p) v_pᵀ``) and are fitted by least squares on the queries of the first call
(the budget's first calibration batch); they are trainable parameters afterwards
(``attnopt.calibrate``, or fine-tuning through ``attnopt.prefix_ntk``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnopt.codegen.eager.prefix_ntk import _exact, prefix_ntk_attention
from attnopt.codegen.layout import HeadsLayout
from attnopt.codegen.reference import prefix_ntk as ref
from attnopt.errors import AttnoptError
from attnopt.passes.base import Replacement, SiteModule, register_pass, site_attrs
from attnopt.rewriter.site import AttentionSite
from attnopt.targets import Target


class PrefixNTKSite(SiteModule):
    """One site with its ``prefix_len``-token prefix replaced by trainable ``Z``, ``z``.

    ``prefix_len == 0`` (``attnopt.prefix_ntk`` on a site without a prefix) starts with
    ``Z = z = 0``: the site computes what it did until ``Z, z`` are trained."""

    def __init__(
        self,
        attrs: dict,
        prefix_len: int,
        heads: int,
        head_dim: int,
        value_dim: int,
        feature_dim: int = 0,
    ) -> None:
        super().__init__(attrs)
        self.prefix_len = int(prefix_len)
        dim = int(feature_dim) or head_dim
        self.Z = nn.Parameter(torch.zeros(heads, dim, value_dim))
        self.z = nn.Parameter(torch.zeros(heads, dim))
        weight = None if dim == head_dim else ref.feature_weight(heads, head_dim, dim)
        self.register_buffer("feature", weight)
        self.register_buffer("fitted", torch.tensor(self.prefix_len == 0))

    def attend(self, heads: HeadsLayout) -> torch.Tensor:
        p = self.prefix_len
        q, k, v, mask = heads.q, heads.k[..., p:, :], heads.v[..., p:, :], heads.mask
        if mask is not None and p:
            _check_prefix_visible(mask[..., :p])
            mask = mask[..., p:]
        fq = ref.feature_map(q, self.feature)
        if not bool(self.fitted):
            self.fit(q, fq, heads.k[0, :, :p], heads.v[0, :, :p], k, v, mask)
        flags = {key: self.attrs[key] for key in ("scale", "causal", "fill")}
        return prefix_ntk_attention(q, k, v, fq, self.Z, self.z, mask, **flags)

    @torch.no_grad()
    def fit(self, q, fq, pk, pv, k, v, mask=None) -> None:
        """Start from the prefix, then least squares on these queries (see ``fit_prefix_state``)."""
        heads = q.shape[1]
        fk = ref.feature_map(ref.query_heads(pk[None], heads), self.feature)[0]
        start = ref.prefix_state(fk, ref.query_heads(pv[None], heads)[0])
        flags = (self.attrs["scale"], self.attrs["causal"], mask, self.attrs["fill"])
        _, lse = _exact(q, k, v, *flags)
        Z, z = ref.fit_prefix_state(q, fq, pk, pv, lse, start, scale=self.attrs["scale"])
        self.Z.copy_(Z)
        self.z.copy_(z)
        self.fitted.fill_(True)


def _check_prefix_visible(mask: torch.Tensor) -> None:
    """``Z, z`` stand for the whole prefix: a mask may not hide part of it from a query (peft
    prepends ones to the attention mask, so its prefix is always visible). Reading the mask
    over the prefix costs ``O(n·p)`` comparisons, no ``O(n·p·d)`` arithmetic."""
    visible = mask.all() if mask.dtype == torch.bool else (mask == 0).all()
    if not bool(visible):
        raise AttnoptError(
            "the attention mask hides prefix tokens from some queries, which the prefix_ntk "
            "state Z, z cannot express; optimize this model without the prefix_ntk variant"
        )


def site_module(site: AttentionSite, feature_dim: int = 0, prefix_len: int | None = None):
    """The ``PrefixNTKSite`` of a detected site (its own prefix unless ``prefix_len`` says)."""
    length = (site.prefix_len or 0) if prefix_len is None else prefix_len
    return PrefixNTKSite(
        site_attrs(site), length, site.heads, site.head_dim, site.v_shape[-1], feature_dim
    )


def refusal(site: AttentionSite) -> str | None:
    """Why a site cannot carry ``Z, z`` (None if it can), prefix or not. A mask applies to the
    input keys; over the prefix it must keep every pair (checked on each call)."""
    if site.dropout_p > 0:
        return f"dropout p={site.dropout_p} in training"
    if site.window:
        return "sliding-window mask"
    dims = (site.heads, site.head_dim, site.v_shape[-1])
    if not all(isinstance(d, int) for d in dims):
        return "needs a static head count, head dim and value dim (Z, z are per head)"
    return None


@register_pass
class PrefixNTKPass:
    name = "prefix_ntk"
    approximate = True
    knobs: dict[str, tuple] = {"feature_dim": (0, 32, 64, 128)}  # d' (0: the head dim)

    def applies(self, site: AttentionSite, target: Target) -> str | None:
        if not site.prefix_len:
            return "no input-independent prefix on the keys and values"
        return refusal(site)

    def replacement(self, site: AttentionSite, **knobs: Any) -> Replacement:
        chosen = {name: knobs.get(name, choices[0]) for name, choices in self.knobs.items()}
        module = site_module(site, chosen["feature_dim"])
        attrs = {**chosen, "prefix_len": site.prefix_len}
        return Replacement(op="attnopt::prefix_ntk", attrs=attrs, module=module)
