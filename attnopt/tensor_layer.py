"""Tensor (higher-order) attention as a layer to build models with, and the exact conversion of a
standard attention into one as a fine-tuning start (ALGORITHMS.md §4).

With ``K2 = 1`` and ``V2 = 1`` every pair ``(j, l)`` scores ``⟨q, k1_j⟩`` and carries ``v1_j``, so
the pair softmax spreads each key's weight evenly over the ``l`` it is paired with and the output
is ``softmax(s·QK1ᵀ)V1``, causal and windowed alike (the same ``l`` are kept for every ``j``).
The converted layers hold ``K2, V2`` as projections with weight 0 and bias 1: exact at the start,
trainable from there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnopt.codegen.layout import HeadsLayout
from attnopt.codegen.tensor_ops import tensor_forward
from attnopt.errors import UnsupportedModelError
from attnopt.passes.base import SiteModule, site_attrs
from attnopt.rewriter.site import AttentionSite


class TensorAttention(nn.Module):
    """Multi-head tensor attention: projections ``q, k1, k2, v1, v2, o`` of width ``embed_dim``.

    ``forward(x, context=None)``: queries from ``x (B, N, E)``, keys and values from ``context``
    (``x`` when None); ``causal`` and ``window`` restrict both keys of a pair (the contract of
    ``codegen/reference/tensor.py``). Runs the fused kernel: memory ``O(N·E)``.
    """

    def __init__(
        self, embed_dim: int, num_heads: int, *, causal: bool = False, window: int = 0
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.num_heads, self.causal, self.window = num_heads, causal, window
        self.head_dim = embed_dim // num_heads
        self.q, self.k1, self.k2, self.v1, self.v2, self.o = (
            nn.Linear(embed_dim, embed_dim) for _ in range(6)
        )

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k1, k2, v1, v2 = (
            self._split(proj(src))
            for proj, src in (
                (self.q, x),
                (self.k1, context),
                (self.k2, context),
                (self.v1, context),
                (self.v2, context),
            )
        )
        out = tensor_forward(
            q, k1, k2, v1, v2, scale=self.head_dim**-0.5, causal=self.causal, window=self.window
        )
        return self.o(out.transpose(1, 2).flatten(-2))


def _from_multihead(mha: nn.MultiheadAttention, causal: bool, window: int) -> TensorAttention:
    if not mha.batch_first or not mha._qkv_same_embed_dim or mha.bias_k is not None:
        raise UnsupportedModelError(
            "to_tensor_attention converts nn.MultiheadAttention with batch_first=True, one "
            "embed dim for q, k and v, and no add_bias_kv"
        )
    layer = TensorAttention(mha.embed_dim, mha.num_heads, causal=causal, window=window)
    layer = layer.to(mha.in_proj_weight.device, mha.in_proj_weight.dtype)
    weights = mha.in_proj_weight.detach().chunk(3)
    biases = (
        mha.in_proj_bias.detach().chunk(3)
        if mha.in_proj_bias is not None
        else [torch.zeros_like(w[:, 0]) for w in weights]
    )
    with torch.no_grad():
        for proj, weight, bias in zip((layer.q, layer.k1, layer.v1), weights, biases, strict=True):
            proj.weight.copy_(weight)
            proj.bias.copy_(bias)
        for proj in (layer.k2, layer.v2):
            proj.weight.zero_()
            proj.bias.fill_(1.0)
        layer.o.weight.copy_(mha.out_proj.weight)
        if mha.out_proj.bias is not None:
            layer.o.bias.copy_(mha.out_proj.bias)
        else:
            layer.o.bias.zero_()
    return layer


class TensorSite(SiteModule):
    """A detected attention site as tensor attention over its own q, k, v: ``K2 = k·W2 + b2``
    and ``V2 = v·U2 + c2`` per kv head, starting at ``W2 = U2 = 0``, ``b2 = c2 = 1`` (exact)."""

    def __init__(self, attrs: dict, kv_heads: int, head_dim: int, value_dim: int) -> None:
        super().__init__(attrs)
        self.k2_weight = nn.Parameter(torch.zeros(kv_heads, head_dim, head_dim))
        self.k2_bias = nn.Parameter(torch.ones(kv_heads, 1, head_dim))
        self.v2_weight = nn.Parameter(torch.zeros(kv_heads, value_dim, value_dim))
        self.v2_bias = nn.Parameter(torch.ones(kv_heads, 1, value_dim))

    def attend(self, heads: HeadsLayout) -> torch.Tensor:
        k, v = heads.k.float(), heads.v.float()
        k2 = torch.einsum("bhmd,hde->bhme", k, self.k2_weight) + self.k2_bias
        v2 = torch.einsum("bhmd,hde->bhme", v, self.v2_weight) + self.v2_bias
        group = self.attrs["kv_group"]
        if group > 1:
            k, k2, v, v2 = (t.repeat_interleave(group, dim=1) for t in (k, k2, v, v2))
        flags = {key: self.attrs[key] for key in ("scale", "causal", "window")}
        return tensor_forward(heads.q.float(), k, k2, v, v2, **flags)


def _from_site(site: AttentionSite) -> TensorSite:
    if site.masks:
        raise UnsupportedModelError(
            f"the site at {site.location} has a {site.mask_kind} mask; to_tensor_attention "
            "converts unmasked, causal or sliding-window attention only"
        )
    sizes = (site.kv_heads, site.head_dim, site.v_shape[-1])
    if not all(isinstance(s, int) for s in sizes):
        raise UnsupportedModelError(
            f"the site at {site.location} has symbolic heads or head dims {sizes}; capture it "
            "with static shapes to convert it"
        )
    return TensorSite(site_attrs(site), *sizes)


def to_tensor_attention(
    site_or_module: AttentionSite | nn.MultiheadAttention, *, causal: bool = False, window: int = 0
) -> Any:
    """The exactly equivalent tensor-attention layer of a standard attention (``K2 = V2 = 1``).

    An ``nn.MultiheadAttention`` (``batch_first``) becomes a ``TensorAttention`` computing what
    ``mha(x, x, x)`` does (``causal``/``window`` as the mask it is called with); an
    ``AttentionSite`` (from detection) becomes a ``TensorSite`` taking the site's ``(q, k, v,
    mask)`` and keeping its causal and window flags.
    """
    if isinstance(site_or_module, AttentionSite):
        return _from_site(site_or_module)
    if isinstance(site_or_module, nn.MultiheadAttention):
        return _from_multihead(site_or_module, causal, window)
    raise UnsupportedModelError(
        f"to_tensor_attention takes an AttentionSite or an nn.MultiheadAttention, not "
        f"{type(site_or_module).__name__}"
    )
