"""Hypothesis-generated attention forms: scale placement × mask kind × layout × casts × GQA
ratio. Each must yield exactly one rewritten site and the same outputs as the original."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnopt

C, H, D = 32, 4, 8
SCALE = 1.0 / math.sqrt(D)


class Generated(nn.Module):
    def __init__(self, scale_at: str, mask: str, layout: str, cast: bool, group: int):
        super().__init__()
        self.scale_at, self.mask, self.layout, self.cast, self.group = (
            scale_at,
            mask,
            layout,
            cast,
            group,
        )
        self.q = nn.Linear(C, H * D)
        self.kv = nn.Linear(C, 2 * (H // group) * D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        hk = H // self.group
        q = self.q(x).view(b, n, H, D)
        k, v = self.kv(x).view(b, n, 2, hk, D).unbind(2)
        if self.group > 1:
            k, v = (t.repeat_interleave(self.group, dim=2) for t in (k, v))
        if self.scale_at == "q":
            q = q * SCALE
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
            scores = scores * SCALE
        elif self.scale_at == "div":
            scores = scores / math.sqrt(D)
        if self.cast:
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
        probs = scores.softmax(-1)
        if self.cast:
            probs = probs.to(x.dtype)
        out = (probs @ vv).view(b, H, n, D)
        return out.transpose(1, 2).reshape(b, n, H * D)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scale_at=st.sampled_from(["mul", "div", "q", "none"]),
    mask=st.sampled_from(["none", "causal", "additive", "boolean"]),
    layout=st.sampled_from(["bshd", "bmm", "einsum"]),
    cast=st.booleans(),
    group=st.sampled_from([1, 2, 4]),
    batch=st.integers(1, 3),
    seq=st.integers(2, 9),
)
def test_generated_form(scale_at, mask, layout, cast, group, batch, seq) -> None:
    model = Generated(scale_at, mask, layout, cast, group).eval()
    x = torch.randn(batch, seq, C)
    optimized = attnopt.optimize(model, (x,))
    report = optimized.attnopt_report
    assert len(report.rewritten) == 1, report.to_json()
    if mask == "causal":
        assert report.sites[0].mask == "causal"
    other = torch.randn(batch + 1, seq + 3, C)
    with torch.no_grad():
        for inputs in (x, other):
            torch.testing.assert_close(optimized(inputs), model(inputs), atol=1e-5, rtol=1e-5)
