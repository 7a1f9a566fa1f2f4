"""The Triton path of prefix_ntk (exact kernel, then the prefix terms) against the oracle; under
``TRITON_INTERPRET=1`` without CUDA (see ``test_triton_exact.py`` for the import order)."""

import os

import torch

if not torch.cuda.is_available():  # read when triton is first imported, so before attnopt is
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from attnopt.codegen.eager import prefix_ntk as eager
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


def _masks(kind: str, n: int, m: int, gen) -> torch.Tensor | None:
    if kind == "bool":  # the first query row sees no input key: the prefix alone
        keep = torch.rand(1, 1, n, m, generator=gen) > 0.3
        keep[..., 0, :] = False
        return keep
    return torch.randn(1, 4, n, m, generator=gen)  # additive, per query head


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_epilogue_with_masks_gqa_and_other_feature_dims(device, mask_kind):
    """Masked rows (scores in natural units), an empty row, two query heads per kv head,
    D' = 24 and Dv = 8 (not the head dim), large scores (row max far above 0)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if device == "cpu" and not triton_exact.INTERPRETED:
        pytest.skip("triton was imported without TRITON_INTERPRET=1: it compiles for CUDA only")
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 11, 16, generator=gen) * 4
    k, v = torch.randn(2, 2, 13, 16, generator=gen), torch.randn(2, 2, 13, 8, generator=gen)
    weight = ref.feature_weight(4, 16, 24)
    fq = ref.feature_map(q, weight)
    Z, z = torch.rand(4, 24, 8, generator=gen) * 50, torch.rand(4, 24, generator=gen) * 50
    mask = _masks(mask_kind, 11, 13, gen)
    expected = eager.prefix_ntk_attention(q, k, v, fq, Z, z, mask, scale=0.25)
    args = (t.to(device) for t in (q, k, v, fq, Z, z, mask))
    got = triton_ntk.prefix_ntk_attention(*args, scale=0.25)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=1e-5)
    if mask_kind == "bool":  # the empty row: φᵀZ / φᵀz
        first = fq[:, :, 0]
        alone = (
            torch.einsum("bhf,hfe->bhe", first, Z) / torch.einsum("bhf,hf->bh", first, z)[..., None]
        )
        torch.testing.assert_close(got[:, :, 0].cpu(), alone, atol=1e-5, rtol=1e-5)
