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
