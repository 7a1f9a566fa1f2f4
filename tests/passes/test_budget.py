"""The error budget: per-site decisions, the model-level back-off, the report's metrics against
an independent recomputation, and user errors. On an untrained TinyLM (fast); the trained
fixture's tests are in test_linear.py."""

import pytest
import torch
import torch.nn.functional as F

import attnopt
from attnopt.budget import Budget, BudgetError
from attnopt.calibrate import site_modules
from attnopt.errors import AttnoptError
from tests.fixtures.tiny_lm import TinyLM

N = 40


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyLM().eval()


def batches(count=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (2, N), generator=gen),) for _ in range(count)]


def optimize(model, variants=("linear", "exact"), **kwargs):
    return attnopt.optimize(model, batches(1, seed=0)[0], variants=variants, **kwargs)


def test_loose_budget_keeps_linear_everywhere(model):
    opt = optimize(model, tolerance={"rel_l1": 0.9, "cos": 0.3}, calibration=batches())
    report = opt.attnopt_report
    assert [s.variant for s in report.sites] == ["linear", "linear"]
    assert all(s.trials[-1].decision == "kept" for s in report.sites)
    assert len(site_modules(opt)) == 2
    hedgehog = [n for n, _ in opt.named_parameters() if "feature_q.weight" in n]
    assert len(hedgehog) == 2  # the new weights are exposed for fine-tuning


def test_tight_budget_restores_exact_per_site(model):
    opt = optimize(model, tolerance={"rel_l1": 1e-4}, calibration=batches())
    report = opt.attnopt_report
    for site in report.sites:
        assert [t.variant for t in site.trials] == ["linear", "exact"]
        assert site.trials[0].decision.startswith("rejected: rel_l1")
        assert site.variant == "exact" and site.status == "rewritten"
    assert not site_modules(opt)  # rejected candidates leave no module behind
    x = batches(1, seed=5)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), atol=1e-5, rtol=1e-5)


def test_model_budget_backs_off_until_it_fits(model):
    opt = optimize(
        model, tolerance={"rel_l1": 0.9, "cos": 0.3, "model_rel_l1": 1e-4}, calibration=batches()
    )
    report = opt.attnopt_report
    backed = [s for s in report.sites if any("backed off" in t.decision for t in s.trials)]
    assert backed and all(s.variant == "exact" for s in backed)
    assert report.model_metrics["rel_l1"] <= 1e-4
    assert report.budget["model_rel_l1"] == 1e-4


def test_reported_metrics_match_an_independent_recomputation(model):
    cal = batches(3, seed=2)
    opt = optimize(model, tolerance={"rel_l1": 0.9, "cos": 0.3}, calibration=cal)
    modules = site_modules(opt)
    seen = {name: [] for name in modules}
    hooks = [
        m.register_forward_hook(lambda m, a, out, name=name: seen[name].append((a, out)))
        for name, m in modules.items()
    ]
    with torch.no_grad():
        for (x,) in cal:
            opt(x)
    for hook in hooks:
        hook.remove()
    for site, name in zip(opt.attnopt_report.sites, modules, strict=True):
        new = torch.cat([out.flatten() for _, out in seen[name]]).double()
        old = torch.cat(
            [
                F.scaled_dot_product_attention(q, k, v, is_causal=True).flatten()
                for (q, k, v, _), _ in seen[name]
            ]
        ).double()
        expected = {
            "cos": F.cosine_similarity(new, old, dim=0).item(),
            "rel_l1": ((new - old).abs().sum() / old.abs().sum()).item(),
            "rmse": (new - old).pow(2).mean().sqrt().item(),
        }
        for metric, value in expected.items():
            assert site.trials[-1].metrics[metric] == pytest.approx(value, rel=1e-5)


def test_budget_errors():
    with pytest.raises(BudgetError, match="unknown tolerance metric"):
        Budget.of({"l2": 0.1})
    with pytest.raises(BudgetError, match="calibration is empty"):
        optimize(TinyLM().eval(), tolerance={"rel_l1": 0.5}, calibration=[])
    assert Budget.of(None).site == {"cos": 0.99, "rel_l1": 0.05}
    assert Budget.of({"cos": 0.9, "model_rel_l1": 0.2}).model == {"cos": 0.9, "rel_l1": 0.2}


def test_fixed_knobs_per_variant_and_per_site(model):
    opt = optimize(
        model,
        variants=("hybrid", "exact"),
        tolerance={"rel_l1": 0.9, "cos": 0.3},
        knobs={
            "hybrid": {"window": 8, "feature_map": "elu"},
            "blocks.1": {"hybrid": {"window": 4}},
        },
    )
    kept = [s.trials[-1] for s in opt.attnopt_report.sites]
    assert [t.decision for t in kept] == ["kept", "kept"]
    assert [t.knobs["window"] for t in kept] == [8, 4]
    assert all(t.knobs["feature_map"] == "elu" for t in kept)
    assert [m.window for m in site_modules(opt).values()] == [8, 4]


def test_fixed_knobs_still_meet_the_budget(model):
    opt = optimize(
        model,
        variants=("hybrid", "exact"),
        tolerance={"rel_l1": 1e-4},
        knobs={0: {"hybrid": {"window": 8}}},
    )
    first = opt.attnopt_report.sites[0]
    assert first.trials[0].knobs["window"] == 8
    assert first.trials[0].decision.startswith("rejected") and first.variant == "exact"


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"hybrid": {"width": 8}}, "hybrid has no knob 'width'"),
        ({"hybrid": {"feature_map": "tanh"}}, "choose one of hedgehog, elu, relu"),
        ({"hybrid": {"window": -1}}, "expected an integer >= 1"),
        ({"linear": {"chunk": 24}}, "expected a power of two"),
        ({"gla": {"chunk": 16}}, "not among variants"),
        ({"blocks.9": {"hybrid": {"window": 8}}}, "is neither a variant"),
        ({"exact": {"window": 8}}, "exact has no knob"),
    ],
)
def test_bad_knobs_are_clear_errors(model, knobs, message):
    with pytest.raises(AttnoptError, match=message):
        optimize(model, variants=("hybrid", "linear", "exact"), knobs=knobs)


def test_original_checkpoint_loads_strictly(model):
    opt = optimize(model, tolerance={"rel_l1": 0.9, "cos": 0.3})
    sites = {k: v.clone() for k, v in opt.state_dict().items() if k.startswith("attnopt_site_")}
    assert sites  # the approximate sites' weights are saved with the optimized model
    changed = {k: v + 1 for k, v in model.state_dict().items()}
    opt.load_state_dict(changed)  # strict: the original keys only
    for key, value in opt.state_dict().items():
        expected = sites[key] if key in sites else changed[key]
        assert torch.equal(value, expected), key
    with pytest.raises(RuntimeError, match="missing keys"):
        opt.load_state_dict({k: v for k, v in changed.items() if "head" not in k})
