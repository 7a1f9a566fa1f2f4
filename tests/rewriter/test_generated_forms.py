"""Hypothesis-generated attention forms: scale placement × scale source × softmax spelling ×
cast chain × mask construction × layout × GQA ratio. Each must yield exactly one rewritten
site and the same outputs as the original."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnopt

C, H, D = 32, 4, 8


def _scale(source: str, q: torch.Tensor, power: float = -0.5):
    """``d ** power`` spelled as a constant, an expression of a size, or a 0-d tensor."""
    if source == "size":
        return q.shape[-1] ** power
    if source == "tensor":
        return torch.full([], math.sqrt(q.size(-1)) ** (2 * power))
    return D**power


def _softmax(spelling: str, scores: torch.Tensor) -> torch.Tensor:
    if spelling == "safe":
        return torch.ops.aten._safe_softmax(scores, -1)
    if spelling == "log_exp":
        return F.log_softmax(scores, -1).exp()
    if spelling == "shifted":
        return (scores - scores.amax(-1, keepdim=True).detach()).softmax(-1)
    return scores.softmax(-1)


def _cast_back(chain: str, probs: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if chain == "to":
        return probs.to(like.dtype)
    if chain == "type_as":
        return probs.type_as(like)
    if chain == "type":
        return probs.type(like.dtype)
    return probs


class Generated(nn.Module):
    def __init__(self, scale_at, mask, layout, cast, group, source="const", spelling="softmax"):
        super().__init__()
        self.scale_at, self.mask, self.layout, self.cast, self.group = (
            scale_at,
            mask,
            layout,
            cast,
            group,
        )
        self.source, self.spelling = source, spelling
        self.q = nn.Linear(C, H * D)
        self.kv = nn.Linear(C, 2 * (H // group) * D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        hk = H // self.group
        q = self.q(x).view(b, n, H, D)
        k, v = self.kv(x).view(b, n, 2, hk, D).unbind(2)
        if self.group > 1:
            k, v = (t.repeat_interleave(self.group, dim=2) for t in (k, v))
        scale = _scale(self.source, q)
        if self.scale_at == "q":
            q = q * scale
        if self.layout == "bshd":
            scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1)
            vv = v.transpose(1, 2)
        elif self.layout == "bmm":
            q3 = q.transpose(1, 2).reshape(b * H, n, D)
            k3 = k.transpose(1, 2).reshape(b * H, n, D)
            scores = torch.bmm(q3, k3.transpose(1, 2))
            vv = v.transpose(1, 2).reshape(b * H, n, D)
        else:
            scores = torch.einsum("bnhd,bmhd->bhnm", q, k)
            vv = v.transpose(1, 2)
        if self.scale_at == "mul":
            scores = scores * scale
        elif self.scale_at == "div":
            scores = scores / _scale(self.source, q, 0.5)
        if self.cast != "none":
            scores = scores.float()
        if self.mask == "causal":
            keep = torch.ones(n, n, dtype=torch.bool).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        elif self.mask == "additive":
            pos = torch.arange(n)
            scores = scores + (pos[None, :] - pos[:, None]).abs().float() * -0.1
        elif self.mask == "boolean":
            keep = (torch.arange(n)[None, :] % 3) != 1
            scores = torch.where(keep, scores, torch.finfo(scores.dtype).min)
        elif self.mask == "expand_as":
            dropped = (torch.arange(n) % 3 == 1).view(1, 1, n).expand_as(scores)
            scores = scores.masked_fill(dropped, float("-inf"))
        elif self.mask == "inplace":
            scores.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        probs = _cast_back(self.cast, _softmax(self.spelling, scores), x)
        out = (probs @ vv).view(b, H, n, D)
        return out.transpose(1, 2).reshape(b, n, H * D)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scale_at=st.sampled_from(["mul", "div", "q", "none"]),
    mask=st.sampled_from(["none", "causal", "additive", "boolean", "expand_as", "inplace"]),
    layout=st.sampled_from(["bshd", "bmm", "einsum"]),
    cast=st.sampled_from(["none", "to", "type_as", "type"]),
    group=st.sampled_from([1, 2, 4]),
    source=st.sampled_from(["const", "size", "tensor"]),
    spelling=st.sampled_from(["softmax", "safe", "log_exp", "shifted"]),
    batch=st.integers(1, 3),
    seq=st.integers(2, 9),
)
def test_generated_form(scale_at, mask, layout, cast, group, source, spelling, batch, seq) -> None:
    model = Generated(scale_at, mask, layout, cast, group, source, spelling).eval()
    x = torch.randn(batch, seq, C)
    optimized = attnopt.optimize(model, (x,))
    report = optimized.attnopt_report
    assert len(report.rewritten) == 1, report.to_json()
    if mask in ("causal", "inplace"):
        assert report.sites[0].mask == "causal"
    other = torch.randn(batch + 1, seq + 3, C)
    with torch.no_grad():
        for inputs in (x, other):
            torch.testing.assert_close(optimized(inputs), model(inputs), atol=1e-5, rtol=1e-5)
