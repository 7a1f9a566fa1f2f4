"""Detection of an input-independent prefix joined to the keys and values (``prefix_len``)."""

import pytest
import torch

import attnopt
from tests.prefix_forms import PrefixAttention, inputs


@pytest.mark.parametrize(
    "kwargs,prefix_len,mask",
    [
        ({}, 6, "none"),
        ({"causal": True}, 6, "causal"),
        ({"buffer": True, "prefix": 3}, 3, "none"),
        ({"from_input": True}, None, "none"),  # joined keys, but computed from the input
    ],
)
def test_prefix_found(kwargs, prefix_len, mask):
    report = attnopt.inspect(PrefixAttention(**kwargs).eval(), inputs())
    (site,) = report.sites
    assert site.mask == mask
    assert ("prefix=" in site.signature) == (prefix_len is not None)
    if prefix_len is not None:
        assert f"prefix={prefix_len}" in site.signature


def test_prefix_len_on_the_site():
    from attnopt.api import _detect
    from attnopt.frontends.export.capture import Inputs

    _, _, found = _detect(PrefixAttention(prefix=5, causal=True).eval(), Inputs.of(inputs()))
    (site,) = found.sites
    assert site.prefix_len == 5 and site.causal and site.kv_len - site.q_len == 5


class _FreshCache(torch.nn.Module):
    """Keys joined to an empty 1-D tensor, as a fresh Hugging Face cache does (legacy cat)."""

    def forward(self, q, k, v):
        empty = torch.tensor([], dtype=k.dtype)
        k, v = torch.cat([empty, k], dim=-2), torch.cat([empty, v], dim=-2)
        return (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def test_empty_joined_tensor_is_no_prefix():
    qkv = [torch.randn(2, 4, 5, 8) for _ in range(3)]
    (site,) = attnopt.inspect(_FreshCache(), tuple(qkv)).sites
    assert "prefix=" not in site.signature
