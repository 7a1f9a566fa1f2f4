"""Never crash, never lie: a site that fails anywhere is restored with the reason, mixed
precision and NaN inputs behave as in the original, and bad input is an ``attnopt.errors``
error that says what to change."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

import attnopt
import attnopt.codegen.ops as ops
from attnopt.autotune.cli import model_signatures
from attnopt.cli import app
from attnopt.errors import InputSignatureError, UnsupportedModelError
from tests.forms import FORMS, B, C, N
from tests.onnx_helpers import export, form_inputs


def _form(name: str):
    return next(f for f in FORMS if f.name == name)


def test_a_site_whose_kernel_fails_is_restored_not_raised(monkeypatch) -> None:
    run = ops._run

    def fails_when_causal(q, k, v, mask, scale, causal, *rest):
        if causal:
            raise RuntimeError("injected kernel failure")
        return run(q, k, v, mask, scale, causal, *rest)

    monkeypatch.setattr(ops, "_run", fails_when_causal)
    model = _form("two_layers").make()
    x = torch.randn(B, N, C)
    optimized = attnopt.optimize(model, (x,))
    sites = optimized.attnopt_report.sites
    assert [s.status for s in sites] == ["rewritten", "restored"], optimized.attnopt_report
    assert "injected kernel failure" in sites[1].reason
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model(x))


class MixedPrecision(nn.Module):
    """fp32 scores and softmax, probabilities cast to fp16 for P·V, fp16 additive mask."""

    def forward(self, q, k, v, mask):
        p = (q @ k.transpose(-2, -1) * 0.25 + mask).softmax(-1)
        return p.to(torch.float16) @ v


def test_mixed_fp32_fp16_site_does_not_crash() -> None:
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8)
    v = torch.randn(2, 3, 7, 8).half()
    mask = torch.zeros(2, 1, 1, 7, dtype=torch.float16)
    mask[0, ..., -2:] = float("-inf")
    model = MixedPrecision()
    optimized = attnopt.optimize(model, (q, k, v, mask))
    assert len(optimized.attnopt_report.rewritten) == 1, optimized.attnopt_report
    got, expected = optimized(q, k, v, mask), model(q, k, v, mask)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)


def test_nan_in_one_query_row_stays_in_that_row() -> None:
    model = _form("matmul_op_mul_scale").make()
    x = torch.randn(B, N, C)
    optimized = attnopt.optimize(model, (x,))
    assert len(optimized.attnopt_report.rewritten) == 1
    x[1, 4, 0] = float("nan")  # one token: one query row (and its key and value rows)
    with torch.no_grad():
        expected, got = model(x), optimized(x)
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    q, k, v = torch.randn(3, 2, 6, 4, 8).unbind(0)
    q[0, 1, 2, 3] = float("nan")
    bare = ops.attention(q, k, v, None, 0.3, False, 0, float("-inf"), 1)
    expected_nan = torch.zeros_like(bare, dtype=torch.bool)
    expected_nan[0, 1, 2] = True  # exactly that query row, all of it
    assert torch.equal(torch.isnan(bare), expected_nan)


def test_bad_model_and_inputs_are_named() -> None:
    x = torch.randn(B, N, C)
    with pytest.raises(UnsupportedModelError, match="nn.Module"):
        attnopt.optimize(lambda t: t, (x,))
    with pytest.raises(UnsupportedModelError, match="nn.Module"):
        attnopt.inspect(object(), (x,))
    model = _form("matmul_op_mul_scale").make()
    with pytest.raises(InputSignatureError, match="str"):
        attnopt.optimize(model, ("not a tensor",))
    with pytest.raises(InputSignatureError, match="no tensor"):
        attnopt.optimize(model, (None,))
    with pytest.raises(InputSignatureError, match="raised RuntimeError"):
        attnopt.optimize(model, (torch.randn(B, N, C + 1),))


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    form = _form("causal_tril_eq0")
    inputs, dynamic = form_inputs(form)
    path = tmp_path_factory.mktemp("robust") / "causal.onnx"
    return export(form.make(), inputs, path, dynamo=False, opset=17, dynamic=dynamic)


def test_onnx_sites_carry_the_torch_kernel_signature(onnx_path) -> None:
    (sig,) = model_signatures(str(onnx_path))
    torch_sig = attnopt.inspect(_form("causal_tril_eq0").make(), (torch.randn(B, N, C),))
    expected = torch_sig.sites[0].kernel_signature
    assert (sig.head_dim, sig.dtype, sig.mask_kind, sig.heads) == (
        expected.head_dim,
        expected.dtype,
        expected.mask_kind,
        expected.heads,
    )


def test_cli_bad_parameter_is_a_usage_error_not_internal() -> None:
    result = CliRunner().invoke(app, ["tune", "b=1,zz=3"])
    assert result.exit_code == 2, result.output
    assert "internal error" not in result.output and "cannot read 'zz=3'" in result.output


def test_scale_from_the_head_dim_keeps_it_static_and_reports_the_scale() -> None:
    form = _form("scale_shape_pow")
    report = attnopt.inspect(form.make(), form.inputs())
    assert len(report.sites) == 1, report.near_misses
    assert "scale=0.3536" in report.sites[0].signature
    assert any("kept static" in note and "q[3]" in note for note in report.notes), report.notes
