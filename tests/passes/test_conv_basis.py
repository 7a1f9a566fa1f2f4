"""conv_basis chooses head by head: on an ALiBi TinyLM whose first heads have bias-only scores
(their query weights zeroed) those heads take conv-basis with the basis from the bias, the
content heads of the same site stay exact, and the output fits the budget; a model with only
content heads is refused with each head's measured k."""

import pytest
import torch

import attnopt
from attnopt.calibrate import site_modules
from attnopt.passes.conv_basis import ConvBasisSite, toeplitz_heads
from tests.codegen.test_conv_basis import toeplitz_sum
from tests.fixtures.tiny_lm import TinyLM, alibi_slopes
from tests.forms import FORMS

N, HEADS, DIM = 48, 4, 64


def batches(count=2, seed=1, n=N):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (2, n), generator=gen),) for _ in range(count)]


def alibi_model(bias_only_heads: int) -> TinyLM:
    torch.manual_seed(0)
    model = TinyLM(alibi=True).eval()
    width = DIM // HEADS
    with torch.no_grad():
        for block in model.blocks:
            block.qkv.weight[: bias_only_heads * width].zero_()
            block.qkv.bias[: bias_only_heads * width].zero_()
    return model


def optimize(model, tolerance, **kwargs):
    return attnopt.optimize(
        model,
        batches(1, seed=0)[0],
        variants=("conv_basis", "exact"),
        tolerance=tolerance,
        calibration=batches(),
        **kwargs,
    )


def test_mixed_site_keeps_bias_heads_and_leaves_content_heads_exact():
    model = alibi_model(bias_only_heads=2)
    budget = {"rel_l1": 0.01, "cos": 0.999}
    opt = optimize(model, budget)
    report = opt.attnopt_report
    assert [s.variant for s in report.sites] == ["conv_basis", "conv_basis"]
    for site in report.sites:
        trial = site.trials[-1]
        assert trial.decision == "kept"
        chosen = [row["variant"] for row in trial.heads]
        assert chosen == ["conv_basis", "conv_basis", "exact", "exact"]
        for row in trial.heads[:2]:
            assert row["k"] == 1 and row["basis"] == "bias" and row["rel_l1"] < 1e-5
        for row in trial.heads[2:]:
            assert "reason" in row and str(row["k"]) in row["reason"]
        assert trial.metrics["rel_l1"] <= budget["rel_l1"]
    modules = list(site_modules(opt).values())
    assert [m.conv_heads.tolist() for m in modules] == [[True, True, False, False]] * 2
    x = batches(1, seed=5, n=70)[0][0]  # a longer input than calibration
    with torch.no_grad():
        got, want = opt(x), model(x)
    assert float((got - want).abs().sum() / want.abs().sum()) <= budget["rel_l1"]


def test_content_heads_are_refused_with_their_k():
    opt = optimize(alibi_model(bias_only_heads=0), {"rel_l1": 0.01, "cos": 0.999})
    for site in opt.attnopt_report.sites:
        assert site.variant == "exact"
        refused = site.trials[0]
        assert refused.variant == "conv_basis" and "no head qualifies" in refused.decision
        for row in refused.heads:
            assert f"head {row['head']} k" in refused.decision
            assert row["variant"] == "exact" and row["k"] > 1
    assert not site_modules(opt)


def test_k_gate_refuses_a_representable_head_that_would_not_pay():
    """Three exact segments: k = 3 is within k_max and exact, yet 3·log2 32 > 32/4."""
    n, gen = 32, torch.Generator().manual_seed(0)
    attrs = {"scale": 1.0, "causal": True, "window": 0, "fill": float("-inf"), "kv_group": 1}
    module = ConvBasisSite(attrs, heads=2, tau=1e-4, k_max=16)
    scores = torch.stack([toeplitz_sum([0], n, gen), toeplitz_sum([0, 9, 20], n, gen)])[None]
    q, k, v = torch.zeros(1, 2, n, 4), torch.zeros(1, 2, n, 4), torch.randn(1, 2, n, 3)
    module.watch(True)
    module(q, k, v, scores)
    refusal, rows = module.fit({"rel_l1": 0.01})
    assert refusal is None
    assert [(r["k"], r["variant"]) for r in rows] == [(1, "conv_basis"), (3, "exact")]
    assert "k·log2 n=15 > n/4=8" in rows[1]["reason"] and rows[1]["rel_l1"] < 1e-5
    assert module.conv_heads.tolist() == [True, False]


@pytest.mark.parametrize(
    "form,refusal",
    [("matmul_op_mul_scale", "not causal"), ("additive_padding_mask", "not causal")],
)
def test_refusals_name_the_reason(form, refusal):
    chosen = next(f for f in FORMS if f.name == form)
    opt = attnopt.optimize(chosen.make(), chosen.inputs(), variants=("conv_basis",))
    (site,) = opt.attnopt_report.sites
    assert site.status == "skipped" and refusal in site.reason


def test_toeplitz_heads_tells_a_position_bias_from_a_padding_mask():
    n = 9
    pos = torch.arange(n)
    bias = -alibi_slopes(3)[:, None, None] * (pos[:, None] - pos[None, :]).float()
    mask = bias.expand(2, 3, n, n).clone()
    assert toeplitz_heads(mask).tolist() == [True, True, True]
    mask[1, 2, :, -1] = float("-inf")  # padding the last key of one batch entry's head 2
    assert toeplitz_heads(mask).tolist() == [True, True, False]
