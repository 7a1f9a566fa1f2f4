"""The Triton conv_basis kernels (merge of a segment into the rows, final division) against the
torch path (interpreter on CPU, tiny sizes); on CUDA, the whole fast path against exact."""

import pytest
import torch

from attnopt.codegen.eager.conv_basis import _convolve, conv_basis_attention, conv_basis_heads
from attnopt.codegen.reference.exact import exact_attention
from attnopt.codegen.triton import exact as triton_exact

INTERPRETED = triton_exact.INTERPRETED


def segments(g, n, width, starts, gen):
    firsts = [torch.randn(g, n - c, generator=gen) * 0.5 for c in starts]  # fp32 FFTs (range < 6)
    values = torch.randn(g, n, width, generator=gen)
    values[..., -1] = 1.0
    return firsts, values


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 (CPU tensors)")
@pytest.mark.parametrize("starts", [[0], [0, 3, 11], [0, 1, 2, 16]])
def test_merge_and_normalise_match_the_torch_path(starts):
    from attnopt.codegen.triton.conv_basis import merge, normalise

    g, n, width, gen = 3, 19, 6, torch.Generator().manual_seed(len(starts))
    firsts, values = segments(g, n, width, starts, gen)
    diagonal = torch.zeros(g, n)
    want = conv_basis_heads(firsts, starts, values, diagonal)
    out, top = torch.empty(g, n, width), torch.empty(g, n)
    bounds = [*starts, n]
    for t, first in enumerate(firsts):
        c, e = bounds[t], bounds[t + 1]
        peak = first.amax(-1)
        part = _convolve(torch.exp(first - peak[:, None]), values[:, c:e], n - c, False)
        merge(out, top, part, peak, c, first=t == 0)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(normalise(out), want[..., :-1] / want[..., -1:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fast_path_matches_exact():
    n, gen = 333, torch.Generator().manual_seed(0)
    pos = torch.arange(n)
    bias = -torch.tensor([0.5, 0.05]).view(2, 1, 1) * (pos[:, None] - pos[None, :]).float()
    q = torch.zeros(1, 2, n, 16)
    k, v = torch.randn(1, 2, n, 16, generator=gen), torch.randn(1, 2, n, 8, generator=gen)
    want = exact_attention(q, k, v, bias, scale=0.25, causal=True)[0]
    got, ks = conv_basis_attention(
        q.cuda(), k.cuda(), v.cuda(), bias.cuda(), scale=0.25, tau=1e-4, k_max=4
    )
    assert ks.eq(1).all()
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
