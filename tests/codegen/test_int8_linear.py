"""LLM.int8()-style linear (codegen/eager/int8_linear.py): within the error its quantization
steps allow, and outlier feature columns contribute exactly."""

import pytest
import torch

from attnopt.codegen.eager.int8_linear import ACT_QMAX, Int8Linear


def _bound(regular: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    """Per output, the worst error of rounding ``regular`` (the non-outlier columns) per row to
    ±127 and the weight per channel: ``|x|·Δw + Δx·|w| + Δx·Δw`` summed over the inputs, with
    ``Δ = scale / 2``."""
    x = regular.double()
    dx = x.abs().amax(dim=-1, keepdim=True) / ACT_QMAX / 2
    dw = layer.w_scale.double() / 2
    w = layer.weight.double().abs()
    k = x.shape[-1]
    return x.abs().sum(-1, keepdim=True) * dw + dx * w.sum(-1) + k * dx * dw + 1e-5


def _reference(x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    return x.double() @ layer.weight.double().t() + layer.bias.double()


def test_int8_linear_within_the_quantization_bound():
    torch.manual_seed(0)
    dense = torch.nn.Linear(96, 80)
    layer = Int8Linear(dense.weight, dense.bias)
    x = torch.randn(3, 17, 96).clamp(-5.9, 5.9)  # no outliers: all of it quantized
    got = layer(x)
    err = (got.double() - _reference(x, layer)).abs()
    assert got.shape == (3, 17, 80) and got.dtype == torch.float32
    assert (err <= _bound(x, layer)).all()
    assert err.max() > 1e-5  # it did quantize
    cos = torch.nn.functional.cosine_similarity(got.flatten(), dense(x).flatten(), dim=0)
    assert cos > 0.999


def test_outlier_columns_are_kept_exact():
    torch.manual_seed(1)
    dense = torch.nn.Linear(64, 48)
    layer = Int8Linear(dense.weight, dense.bias)
    x = torch.randn(2, 9, 64).clamp(-5.9, 5.9)
    x[0, 3, 5] = 400.0  # one token's outlier marks the whole feature column
    x[1, 0, 40] = -6.0  # the threshold itself counts
    regular = x.clone()
    regular[..., [5, 40]] = 0.0
    got = layer(x)
    # the outliers' exact contribution: the rest is what the same layer gives without them
    outlier = x[..., [5, 40]].double() @ layer.weight[:, [5, 40]].double().t()
    torch.testing.assert_close(got.double() - layer(regular).double(), outlier, atol=1e-4, rtol=0)
    # and the other columns keep their own row scales (a quantized 400 would have set them)
    err = (got.double() - _reference(x, layer)).abs()
    assert (err <= _bound(regular, layer) + 1e-4).all()


def test_half_precision_input_keeps_its_dtype():
    torch.manual_seed(2)
    dense = torch.nn.Linear(32, 16).to(torch.bfloat16)
    layer = Int8Linear(dense.weight, dense.bias)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    x[2, 7] = 20.0
    got = layer(x)
    assert got.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(
        got.float().flatten(), dense(x).float().flatten(), 0
    )
    assert cos > 0.999


@pytest.mark.gpu
def test_cuda_matches_cpu_at_any_row_count():
    torch.manual_seed(3)
    dense = torch.nn.Linear(40, 24)
    x = torch.randn(3, 40)  # 3 rows: fewer than CUDA's _int_mm takes
    x[1, 2] = 7.0
    want = Int8Linear(dense.weight, dense.bias)(x)
    layer = Int8Linear(dense.weight.cuda(), dense.bias.cuda())
    torch.testing.assert_close(layer(x.cuda()).cpu(), want, atol=1e-5, rtol=1e-5)
