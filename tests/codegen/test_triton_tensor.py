"""The Triton tensor-attention kernel against the naive oracle: interpreter on CPU at tiny
sizes (causal, windowed, cross, odd sizes), and natively on a GPU at a larger size."""

import pytest
import torch

from attnopt.codegen.reference import tensor as ref
from attnopt.codegen.triton import exact as triton_exact
from attnopt.codegen.triton import tensor as triton_tensor
from tests.codegen.test_tensor import inputs, rel

pytestmark = pytest.mark.skipif(
    not triton_exact.INTERPRETED and not torch.cuda.is_available(),
    reason="needs CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    ("causal", "window", "sizes"),
    [(False, 0, (9, 11, 18)), (True, 0, (19, 19, 19)), (True, 5, (19, 19, 19))],
)
def test_kernel_matches_naive(causal, window, sizes):
    n, m1, m2 = sizes
    args = inputs(h=1, n=n, m1=m1, m2=m2, d=5, dv=3)
    expected = ref.tensor_attention(*args, scale=0.6, causal=causal, window=window)
    out = triton_tensor.forward(
        *(t.to(DEVICE) for t in args), scale=0.6, causal=causal, window=window
    )
    assert rel(out, expected) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("causal", "window"), [(False, 0), (True, 0), (True, 32)])
def test_native_kernel_matches_naive(causal, window):
    args = inputs(b=2, h=2, n=160, m1=160, m2=160, d=32, dv=32)
    expected = ref.tensor_attention(*args, scale=32**-0.5, causal=causal, window=window)
    out = triton_tensor.forward(
        *(t.cuda() for t in args), scale=32**-0.5, causal=causal, window=window
    )
    assert rel(out, expected) < 1e-5
