"""conv_basis kernels against exact attention and the reference: Toeplitz heads recover k = 1,
sums of shifted Toeplitz blocks recover their k, and the error bound of ALGORITHMS.md §2."""

import math

import pytest
import torch

from attnopt.codegen.eager.conv_basis import conv_basis_attention, fast_len, recover_segments
from attnopt.codegen.reference.conv_basis import (
    conv_basis_attention_reference,
    recover_segments_reference,
)
from attnopt.codegen.reference.exact import exact_attention


def alibi(heads: int, n: int) -> torch.Tensor:
    """``−slope_h·(i − j)`` below the diagonal, −inf above: ALiBi's bias with the causal mask."""
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / heads) for h in range(heads)])
    rel = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).float()
    return (-slopes[:, None, None] * rel).masked_fill(rel < 0, float("-inf"))[None]


def toeplitz_sum(starts: list[int], n: int, gen: torch.Generator) -> torch.Tensor:
    """``Σ_t conv(b_t, n − c_t)``: a causal score matrix with exactly these segment starts."""
    h = torch.zeros(n, n)
    for c in starts:
        b = torch.randn(n - c, generator=gen)
        for j in range(c, n):
            h[j:, j] += b[: n - j]
    return h.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def exact(q, k, v, mask, scale):
    return exact_attention(q, k, v, mask, scale=scale, causal=True)[0]


@pytest.mark.parametrize("n", [1, 7, 33, 100, 257])
@pytest.mark.parametrize("bias_heads", [False, True])
def test_toeplitz_heads_recover_one_segment_and_match_exact(n, bias_heads):
    gen = torch.Generator().manual_seed(n)
    heads = 3
    q = torch.zeros(2, heads, n, 8)  # bias-only scores
    k, v = torch.randn(2, heads, n, 8, generator=gen), torch.randn(2, heads, n, 5, generator=gen)
    mask = alibi(heads, n)
    want = exact(q, k, v, mask, 0.5)
    flags = torch.ones(heads, dtype=torch.bool) if bias_heads else None
    got, ks = conv_basis_attention(q, k, v, mask, scale=0.5, tau=1e-4, k_max=4, bias_heads=flags)
    assert ks.eq(1).all()
    assert rel_max(got, want) < 1e-5
    if n <= 33:
        ref, ref_ks = conv_basis_attention_reference(q, k, v, mask, scale=0.5, tau=1e-4, k_max=4)
        assert ref_ks.eq(1).all() and rel_max(ref, want) < 1e-5


def test_relative_bias_head_with_gqa():
    """A T5-style learned relative bias (any function of i − j) and two query heads per K/V."""
    n, gen = 45, torch.Generator().manual_seed(3)
    table = torch.randn(n, generator=gen)
    rel = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    mask = table[rel.clamp(min=0)].masked_fill(rel < 0, float("-inf"))
    q = torch.zeros(1, 4, n, 8)
    k, v = torch.randn(1, 2, n, 8, generator=gen), torch.randn(1, 2, n, 6, generator=gen)
    got, ks = conv_basis_attention(q, k, v, mask, scale=1.0, tau=1e-5, k_max=2)
    assert ks.eq(1).all()
    assert rel_max(got, exact(q, k, v, mask, 1.0)) < 1e-5


@pytest.mark.parametrize("starts", [[0], [0, 5], [0, 3, 17, 18], [0, 1, 2, 30, 40, 58]])
def test_shifted_toeplitz_sum_recovers_its_segments(starts):
    n, gen = 61, torch.Generator().manual_seed(len(starts))
    h = toeplitz_sum(starts, n, gen)
    q, k = torch.zeros(n, 4), torch.zeros(n, 4)
    assert recover_segments_reference(q, k, h, 1.0, 1e-4, 8) == starts
    assert recover_segments(q, k, h, 1.0, 1e-4, 8) == starts
    v = torch.randn(1, 1, n, 3, generator=gen)
    got, ks = conv_basis_attention(q[None, None], k[None, None], v, h, scale=1.0, tau=1e-4, k_max=8)
    assert ks.item() == len(starts)
    assert rel_max(got, exact(q[None, None], k[None, None], v, h, 1.0)) < 1e-5


def test_cap_stops_the_search_and_the_head_stays_exact():
    n, gen = 40, torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, n, 16, generator=gen), torch.randn(1, 2, n, 16, generator=gen)
    v = torch.randn(1, 2, n, 4, generator=gen)
    got, ks = conv_basis_attention(q, k, v, None, scale=1.0, tau=1e-3, k_max=3)
    assert ks.eq(4).all()  # k_max + 1: not representable
    assert rel_max(got, exact(q, k, v, None, 1.0)) < 1e-5
    ref, ref_ks = conv_basis_attention_reference(q, k, v, None, scale=1.0, tau=1e-3, k_max=3)
    assert torch.equal(ks, ref_ks) and rel_max(ref, exact(q, k, v, None, 1.0)) < 1e-5


def deviation(h: torch.Tensor, starts: list[int]) -> float:
    """``ε``: the largest gap between a causal score and its segment's first column."""
    n, worst = h.shape[0], 0.0
    bounds = [*starts, n]
    for t in range(len(starts)):
        first = h[bounds[t] :, bounds[t]]
        for j in range(bounds[t], bounds[t + 1]):
            worst = max(worst, float((h[j:, j] - first[: n - j]).abs().max()))
    return worst


@pytest.mark.parametrize("seed", range(4))
def test_error_bound_holds(seed):
    n, gen = 48, torch.Generator().manual_seed(seed)
    starts = [0, 11, 30][: seed % 3 + 1]
    eps = [0.01, 0.05, 0.2, 0.5][seed]
    h = toeplitz_sum(starts, n, gen)
    h = h + (torch.rand(n, n, generator=gen) * 2 - 1) * eps
    q, k = torch.zeros(1, 1, n, 4), torch.zeros(1, 1, n, 4)
    v = torch.randn(1, 1, n, 7, generator=gen)
    want = exact(q, k, v, h, 1.0)
    for attend, find in (
        (conv_basis_attention, recover_segments),
        (conv_basis_attention_reference, recover_segments_reference),
    ):
        got, ks = attend(q, k, v, h, scale=1.0, tau=2.5 * eps, k_max=8)
        found = find(q[0, 0], k[0, 0], h, 1.0, 2.5 * eps, 8)
        assert ks.item() == len(found) <= 8
        bound = (math.exp(2 * deviation(h, found)) - 1) * float(v.abs().max())
        assert 0 < float((got - want).abs().max()) <= bound


def test_fast_len_is_smooth_and_minimal():
    for n in (1, 7, 97, 1000, 4097):
        size = fast_len(n)
        rest = size
        for p in (2, 3, 5):
            while rest % p == 0:
                rest //= p
        assert rest == 1 and size >= n
        assert all(not _smooth(m) for m in range(n, size))


def _smooth(m: int) -> bool:
    for p in (2, 3, 5):
        while m % p == 0:
            m //= p
    return m == 1
