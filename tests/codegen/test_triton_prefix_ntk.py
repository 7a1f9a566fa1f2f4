"""The Triton path of prefix_ntk (exact kernel, then the prefix terms) against the oracle; under
``TRITON_INTERPRET=1`` without CUDA (see ``test_triton_exact.py`` for the import order)."""

import os

import torch

if not torch.cuda.is_available():  # read when triton is first imported, so before attnopt is
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from attnopt.codegen.reference import prefix_ntk as ref
from attnopt.codegen.triton import exact as triton_exact
from attnopt.codegen.triton import prefix_ntk as triton_ntk

DEVICES = [
    pytest.param("cpu", id="interp"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_triton_prefix_ntk_matches_the_oracle(device, causal):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if device == "cpu" and not triton_exact.INTERPRETED:
        pytest.skip("triton was imported without TRITON_INTERPRET=1: it compiles for CUDA only")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 16, generator=gen) for _ in range(3))
    fq = ref.feature_map(q)
    Z, z = torch.rand(2, 16, 16, generator=gen), torch.rand(2, 16, generator=gen)
    expected = ref.prefix_ntk_attention(q, k, v, fq, Z, z, scale=0.25, causal=causal)
    args = (t.to(device) for t in (q, k, v, fq, Z, z))
    got = triton_ntk.prefix_ntk_attention(*args, scale=0.25, causal=causal)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=1e-5)
