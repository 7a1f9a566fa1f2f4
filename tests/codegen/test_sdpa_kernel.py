"""torch's SDPA behind the kernel contract: it agrees with the reference on every call it
accepts, and declines (with a reason) the ones it cannot express exactly."""

from __future__ import annotations

import pytest
import torch

from attnopt.codegen import sdpa
from attnopt.codegen.reference.exact import exact_attention

SHAPES = [(2, 4, 4, 9, 9, 16), (1, 4, 2, 7, 13, 8), (2, 6, 1, 5, 5, 32), (2, 4, 2, 1, 11, 16)]


@pytest.mark.parametrize("b,h,hk,n,m,d", SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "causal", "additive", "dead_rows"])
def test_matches_reference(b, h, hk, n, m, d, mask_kind) -> None:
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, hk, m, d), torch.randn(b, hk, m, d)
    causal = mask_kind == "causal"
    mask = None
    if mask_kind in ("additive", "dead_rows"):
        mask = torch.randn(b, 1, n, m).expand(b, h, n, m)
        if mask_kind == "dead_rows":
            mask = mask.clone()
            mask[:, :, 0] = float("-inf")
    reason = sdpa.supports(q, k, v, mask, causal, 0)
    if causal and 1 < n != m:  # one query sees every key: causal or not, SDPA runs it
        assert reason is not None and "n != m" in reason
        return
    assert reason is None
    got, _ = sdpa.forward(q, k, v, mask, scale=0.3, causal=causal, window=0, fill=float("-inf"))
    want, _ = exact_attention(q, k, v, mask, scale=0.3, causal=causal)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_declines_what_it_cannot_express() -> None:
    q = k = v = torch.randn(1, 2, 4, 8)
    assert "window" in sdpa.supports(q, k, v, None, True, 3)
    assert "bool" in sdpa.supports(q, k, v, torch.ones(1, 2, 4, 4, dtype=torch.bool), False, 0)
    half = q.half()
    assert sdpa.supports(half, half, half, None, False, 0) is not None


@pytest.mark.parametrize("mask_kind", ["none", "padding", "expanded"])
def test_gqa_decode_reads_each_kv_head_once(monkeypatch, mask_kind) -> None:
    """One query per head: SDPA gets the group's queries against the kv head, no enable_gqa."""
    b, h, hk, m, d = 2, 8, 2, 13, 16
    q, k, v = torch.randn(b, h, 1, d), torch.randn(b, hk, m, d), torch.randn(b, hk, m, d)
    mask = None
    if mask_kind != "none":
        mask = torch.zeros(b, 1, 1, m)
        mask[0, ..., :5] = float("-inf")  # a left-padded row
        if mask_kind == "expanded":
            mask = mask.expand(b, h, 1, m)
    seen = []
    real = sdpa.F.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        seen.append((tuple(query.shape), kwargs.get("enable_gqa", False)))
        return real(query, *args, **kwargs)

    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", spy)
    got, _ = sdpa.forward(q, k, v, mask, scale=0.25, causal=True, window=0, fill=float("-inf"))
    want, _ = exact_attention(q, k, v, mask, scale=0.25, causal=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert seen == [((b, hk, h // hk, d), False)]


def test_gqa_decode_with_per_head_mask_is_not_folded() -> None:
    b, h, hk, m, d = 1, 4, 2, 9, 8
    q, k, v = torch.randn(b, h, 1, d), torch.randn(b, hk, m, d), torch.randn(b, hk, m, d)
    mask = torch.randn(b, h, 1, m)  # differs per query head: the group cannot share a row
    got, _ = sdpa.forward(q, k, v, mask, scale=0.3, causal=False, window=0, fill=float("-inf"))
    want, _ = exact_attention(q, k, v, mask, scale=0.3, causal=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
