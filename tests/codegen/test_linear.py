"""Linear, gated linear and hybrid attention: chunked (torch) and recurrent forms against the
token-loop / quadratic references, fp32 to 1e-5 relative, causal and not, GQA, odd lengths."""

import pytest
import torch
import torch.nn.functional as F

from attnopt.codegen.eager import linear as eager
from attnopt.codegen.reference import linear as ref


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def qkv(b=2, h=4, kv=2, n=37, dk=8, dv=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, dk, generator=gen)
    k = torch.randn(b, kv, n, dk, generator=gen)
    v = torch.randn(b, kv, n, dv, generator=gen)
    return q, k, v, gen


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [16, 64])
def test_chunked_linear_matches_recurrence(causal, chunk):
    q, k, v, _ = qkv()
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    expected = ref.linear_attention(fq, fk, v, causal=causal)
    assert rel(eager.linear_attention(fq, fk, v, causal=causal, chunk=chunk), expected) < 1e-5


@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_chunked_gla_matches_recurrence(chunk):
    q, k, v, gen = qkv(n=77)
    gate = F.logsigmoid(3 * torch.randn(k.shape, generator=gen)) / 16
    expected, state = ref.gated_linear_attention(q, k, v, gate, scale=0.3)
    out, final = eager.gated_linear_attention(q, k, v, gate, scale=0.3, chunk=chunk)
    assert rel(out, expected) < 1e-5
    assert rel(final, state) < 1e-5


def test_gla_strong_decay_stays_finite():
    """Gates near log α = −1 per token: e^{−b} over a 64-token chunk would overflow fp32."""
    q, k, v, _ = qkv(n=130)
    gate = torch.full(k.shape, -1.2)
    expected, _ = ref.gated_linear_attention(q, k, v, gate, scale=1.0)
    out, _ = eager.gated_linear_attention(q, k, v, gate, scale=1.0, chunk=64)
    assert torch.isfinite(out).all() and rel(out, expected) < 1e-5


def test_gla_state_carries_over_a_split():
    """Prefill in two pieces with the state handed over equals one prefill (decoding's contract)."""
    q, k, v, gen = qkv(n=40)
    gate = F.logsigmoid(torch.randn(k.shape, generator=gen)) / 16
    whole, _ = eager.gated_linear_attention(q, k, v, gate, scale=0.5, chunk=16)
    cut = 23
    first, state = eager.gated_linear_attention(
        q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], gate[:, :, :cut], scale=0.5, chunk=16
    )
    rest, _ = ref.gated_linear_attention(
        q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], gate[:, :, cut:], scale=0.5, state=state
    )
    assert rel(torch.cat([first, rest], dim=2), whole) < 1e-5


@pytest.mark.parametrize("n,window", [(37, 8), (64, 16), (5, 8)])
def test_hybrid_blocks_match_quadratic(n, window):
    q, k, v, gen = qkv(n=n)
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    gamma = torch.rand(q.shape[1], generator=gen) + 0.5
    expected = ref.hybrid_attention(q, k, v, fq, fk, gamma, scale=0.35, window=window)
    out = eager.hybrid_attention(q, k, v, fq, fk, gamma, scale=0.35, window=window, chunk=16)
    assert rel(out, expected) < 1e-5


def test_hybrid_with_window_covering_everything_is_softmax():
    q, k, v, _ = qkv(n=20)
    fq, fk = torch.ones(q.shape), torch.ones(k.shape)
    out = eager.hybrid_attention(q, k, v, fq, fk, torch.ones(4), scale=0.35, window=32)
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=0.35
    )
    assert rel(out, expected) < 1e-5
