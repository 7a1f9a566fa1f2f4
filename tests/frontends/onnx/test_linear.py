"""``attnopt convert --variant linear``: linear sites lowered to standard ONNX ops run in stock
onnxruntime and compute what the torch ``linear`` replacement computes with the same knobs; the
error budget decides per site and for the model, in onnxruntime, as on the torch path."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import attnopt
from attnopt.frontends.onnx.convert import convert
from tests.fixtures import tiny_lm
from tests.onnx_helpers import export, fused_ops

LOOSE = {"rel_l1": 10.0, "cos": -1.0}


@pytest.fixture(scope="module")
def model():
    return tiny_lm.load()


@pytest.fixture(scope="module")
def tokens():
    data = tiny_lm.text_bytes(tiny_lm.HELD_OUT_FILES)
    return tiny_lm.batches(data, 1, 45, 2, seed=7)[0]  # 45: chunks cut mid-sequence


@pytest.fixture(scope="module")
def onnx_path(model, tokens, tmp_path_factory):
    path = tmp_path_factory.mktemp("linear") / "tiny_lm.onnx"
    dynamic = {"tokens": {0: "batch", 1: "seq"}}
    return export(model, {"tokens": tokens}, path, dynamo=False, opset=17, dynamic=dynamic)


def run(path: Path, tokens: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: tokens.numpy()})[0]


@pytest.mark.parametrize("feature_map", ["elu", "relu", "hedgehog"])
def test_linear_model_matches_torch_in_onnxruntime(model, tokens, onnx_path, tmp_path, feature_map):
    knobs = {"linear": {"feature_map": feature_map, "chunk": 16}}
    out = tmp_path / "linear.onnx"
    report = convert(onnx_path, out, variants=("linear",), tolerance=LOOSE, knobs=knobs)
    assert [s.variant for s in report.sites] == ["linear", "linear"]
    assert not fused_ops(out)  # standard ops only, no contrib op
    assert {op.domain for op in onnx.load(str(out)).opset_import} <= {"", "ai.onnx"}
    opt = attnopt.optimize(model, (tokens,), variants=("linear",), tolerance=LOOSE, knobs=knobs)
    with torch.no_grad():
        expected = opt(tokens)
        original = model(tokens)
    got = torch.from_numpy(run(out, tokens))
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 1e-5, rel
    assert ((got - original).norm() / original.norm()).item() > 1e-3  # it is approximate


def test_tight_budget_restores_exact(model, tokens, onnx_path, tmp_path):
    out = tmp_path / "exact.onnx"
    report = convert(onnx_path, out, variants=("linear", "exact"), tolerance={"rel_l1": 1e-4})
    for site in report.sites:
        assert [t.variant for t in site.trials] == ["linear", "exact"]
        assert site.trials[0].decision.startswith("rejected: rel_l1")
        assert site.variant == "exact" and site.status == "rewritten"
    assert fused_ops(out)  # the exact sites are fused ops again
    with torch.no_grad():
        expected = model(tokens).numpy()
    np.testing.assert_allclose(run(out, tokens), expected, rtol=1e-4, atol=1e-4)


def test_model_budget_backs_off(onnx_path, tmp_path):
    budget = {**LOOSE, "model_rel_l1": 1e-4}
    report = convert(onnx_path, tmp_path / "m.onnx", variants=("linear", "exact"), tolerance=budget)
    backed = [s for s in report.sites if any("backed off" in t.decision for t in s.trials)]
    assert backed and all(s.variant == "exact" for s in backed)
    assert report.model_metrics["rel_l1"] <= 1e-4
    loose = convert(onnx_path, tmp_path / "l.onnx", variants=("linear", "exact"), tolerance=LOOSE)
    assert [s.variant for s in loose.sites] == ["linear", "linear"]
    assert loose.model_metrics["rel_l1"] > 1e-4


def test_approximate_convert_needs_the_check(onnx_path, tmp_path):
    with pytest.raises(attnopt.errors.AttnoptError, match="checked in onnxruntime"):
        convert(onnx_path, tmp_path / "x.onnx", variants=("linear",), check=False)


def test_convert_command_variant_linear(onnx_path, tmp_path):
    import json

    from typer.testing import CliRunner

    from attnopt.cli import app

    out = tmp_path / "cli.onnx"
    args = ["convert", str(onnx_path), "-o", str(out), "--variant", "linear", "--variant", "exact"]
    args += ["--tolerance", "rel_l1=10", "--tolerance", "cos=-1", "--knob"]
    args += ["linear.feature_map=elu", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [s["variant"] for s in report["sites"]] == ["linear", "linear"]
    assert all(s["trials"][-1]["knobs"]["feature_map"] == "elu" for s in report["sites"])
    assert report["budget"]["model_rel_l1"] == 10 and out.exists()
