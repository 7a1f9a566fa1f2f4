"""TensorAttention and to_tensor_attention: a converted standard attention (K2 = V2 = 1) gives
the same outputs (MultiheadAttention, and a detected site with its causal flag and GQA), trains,
and bad input is refused with the reason."""

import pytest
import torch
from torch import nn

import attnopt
from attnopt.api import _detect
from attnopt.codegen.reference import tensor as ref
from attnopt.errors import UnsupportedModelError
from attnopt.frontends.export.capture import Inputs


@pytest.mark.parametrize("causal", [False, True])
def test_multihead_converts_exactly(causal):
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 9, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(9) if causal else None
    expected, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    layer = attnopt.to_tensor_attention(mha, causal=causal)
    assert isinstance(layer, attnopt.TensorAttention)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_layer_computes_tensor_attention_and_trains():
    layer = attnopt.TensorAttention(8, 2, causal=True, window=3)
    x = torch.randn(1, 7, 8)
    split = [p(x).unflatten(-1, (2, 4)).transpose(1, 2) for p in (layer.q, layer.k1, layer.k2)]
    values = [p(x).unflatten(-1, (2, 4)).transpose(1, 2) for p in (layer.v1, layer.v2)]
    out = ref.tensor_attention(*split, *values, scale=0.5, causal=True, window=3)
    expected = layer.o(out.transpose(1, 2).flatten(-2))
    got = layer(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    got.square().mean().backward()
    assert layer.k2.weight.grad is not None and layer.k2.weight.grad.abs().sum() > 0


class _Gqa(nn.Module):
    """Causal self-attention with 4 query heads reading 2 kv heads of width 4."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 16 + 8 + 8)

    def heads(self, x):
        q, k, v = self.qkv(x).split([16, 8, 8], dim=-1)
        q, k, v = (t.unflatten(-1, (-1, 4)).transpose(1, 2) for t in (q, k, v))
        return q, k, v

    def forward(self, x):
        q, k, v = self.heads(x)
        k, v = (t.repeat_interleave(2, dim=1) for t in (k, v))
        scores = q @ k.transpose(-2, -1) * 0.5
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v


def test_detected_site_converts_exactly():
    model, x = _Gqa(), torch.randn(2, 6, 8)
    _, _, found = _detect(model, Inputs.of((x,)))
    (site,) = found.sites
    assert site.causal and site.kv_group == 2
    module = attnopt.to_tensor_attention(site)
    with torch.no_grad():
        got = module(*model.heads(x), None)
        torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)
    assert {n for n, _ in module.named_parameters()} >= {"k2_weight", "v2_weight"}


def test_refuses_other_modules():
    with pytest.raises(UnsupportedModelError, match="AttentionSite or an nn.MultiheadAttention"):
        attnopt.to_tensor_attention(nn.Linear(2, 2))
