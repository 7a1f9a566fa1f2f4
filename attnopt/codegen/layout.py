"""Bring a site's q, k, v and mask from whatever layout the model used to the kernels' 4-D one.

A site hands the op ``q (*Lq, N, D)``, ``k (*Lk, M, D)``, ``v (*Lk, M, Dv)`` with matmul-style
broadcasting of the leading dims, and a mask broadcastable to ``(*L, N, M)``. ``kv_group > 1``
means the last leading dim of k/v holds ``H / kv_group`` heads (GQA without repeating K/V).
Kernels see ``(B, H, N, D)`` and ``(B, Hkv, M, D)``: all leading dims but the last fold into B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HeadsLayout:
    """The folded 4-D views of one call and the shape to give the output back in."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    out_shape: tuple


def _pad_left(shape, rank: int) -> list:
    return [1] * (rank - len(shape)) + list(shape)


def leading_shape(q_shape, k_shape, kv_group: int) -> list:
    """The broadcast leading dims ``L`` of the scores ``(*L, N, M)``."""
    rank = max(len(q_shape), len(k_shape)) - 2
    lq = _pad_left(q_shape[:-2], rank)
    lk = _pad_left(k_shape[:-2], rank)
    if kv_group > 1:
        lk[-1] = lk[-1] * kv_group
    if all(type(dim) is int for dim in (*lq, *lk)) and all(
        a == b or 1 in (a, b) for a, b in zip(lq, lk, strict=True)
    ):  # eager calls (every decode step): torch.broadcast_shapes costs ~25 µs there
        return [b if a == 1 else a for a, b in zip(lq, lk, strict=True)]
    return list(torch.broadcast_shapes(tuple(lq), tuple(lk)))  # symbolic shapes, and errors


def to_heads(q, k, v, mask, kv_group: int) -> HeadsLayout:
    """Fold the leading dims to ``(B, H)``; views where the layout allows, copies only if not."""
    lead = leading_shape(q.shape, k.shape, kv_group)
    out_shape = (*lead, q.shape[-2], v.shape[-1])
    if len(lead) == 0:
        lead_q, lead_k = [1, 1], [1, 1]
    else:
        heads = lead[-1]
        batch = math.prod(lead[:-1])
        lead_q = [batch, heads]
        k_heads = _pad_left(k.shape[:-2], len(lead))[-1]
        lead_k = [batch, k_heads]
    k_lead = [*lead[:-1], lead_k[1]] if lead else []
    q4, k4, v4 = (
        # already (B, H, ...): no expand/reshape (two dispatcher calls each, every decode step)
        t
        if list(t.shape[:-2]) == fold
        else t.expand(*full, *t.shape[-2:]).reshape(*fold, *t.shape[-2:])
        for t, full, fold in ((q, lead, lead_q), (k, k_lead, lead_k), (v, k_lead, lead_k))
    )
    mask4 = None
    if mask is not None:
        scores_shape = (*lead, q.shape[-2], k.shape[-2])
        if len(lead) == 2:
            mask4 = mask if mask.shape == scores_shape else mask.expand(scores_shape)
        else:
            mask4 = mask.expand(scores_shape).reshape(*lead_q, *scores_shape[-2:])
    return HeadsLayout(q4, k4, v4, mask4, out_shape)
