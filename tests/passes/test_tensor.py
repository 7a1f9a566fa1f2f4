"""The tensor pass: naive tensor attention written as a three-operand einsum or as an outer
product of key sets is found as one site of kind "tensor" and rewritten, to the polynomial when
the calibration scores are small (within the budget) and to the fused exact kernel otherwise
(refused with the measured range); near misses and the other passes leave it alone."""

import pytest
import torch
from torch import nn

import attnopt
from attnopt.api import _detect
from attnopt.frontends.export.capture import Inputs
from attnopt.passes import PASSES
from attnopt.targets import resolve


class EinsumTensor(nn.Module):
    """Tensor attention as the ALGORITHMS.md §4 formula reads: an (n, m, m) score tensor."""

    def __init__(self, spread=1.0, weights_out=False, pair_softmax=True, causal=False):
        super().__init__()
        self.proj = nn.Linear(8, 40)
        self.spread, self.weights_out, self.pair_softmax = spread, weights_out, pair_softmax
        self.causal = causal

    def forward(self, x):
        b, n, _ = x.shape
        parts = self.proj(x).chunk(5, dim=-1)
        q, k1, k2, v1, v2 = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in parts)
        s = torch.einsum("bhid,bhjd,bhld->bhijl", q * self.spread, k1, k2) * 0.5
        if self.causal:  # a pair is kept when both of its keys are
            keep = torch.ones(n, n, dtype=torch.bool).tril()
            s = s.masked_fill(~(keep[:, :, None] & keep[:, None, :]), float("-inf"))
        if self.pair_softmax:
            p = s.reshape(b, 2, n, n * n).softmax(-1).reshape(b, 2, n, n, n)
        else:
            p = s.softmax(-1)
        out = torch.einsum("bhijl,bhjd,bhld->bhid", p, v1, v2).transpose(1, 2).flatten(-2)
        return (out, p) if self.weights_out else out


class OuterTensor(nn.Module):
    """The same computed as standard attention over the flattened outer products of keys and
    of values."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 40)

    def forward(self, x):
        parts = self.proj(x).chunk(5, dim=-1)
        q, k1, k2, v1, v2 = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in parts)
        keys = (k1[:, :, :, None, :] * k2[:, :, None, :, :]).flatten(2, 3)
        values = (v1[:, :, :, None, :] * v2[:, :, None, :, :]).flatten(2, 3)
        probs = (q @ keys.transpose(-2, -1) * 0.5).softmax(dim=-1)
        return (probs @ values).transpose(1, 2).flatten(-2)


def x_in(n=6, seed=0):
    return (torch.randn(2, n, 8, generator=torch.Generator().manual_seed(seed)),)


@pytest.mark.parametrize("model", [EinsumTensor(), OuterTensor()], ids=["einsum", "outer"])
def test_naive_forms_are_one_tensor_site(model):
    _, _, found = _detect(model, Inputs.of(x_in()))
    (site,) = found.sites
    assert site.kind == "tensor" and site.k2 is not None and site.v2 is not None
    assert site.scale == pytest.approx(0.5)
    reasons = [PASSES[v].applies(site, resolve("auto")) for v in ("exact", "linear", "tensor")]
    assert reasons[0] and "tensor" in reasons[0] and reasons[1] and reasons[2] is None


@pytest.mark.parametrize(
    "model",
    [EinsumTensor(spread=20.0), EinsumTensor(causal=True), OuterTensor()],
    ids=["einsum", "einsum-causal", "outer"],
)
def test_large_scores_refuse_the_polynomial_and_run_fused(model):
    torch.manual_seed(0)
    optimized = attnopt.optimize(model, x_in(), variants=("tensor",))
    report = optimized.attnopt_report
    (site,) = report.sites
    assert site.status == "rewritten" and site.variant == "tensor"
    assert "polynomial refused: measured score range" in site.trials[-1].decision
    for n in (6, 9):
        with torch.no_grad():
            torch.testing.assert_close(
                optimized(*x_in(n, 1)), model(*x_in(n, 1)), atol=1e-5, rtol=1e-5
            )


@pytest.mark.parametrize("causal", [False, True])
def test_small_scores_take_the_polynomial_within_budget(causal):
    model = EinsumTensor(spread=0.02, causal=causal)
    optimized = attnopt.optimize(model, x_in(), variants=("tensor",), calibration=[x_in(6, 2)])
    (site,) = optimized.attnopt_report.sites
    trial = site.trials[-1]
    assert site.status == "rewritten" and "polynomial degree 4" in trial.decision
    assert site.mask == ("causal" if causal else "none")
    assert "refused" not in trial.decision and trial.metrics["rel_l1"] < 1e-3
    with torch.no_grad():
        got, expected = optimized(*x_in(6, 3)), model(*x_in(6, 3))
    assert ((got - expected).abs().sum() / expected.abs().sum()).item() < 1e-3


def test_near_misses_stay_unrewritten():
    weights = attnopt.inspect(EinsumTensor(weights_out=True), x_in())
    assert not weights.sites and "output_attentions" in weights.near_misses[0].rule
    one_axis = attnopt.inspect(EinsumTensor(pair_softmax=False), x_in())
    assert not one_axis.sites and one_axis.near_misses  # softmax over one key axis: not tensor


class HalfCausal(EinsumTensor):
    """Only the first key of a pair is causal: no kernel form, so no site."""

    def forward(self, x):
        b, n, _ = x.shape
        parts = self.proj(x).chunk(5, dim=-1)
        q, k1, k2, v1, v2 = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in parts)
        s = torch.einsum("bhid,bhjd,bhld->bhijl", q, k1, k2)
        keep = torch.ones(n, n, dtype=torch.bool).tril()
        s = s.masked_fill(~(keep[:, :, None] & torch.ones_like(keep)[:, None, :]), float("-inf"))
        p = s.reshape(b, 2, n, n * n).softmax(-1).reshape(b, 2, n, n, n)
        return torch.einsum("bhijl,bhjd,bhld->bhid", p, v1, v2).transpose(1, 2).flatten(-2)


def test_other_pair_masks_are_not_tensor_sites():
    report = attnopt.inspect(HalfCausal(), x_in())
    assert not report.sites and report.near_misses
