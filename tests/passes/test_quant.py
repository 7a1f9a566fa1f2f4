"""quant on the trained quality fixture: kept within its own default budget (cos ≥ 0.995,
rel_l1 ≤ 0.03), restored to exact under a tight one, every site reporting cos, rel_l1, rmse;
with ``quant_projections`` the int8 projections are kept or reverted with their site."""

import pytest
import torch

import attnopt
from attnopt.budget import Budget
from attnopt.calibrate import site_modules
from attnopt.codegen.eager.int8_linear import Int8Linear
from attnopt.codegen.eager.quant import quant_attention_cpu
from attnopt.passes import PASSES
from attnopt.passes.base import check_knob
from attnopt.passes.quant import QuantSite
from tests.fixtures.tiny_lm import HELD_OUT_FILES, batches, load, text_bytes
from tests.forms import FORMS


@pytest.fixture(scope="module")
def fixture():
    held = text_bytes(HELD_OUT_FILES)
    return load(), [(b,) for b in batches(held, 2, 96, 2, seed=3)]


def test_default_budget_keeps_quant_on_learned_attention(fixture):
    model, cal = fixture
    opt = attnopt.optimize(model, cal[0], variants=("quant", "exact"), calibration=cal)
    report = opt.attnopt_report
    assert [s.variant for s in report.sites] == ["quant", "quant"]
    for site in report.sites:
        (trial,) = site.trials
        assert (
            trial.knobs == {"bits": 8, "pv": "fp16", "quant_projections": False}
            and trial.decision == "kept"
        )
        assert set(trial.metrics) >= {"cos", "rel_l1", "rmse"}
        assert trial.metrics["cos"] >= 0.995 and 0 < trial.metrics["rel_l1"] <= 0.03
    assert len(site_modules(opt)) == 2
    x = cal[1][0]
    with torch.no_grad():
        got, want = opt(x), model(x)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99
    assert not torch.equal(got, want)


def test_tight_budget_restores_exact(fixture):
    model, cal = fixture
    opt = attnopt.optimize(
        model, cal[0], variants=("quant", "exact"), tolerance={"rel_l1": 1e-5}, calibration=cal
    )
    for site in opt.attnopt_report.sites:
        assert [t.variant for t in site.trials] == ["quant", "exact"]
        assert site.trials[0].decision.startswith("rejected: rel_l1")
        assert site.variant == "exact"
    assert not site_modules(opt)


def test_own_defaults_apply_only_without_a_tolerance_dict():
    quant = PASSES["quant"]
    assert Budget.of(None).site_limits(quant) == {"cos": 0.995, "rel_l1": 0.03}
    assert Budget.of(1e-3).site_limits(quant) == {"cos": 0.995, "rel_l1": 0.03}
    assert Budget.of({"cos": 0.9}).site_limits(quant) == {"cos": 0.9}
    assert Budget.of(None).site_limits(PASSES["linear"]) == Budget.of(None).site


def test_masked_site_is_rewritten_and_int4_reaches_the_kernel():
    chosen = next(f for f in FORMS if f.name == "additive_padding_mask")
    opt = attnopt.optimize(
        chosen.make(), chosen.inputs(), variants=("quant",), tolerance={"cos": 0.0}
    )
    (site,) = opt.attnopt_report.sites
    assert site.variant == "quant" and site.status == "rewritten"
    (module,) = site_modules(opt).values()
    assert (module.bits, module.pv) == (8, "fp16")
    q, k, v = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    attrs = {**module.attrs, "causal": True}
    got = QuantSite(attrs, 4, "fp8")(q, k, v, None)
    want = quant_attention_cpu(q, k, v, scale=attrs["scale"], causal=True, bits=4, pv="fp8")
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, QuantSite(attrs, 8, "fp16")(q, k, v, None))


def test_onnx_quant_sites_stay_exact_with_the_reason(tmp_path):
    pytest.importorskip("onnxscript")
    from attnopt.frontends.onnx.convert import convert
    from tests.onnx_helpers import export, form_inputs, fused_ops

    form = next(f for f in FORMS if f.name == "causal_tril_bool_not")
    inputs, dynamic = form_inputs(form)
    path = export(form.make(), inputs, tmp_path / "m.onnx", dynamo=False, opset=23, dynamic=dynamic)
    out = tmp_path / "m.attnopt.onnx"
    report = convert(path, out, variants=("quant", "exact"))
    (site,) = report.sites
    assert site.variant == "exact" and site.status == "rewritten", report.to_json()
    assert "quant: quant's per-block INT8 scales" in site.reason
    assert fused_ops(out) == ["Attention"]
    only = convert(path, tmp_path / "q.onnx", variants=("quant",))
    assert only.sites[0].status == "skipped" and "DynamicQuantizeLinear" in only.sites[0].reason


def _int8_layers(opt) -> int:
    return sum(isinstance(m, Int8Linear) for m in opt.modules())


def test_projections_kept_within_the_default_budget(fixture):
    model, cal = fixture
    knobs = {"quant": {"quant_projections": True}}
    opt = attnopt.optimize(model, cal[0], variants=("quant", "exact"), calibration=cal, knobs=knobs)
    for site, (qkv, out) in zip(
        opt.attnopt_report.sites, (("linear", "linear_1"), ("linear_4", "linear_5")), strict=True
    ):
        (trial,) = site.trials
        assert site.variant == "quant" and trial.knobs["quant_projections"] is True
        assert trial.decision == f"kept (projections replaced: {qkv} (q/k/v), {out} (out))"
        assert trial.metrics["cos"] >= 0.995 and 0 < trial.metrics["rel_l1"] <= 0.03
    assert _int8_layers(opt) == 4  # each block's fused qkv and output projection
    x = cal[1][0]
    with torch.no_grad():
        got, want = opt(x), model(x)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99


def test_projections_reverted_with_the_site_under_a_tight_budget(fixture):
    model, cal = fixture
    opt = attnopt.optimize(
        model,
        cal[0],
        variants=("quant", "exact"),
        tolerance={"rel_l1": 1e-5},
        calibration=cal,
        knobs={"quant": {"quant_projections": True}},
    )
    for site in opt.attnopt_report.sites:
        assert [t.variant for t in site.trials] == ["quant", "exact"]
        assert site.trials[0].decision.startswith("rejected: rel_l1")
        assert "projections replaced" in site.trials[0].decision
    assert _int8_layers(opt) == 0 and not site_modules(opt)
    x = cal[1][0]
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), atol=1e-4, rtol=1e-4)


def test_site_without_projections_says_why():
    form = next(f for f in FORMS if f.name == "scale_div_sqrt_size")  # q, k, v are inputs
    knobs = {"quant": {"quant_projections": True}}
    opt = attnopt.optimize(
        form.make(), form.inputs(), variants=("quant",), tolerance={"cos": 0.0}, knobs=knobs
    )
    (site,) = opt.attnopt_report.sites
    assert site.variant == "quant"
    assert site.trials[0].decision == (
        "kept (projections kept: q: it is not computed by a linear layer (it comes from input))"
    )
    assert _int8_layers(opt) == 0


def test_quant_projections_is_a_switch():
    quant = PASSES["quant"]
    assert check_knob(quant, "quant_projections", True) is None
    assert "expected a bool" in check_knob(quant, "quant_projections", 1)


def test_int8_projections_follow_a_loaded_checkpoint(fixture):
    _, cal = fixture
    model, other = load(), load()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.05).add_(0.02 * torch.randn_like(p))
    knobs = {"quant": {"quant_projections": True}}
    opt = attnopt.optimize(model, cal[0], variants=("quant",), calibration=cal, knobs=knobs)
    assert _int8_layers(opt) == 4
    x = cal[1][0]
    with torch.no_grad():
        before, want = opt(x), other(x)
        opt.load_state_dict(other.state_dict())  # strict: the int8 layers add no keys
        got = opt(x)
    assert set(opt.state_dict()) == set(other.state_dict())
    assert (got - want).abs().mean() < 0.1 * (before - want).abs().mean()
