"""The ONNX front end and rewrite on the forms catalogue, exported by both torch exporters: the
same detector finds the sites, each becomes one fused onnxruntime op, and the converted model
computes what the original does (onnxruntime CPU, fp32 1e-5) at the export's sizes and others."""

from __future__ import annotations

import math

import onnx
import pytest
import sympy
import torch

import attnopt
from attnopt.errors import OnnxModelError
from attnopt.frontends.onnx.convert import convert
from attnopt.frontends.onnx.model import dim_expr, size_symbol
from attnopt.passes.exact import ExactPass
from tests.forms import FORMS, B, M, N
from tests.onnx_helpers import check_conversion, export, form_inputs, fused_ops

pytest.importorskip("onnxscript")

DIMS = {"batch": B, "seq": N, "ctx": M}
#: Where an exported graph differs from the torch one: (sites found, sites rewritten), and why.
ONNX_SITES = {
    # ONNX has no type promotion: the exporter casts the int mask to float before the add
    "guard_integer_additive_mask": (1, 1),
    # both exporters write the inference graph, where dropout is gone
    "guard_dropout_in_training": (1, 1),
    # 5-D scores: no fused op takes them (the report says so)
    "gqa_5d_broadcast": (1, 0),
}
#: Forms the TorchScript exporter cannot trace, with why.
TORCHSCRIPT_FAILS = {
    "softmax_fp32_then_to_half": "the tracer raises 'expected scalar type Float but found Half'",
}
BY_NAME = {f.name: f for f in FORMS}
DYNAMO_FORMS = [
    "matmul_op_mul_scale",
    "torch_matmul_div_scale",
    "einsum_bshd",
    "baddbmm_additive_mask",
    "bool_mask_where",
    "causal_arange_compare",
    "causal_buffer_slice_gpt2",
    "t5_relative_position_bias",
    "manual_softmax_amax",
    "gqa_repeat_interleave",
    "mqa_broadcast",
    "fused_qkv_unbind",
    "cross_attention",
    "sdpa_call",
    "sdpa_additive_mask",
    "nn_multihead_attention",
    "opt_style_bmm_4d_mask",
    "bmm_probs_viewed_back_after_softmax",
    "mask_eq0_view_expand_as",
    "two_layers",
    "guard_returns_attention_weights",
]


def _export(form, tmp_path, dynamo: bool, opset: int, dtype=torch.float32):
    inputs, dynamic = form_inputs(form)
    model = form.make().to(dtype)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    path = tmp_path / f"{form.name}.onnx"
    try:
        export(model, inputs, path, dynamo=dynamo, opset=opset, dynamic=dynamic, keywords=False)
    except (torch.onnx.errors.UnsupportedOperatorError, AssertionError) as err:
        pytest.skip(f"the exporter cannot export this form: {str(err).splitlines()[0]}")
    return path, {k: v for k, v in DIMS.items() if any(k in d.values() for d in dynamic.values())}


def _expected(form) -> tuple[int, int]:
    return ONNX_SITES.get(form.name, (form.sites, form.sites))


@pytest.mark.parametrize("form", FORMS, ids=[f.name for f in FORMS])
def test_form_torchscript_exporter(form, tmp_path) -> None:
    if form.name in TORCHSCRIPT_FAILS:
        pytest.skip(TORCHSCRIPT_FAILS[form.name])
    path, dims = _export(form, tmp_path, dynamo=False, opset=17)
    report = check_conversion(path, dims, *_expected(form))
    if form.sites == 0 and form.name not in ONNX_SITES:
        assert report.near_misses, report.to_json()


@pytest.mark.parametrize("name", DYNAMO_FORMS)
def test_form_dynamo_exporter(name, tmp_path) -> None:
    form = BY_NAME[name]
    path, dims = _export(form, tmp_path, dynamo=True, opset=18)
    check_conversion(path, dims, *_expected(form))


@pytest.mark.parametrize(
    "name",
    [
        "causal_tril_bool_not",
        "gqa_repeat_kv_expand",
        "bool_mask_masked_fill",
        "cross_attention",
        "bmm_3d",
        "single_head_2d",
        "mqa_broadcast",
    ],
)
def test_opset_23_uses_standard_attention(name, tmp_path) -> None:
    path, dims = _export(BY_NAME[name], tmp_path, dynamo=False, opset=23)
    report = check_conversion(path, dims, 1)
    assert report.sites[0].kernel == "Attention"


def test_dynamo_opset_23_decomposed_gqa_and_already_fused_sdpa(tmp_path) -> None:
    path, dims = _export(BY_NAME["gqa_repeat_interleave"], tmp_path, dynamo=True, opset=23)
    assert check_conversion(path, dims, 1).sites[0].kernel == "Attention"
    path, dims = _export(BY_NAME["sdpa_causal"], tmp_path, dynamo=True, opset=23)
    report = check_conversion(path, dims, 0)
    assert any("already fused" in note for note in report.notes)


@pytest.mark.parametrize("name", ["causal_triu_additive", "gqa_repeat_kv_expand"])
def test_opset_14(name, tmp_path) -> None:
    check_conversion(*_export(BY_NAME[name], tmp_path, dynamo=False, opset=14), 1)


def test_fp16_picks_an_op_that_runs_it_or_says_why_not(tmp_path) -> None:
    path, dims = _export(BY_NAME["causal_tril_eq0"], tmp_path, False, 17, torch.float16)
    report = check_conversion(path, dims, 1)
    assert report.sites[0].kernel == "com.microsoft.GroupQueryAttention"
    path, dims = _export(BY_NAME["cross_attention"], tmp_path, False, 17, torch.float16)
    report = check_conversion(path, dims, 1, 0)
    site = report.sites[0]
    assert site.status == "skipped" and "MultiHeadAttention runs float32" in site.reason
    assert "GroupQueryAttention needs query length = key length" in site.reason


def test_external_data_in_and_out(tmp_path) -> None:
    path, dims = _export(BY_NAME["gqa_repeat_kv_expand"], tmp_path, dynamo=False, opset=17)
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, size_threshold=0)
    check_conversion(path, dims, 1)
    assert (tmp_path / "gqa_repeat_kv_expand.attnopt.onnx.data").is_file()


def test_sites_outside_tolerance_are_restored(tmp_path) -> None:
    path, dims = _export(BY_NAME["two_layers"], tmp_path, dynamo=False, opset=17)
    report = check_conversion(path, dims, 2, 0, tolerance=-1.0)
    assert all(s.status == "restored" and "tolerance" in s.reason for s in report.sites)


def test_expand_as_scores_shape_recomputed_and_restored(tmp_path) -> None:
    """TorchScript writes ``expand_as(scores)`` as ``Shape(scores)``: the fused model computes
    that shape from q and k (no scores left), and a restored site reads the scores' again."""
    path, dims = _export(BY_NAME["mask_eq0_view_expand_as"], tmp_path, dynamo=False, opset=17)
    check_conversion(path, dims, 1)
    ops = [n.op_type for n in onnx.load(str(tmp_path / f"{path.stem}.attnopt.onnx")).graph.node]
    assert "Softmax" not in ops
    report = check_conversion(path, dims, 1, 0, tolerance=-1.0)
    assert report.sites[0].status == "restored"


def test_a_wrong_rewrite_is_caught_and_restored(tmp_path, monkeypatch) -> None:
    real = ExactPass.replacement

    def doubled_scale(self, site):
        replacement = real(self, site)
        return type(replacement)(replacement.op, {**replacement.attrs, "scale": 2 * site.scale})

    monkeypatch.setattr(ExactPass, "replacement", doubled_scale)
    path, dims = _export(BY_NAME["causal_tril_eq0"], tmp_path, dynamo=False, opset=17)
    report = check_conversion(path, dims, 1, 0)
    assert report.sites[0].status == "restored" and report.sites[0].max_error > 1e-3


def test_unchecked_conversion_is_rewritten_and_says_so(tmp_path) -> None:
    path, dims = _export(BY_NAME["bool_mask_where"], tmp_path, dynamo=False, opset=17)
    report = convert(path, tmp_path / "out.onnx", check=False)
    assert len(report.rewritten) == 1 and report.sites[0].max_error is None
    assert report.output_error is None and any("not verified" in n for n in report.notes)
    assert fused_ops(tmp_path / "out.onnx") == ["MultiHeadAttention"]


def test_inspect_an_onnx_path(tmp_path) -> None:
    path, _ = _export(BY_NAME["gqa_repeat_kv_expand"], tmp_path, dynamo=False, opset=17)
    report = attnopt.inspect(str(path))
    (site,) = report.sites
    assert site.status == "detected" and site.kernel == "com.microsoft.GroupQueryAttention"
    assert "4q/2kv" in site.signature and report.dynamic_dims == {"batch": [], "seq": []}


def test_unknown_dim_names_are_refused(tmp_path) -> None:
    path, _ = _export(BY_NAME["no_scale"], tmp_path, dynamo=False, opset=17)
    with pytest.raises(OnnxModelError, match="unknown dim.*seqlen.*batch, seq"):
        convert(path, tmp_path / "out.onnx", dims={"seqlen": 4})


def test_dim_params_are_sympy_sizes_never_code() -> None:
    seq = size_symbol("seq")
    assert dim_expr("seq") == seq
    assert dim_expr("2*seq") - 2 * seq == 0
    assert dim_expr("Min(32, seq)") == sympy.Min(32, seq)
    for hostile in ("__import__('os').system('true')", "__import__(os)", "seq.__class__"):
        assert isinstance(dim_expr(hostile), sympy.Symbol)
    assert math.isclose(float(dim_expr("seq + 1").subs(seq, 3)), 4.0)
