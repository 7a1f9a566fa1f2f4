"""Attention over keys and values that start with a learned prefix: ``[P_K; K]``, ``[P_V; V]``
(prefix tuning), the input of the prefix_ntk tests."""

from __future__ import annotations

import math

import torch
from torch import nn

HEADS, HEAD_DIM = 4, 8
WIDTH = HEADS * HEAD_DIM


class PrefixAttention(nn.Module):
    """Self-attention whose keys/values are a ``prefix``-token learned prefix joined to the
    projected input. ``causal`` masks the input part causally (every query sees the whole
    prefix); ``from_input`` makes the "prefix" a projection of the input instead (not a prefix);
    ``buffer`` keeps it as a buffer rather than a parameter."""

    def __init__(
        self,
        prefix: int = 6,
        *,
        causal: bool = False,
        from_input: bool = False,
        buffer: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.q, self.k, self.v, self.o = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        pk = torch.randn(HEADS, prefix, HEAD_DIM, generator=gen)
        pv = torch.randn(HEADS, prefix, HEAD_DIM, generator=gen)
        if buffer:
            self.register_buffer("pk", pk)
            self.register_buffer("pv", pv)
        else:
            self.pk, self.pv = nn.Parameter(pk), nn.Parameter(pv)
        self.causal, self.from_input = causal, from_input

    def split(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        b, n, _ = x.shape
        return proj(x).view(b, n, HEADS, HEAD_DIM).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.split(x, self.q), self.split(x, self.k), self.split(x, self.v)
        p = self.pk.shape[1]
        if self.from_input:
            pk, pv = k[:, :, :p], v[:, :, :p]
        else:
            pk, pv = self.pk.expand(b, -1, -1, -1), self.pv.expand(b, -1, -1, -1)
        keys, values = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        scores = q @ keys.transpose(-2, -1) / math.sqrt(HEAD_DIM)
        if self.causal:  # the prefix is always visible; input keys up to the query's own
            keep = torch.ones(n, n + p, dtype=torch.bool, device=x.device).tril(p)
            scores = scores.masked_fill(~keep, float("-inf"))
        out = scores.softmax(dim=-1) @ values
        return self.o(out.transpose(1, 2).reshape(b, n, WIDTH))


def inputs(batch: int = 2, n: int = 10, seed: int = 1) -> tuple[torch.Tensor]:
    return (torch.randn(batch, n, WIDTH, generator=torch.Generator().manual_seed(seed)),)
