"""The Triton linear-family kernels (interpreter on CPU, tiny sizes) against the references:
chunked prefill causal and not, gated, GQA, odd lengths; the recurrent step token by token."""

import pytest
import torch
import torch.nn.functional as F

from attnopt.codegen.reference import linear as ref
from attnopt.codegen.triton import exact as triton_exact
from attnopt.codegen.triton import linear as triton_linear

pytestmark = pytest.mark.skipif(
    not triton_exact.INTERPRETED and not torch.cuda.is_available(),
    reason="needs CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(actual, expected) -> float:
    a, e = actual.double().cpu(), expected.double().cpu()
    return ((a - e).norm() / e.norm()).item()


def inputs(b=1, h=2, kv=1, n=21, f=8, dv=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    fq = F.elu(torch.randn(b, h, n, f, generator=gen)) + 1
    fk = F.elu(torch.randn(b, kv, n, f, generator=gen)) + 1
    v = torch.randn(b, kv, n, dv, generator=gen)
    gate = F.logsigmoid(2 * torch.randn(b, kv, n, f, generator=gen)) / 16
    return fq, fk, v, gate


def normalised_gla(fq, fk, v, gate):
    ones = torch.ones(*v.shape[:-1], 1)
    out, _ = ref.gated_linear_attention(fq, fk, torch.cat([v, ones], -1), gate, scale=1.0)
    return out[..., :-1] / (out[..., -1:] + triton_linear.EPS)


@pytest.mark.parametrize("causal", [True, False])
def test_chunked_linear(causal):
    fq, fk, v, _ = inputs()
    out = triton_linear.forward(*(t.to(DEVICE) for t in (fq, fk, v)), None, causal=causal)
    assert rel(out, ref.linear_attention(fq, fk, v, causal=causal)) < 1e-5


def test_chunked_gated():
    fq, fk, v, gate = inputs(n=37)
    out = triton_linear.forward(*(t.to(DEVICE) for t in (fq, fk, v, gate)), causal=True)
    assert rel(out, normalised_gla(fq, fk, v, gate)) < 1e-5


@pytest.mark.parametrize("gated", [False, True])
def test_recurrent_step_matches_prefill(gated):
    fq, fk, v, gate = inputs(n=5)
    gate = gate if gated else None
    state = torch.zeros(1, 2, 8, 12, device=DEVICE)
    norm = torch.zeros(1, 2, 8, device=DEVICE)
    steps = []
    for t in range(5):
        g = None if gate is None else gate[:, :, t].to(DEVICE)
        args = (fq[:, :, t], fk[:, :, t], v[:, :, t])
        steps.append(triton_linear.step(*(a.to(DEVICE) for a in args), g, state, norm))
    expected = (
        ref.linear_attention(fq, fk, v, causal=True)
        if gate is None
        else normalised_gla(fq, fk, v, gate)
    )
    assert rel(torch.stack(steps, dim=2), expected) < 1e-5
