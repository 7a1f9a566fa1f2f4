"""linear / gla / hybrid on the trained quality fixture: where the passes apply, the budget
keeping or reverting them on learned attention, and calibration lowering each site's error
while leaving every other weight bit-identical."""

import pytest
import torch

import attnopt
from attnopt.calibrate import site_errors, site_modules
from attnopt.passes import PASSES
from tests.fixtures.tiny_lm import HELD_OUT_FILES, TRAIN_FILES, batches, load, text_bytes
from tests.forms import FORMS


@pytest.mark.parametrize(
    "variant,form,refusal",
    [
        ("linear", "additive_padding_mask", "additive mask"),
        ("gla", "matmul_op_mul_scale", "gla is causal"),
        ("hybrid", "matmul_op_mul_scale", "hybrid is causal"),
        ("linear", "sliding_window_band", "boolean mask"),
    ],
)
def test_refusals_name_the_reason(variant, form, refusal):
    chosen = next(f for f in FORMS if f.name == form)
    model = chosen.make()
    opt = attnopt.optimize(model, chosen.inputs(), variants=(variant,))
    (site,) = opt.attnopt_report.sites
    assert site.status == "skipped" and refusal in site.reason


def test_non_causal_linear_fires_and_refuses_nothing():
    chosen = next(f for f in FORMS if f.name == "matmul_op_mul_scale")
    opt = attnopt.optimize(
        chosen.make(), chosen.inputs(), variants=("linear",), tolerance={"cos": 0.0}
    )
    assert opt.attnopt_report.sites[0].variant == "linear"
    assert PASSES["linear"].knobs["feature_map"] == ("hedgehog", "elu", "relu")


@pytest.fixture(scope="module")
def fixture():
    model = load()
    train = text_bytes(TRAIN_FILES)
    held = text_bytes(HELD_OUT_FILES)
    cal = [(b,) for b in batches(train, 3, 96, 4, seed=7)]
    evaluate = [(b,) for b in batches(held, 2, 96, 4, seed=9)]
    return model, cal, evaluate


def test_budget_on_learned_attention(fixture):
    model, cal, _ = fixture
    variants = ("hybrid", "exact")
    loose = attnopt.optimize(
        model, cal[0], variants=variants, tolerance={"rel_l1": 0.5, "cos": 0.8}, calibration=cal
    )
    assert [s.variant for s in loose.attnopt_report.sites] == ["hybrid", "hybrid"]
    tight = attnopt.optimize(
        model, cal[0], variants=variants, tolerance={"rel_l1": 1e-3}, calibration=cal
    )
    assert [s.variant for s in tight.attnopt_report.sites] == ["exact", "exact"]
    kept = [t.metrics["rel_l1"] for s in loose.attnopt_report.sites for t in s.trials]
    assert all(0 < err <= 0.5 for err in kept)  # a real approximation, within the budget


@pytest.mark.parametrize("variant", ["linear", "hybrid"])
def test_calibration_lowers_every_site_error(fixture, variant):
    model, cal, evaluate = fixture
    opt = attnopt.optimize(
        model, cal[0], variants=(variant,), tolerance={"cos": -1.0}, calibration=cal
    )
    base = {n: p.detach().clone() for n, p in opt.named_parameters() if "attnopt_site" not in n}
    before = site_errors(opt, evaluate)
    losses = attnopt.calibrate(opt, cal, steps=30, lr=2e-2)
    after = site_errors(opt, evaluate)
    assert len(losses) == 30 and losses[-1] < losses[0]
    assert set(before) == set(after) == set(site_modules(opt)) and len(before) == 2
    for name in before:
        assert after[name]["rel_l1"] < before[name]["rel_l1"], name
    for name, p in opt.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), name
            assert p.requires_grad  # unfrozen again afterwards
