"""prefix_ntk: the kernels against the oracle, the fitted ``Z, z`` against true prefix
attention on calibration data, and the work a longer prefix costs (counted, not timed)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import attnopt
from attnopt.calibrate import site_errors, site_modules
from attnopt.codegen.eager import prefix_ntk as eager
from attnopt.codegen.reference import prefix_ntk as ref
from attnopt.codegen.reference.exact import exact_attention
from attnopt.errors import AttnoptError
from attnopt.passes import PASSES
from attnopt.passes.prefix_ntk import PrefixNTKSite
from tests.prefix_forms import PrefixAttention, inputs

ATTRS = {"scale": 0.35, "causal": False, "window": 0, "fill": float("-inf"), "kv_group": 1}


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("causal,n", [(False, 7), (True, 9), (True, 3)])
@pytest.mark.parametrize("grad", [False, True])
def test_epilogue_matches_the_oracle(causal, n, grad):
    q, k, v = _rand(2, 4, n, 8, seed=1), _rand(2, 2, 9, 8, seed=2), _rand(2, 2, 9, 6, seed=3)
    q.requires_grad_(grad)
    fq = ref.feature_map(q, ref.feature_weight(4, 8, 12))
    Z, z = _rand(4, 12, 6, seed=4).abs(), _rand(4, 12, seed=5).abs()
    expected = ref.prefix_ntk_attention(q, k, v, fq, Z, z, scale=0.35, causal=causal)
    got = eager.prefix_ntk_attention(q, k, v, fq, Z, z, scale=0.35, causal=causal)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_zero_state_is_exact_attention():
    q, k, v = _rand(1, 2, 5, 8, seed=1), _rand(1, 2, 5, 8, seed=2), _rand(1, 2, 5, 8, seed=3)
    fq = ref.feature_map(q)
    zeros = torch.zeros(2, 8, 8), torch.zeros(2, 8)
    got = eager.prefix_ntk_attention(q, k, v, fq, *zeros, scale=0.35, causal=True)
    expected, _ = exact_attention(q, k, v, scale=0.35, causal=True)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def _optimized(prefix, causal=False):
    cal = [inputs(2, 16, seed=s) for s in range(3)]
    model = PrefixAttention(prefix=prefix, causal=causal).eval()
    return attnopt.optimize(
        model, cal[0], variants=("prefix_ntk",), tolerance={"cos": 0.5}, calibration=cal
    )


HELD_OUT = [inputs(2, 16, seed=s) for s in range(10, 13)]


@pytest.mark.parametrize("causal", [False, True])
def test_fitted_prefix_against_true_prefix_attention(causal):
    opt = _optimized(64, causal)
    (site,) = opt.attnopt_report.sites
    assert site.variant == "prefix_ntk" and "prefix=64" in site.signature
    (trial,) = site.trials
    assert 0 < trial.metrics["rel_l1"] < 0.5  # reported: a real approximation, bounded
    (name,) = site_modules(opt)
    held = site_errors(opt, HELD_OUT)[name]
    assert held["rel_l1"] < 0.5 and held["cos"] > 0.9
    # the least-squares fit beats its own start (the linear-attention state of the prefix)
    module, gm = site_modules(opt)[name], opt.graph_module
    fk = ref.feature_map(gm.get_parameter("pk").detach()[None])[0]
    start = ref.prefix_state(fk, gm.get_parameter("pv").detach())
    with torch.no_grad():
        module.Z.copy_(start[0])
        module.z.copy_(start[1])
    assert site_errors(opt, HELD_OUT)[name]["rel_l1"] > 1.5 * held["rel_l1"]


def test_more_features_fit_better(monkeypatch):
    errors = []
    for dim in (0, 64):
        monkeypatch.setattr(PASSES["prefix_ntk"], "knobs", {"feature_dim": (dim,)})
        opt = _optimized(64)
        assert opt.attnopt_report.sites[0].config == f"feature_dim={dim}"
        errors.append(next(iter(site_errors(opt, HELD_OUT).values()))["rel_l1"])
    assert errors[1] < errors[0]


def test_site_without_prefix_is_refused():
    opt = attnopt.optimize(
        PrefixAttention(from_input=True).eval(), inputs(), variants=("prefix_ntk",)
    )
    (site,) = opt.attnopt_report.sites
    assert site.status == "skipped" and "no input-independent prefix" in site.reason


def _flops(fn) -> int:
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_longer_prefix_costs_the_same_work():
    """The module's matmul FLOPs do not change with the prefix; exact attention's grow."""
    n, d = 16, 8
    q = _rand(1, 4, n, d, seed=1).requires_grad_(True)  # the differentiable (counted) path
    work, exact_work = [], []
    for p in (32, 512):
        k, v = _rand(1, 4, p + n, d, seed=2), _rand(1, 4, p + n, d, seed=3)
        module = PrefixNTKSite(ATTRS, p, heads=4, head_dim=d, value_dim=d)
        module.fitted.fill_(True)
        work.append(_flops(lambda: module(q, k, v, None)))  # noqa: B023
        exact_work.append(_flops(lambda: exact_attention(q, k, v, scale=0.35)))  # noqa: B023
    assert work[0] == work[1] > 0
    assert exact_work[1] > 10 * exact_work[0]


def test_a_mask_hiding_the_prefix_is_an_error():
    module = PrefixNTKSite(ATTRS, 4, heads=2, head_dim=8, value_dim=8)
    module.fitted.fill_(True)
    q, k = _rand(1, 2, 3, 8, seed=1), _rand(1, 2, 7, 8, seed=2)
    keep = torch.ones(1, 2, 3, 7, dtype=torch.bool)
    module(q, k, k, keep)  # the prefix visible: fine
    keep[0, 0, 1, 2] = False
    with pytest.raises(AttnoptError, match="hides prefix tokens"):
        module(q, k, k, keep)


def test_the_fit_reads_the_prefix_in_chunks_alike():
    gen = torch.Generator().manual_seed(2)
    q, pk, pv = torch.randn(2, 2, 8, 16, generator=gen), *torch.randn(2, 2, 37, 16, generator=gen)
    fq, lse = ref.feature_map(q), torch.randn(2, 2, 8, generator=gen)
    start = ref.prefix_state(ref.feature_map(pk[None])[0], pv)
    whole = ref.fit_prefix_state(q, fq, pk, pv, lse, start, scale=0.25)
    chunked = ref.fit_prefix_state(q, fq, pk, pv, lse, start, scale=0.25, chunk=5)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
