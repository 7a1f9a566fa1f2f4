"""``torch.nn``'s attention modules exported by the dynamo exporter: ``nn.MultiheadAttention``
and ``nn.TransformerEncoder`` (set up for its eval fast path) are found and fused, and the
converted model matches the original in onnxruntime."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tests.onnx_helpers import check_conversion, export

pytest.importorskip("onnxscript")

B, N, C, H = 2, 8, 32, 4
DIMS = {"batch": B, "seq": N}
PER_TOKEN = {0: "batch", 1: "seq"}


def _padding() -> torch.Tensor:
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[0, -3:] = True  # padded keys of the first sequence
    return mask


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(C, H, batch_first=True)

    def forward(self, x, key_padding_mask=None):
        return self.mha(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "key_padding_mask"])
def test_dynamo_multihead_attention_fused(padded: bool, tmp_path) -> None:
    inputs = {"x": torch.randn(B, N, C)} | ({"key_padding_mask": _padding()} if padded else {})
    path = tmp_path / "mha.onnx"
    export(
        SelfAttention().eval(),
        inputs,
        path,
        dynamo=True,
        opset=18,
        dynamic=dict.fromkeys(inputs, PER_TOKEN),
    )
    report = check_conversion(path, DIMS, 1)
    assert report.sites[0].kernel == "com.microsoft.MultiHeadAttention", report.to_json()


def _encoder() -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(C, H, 2 * C, batch_first=True)
    return nn.TransformerEncoder(layer, 2).eval()


def _fast_path_calls(encoder: nn.Module, inputs: dict, monkeypatch) -> int:
    """How many layers ran ``torch._transformer_encoder_layer_fwd`` (the fast path) eagerly."""
    real, calls = torch._transformer_encoder_layer_fwd, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(torch, "_transformer_encoder_layer_fwd", counted)
        encoder(**inputs)
    return len(calls)


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "src_key_padding_mask"])
def test_dynamo_transformer_encoder_fast_path_fused(padded: bool, tmp_path, monkeypatch) -> None:
    """In eval without grad the encoder takes its fused fast path eagerly; the exporter traces
    the module's attention through ``scaled_dot_product_attention``, which is fused."""
    encoder = _encoder()
    inputs = {"src": torch.randn(B, N, C)} | (
        {"src_key_padding_mask": _padding()} if padded else {}
    )
    assert _fast_path_calls(encoder, inputs, monkeypatch) == 2
    path = tmp_path / "encoder.onnx"
    export(encoder, inputs, path, dynamo=True, opset=18, dynamic=dict.fromkeys(inputs, PER_TOKEN))
    report = check_conversion(path, DIMS, 2)
    assert {s.kernel for s in report.sites} == {"com.microsoft.MultiHeadAttention"}
