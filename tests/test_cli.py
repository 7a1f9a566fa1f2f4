"""The ``attnopt`` command line as a user meets it: tables, JSON, exit codes, and one line (never
a traceback) for every input it cannot take."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from attnopt.cli import app
from tests.forms import FORMS
from tests.onnx_helpers import export, form_inputs, fused_ops

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    form = next(f for f in FORMS if f.name == "causal_tril_eq0")
    inputs, dynamic = form_inputs(form)
    path = tmp_path_factory.mktemp("cli") / "causal.onnx"
    return export(form.make(), inputs, path, dynamo=False, opset=17, dynamic=dynamic)


def _tiny(path, opset: int = 17, op: str = "Relu", domain: str = ""):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"], domain=domain)], "g", [x], [y])
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


def test_inspect_lists_sites(model_path) -> None:
    result = runner.invoke(app, ["inspect", str(model_path)])
    assert result.exit_code == 0, result.output
    assert "causal" in result.stdout and "MultiHeadAttention" in result.stdout
    assert "[batch×4]" in result.stdout  # signatures are not eaten as rich markup


def test_convert_prints_summary_and_writes_the_model(model_path, tmp_path) -> None:
    out = tmp_path / "out.onnx"
    args = ["convert", str(model_path), "-o", str(out), "--dim", "seq=16", "--dim", "batch=3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "summary" in result.stdout and "latency before → after" in result.stdout
    assert "ms (×" in result.stdout and f"wrote {out}" in result.stdout.replace("\n", "")
    assert fused_ops(out) == ["MultiHeadAttention"]


def test_convert_json(model_path, tmp_path) -> None:
    args = ["convert", str(model_path), "-o", str(tmp_path / "o.onnx"), "--no-check", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["sites"][0]["status"] == "rewritten" and report["latency_ms"] == {}


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "no such file"),
        ("truncated", "not an ONNX model"),
        ("not_onnx", "not an ONNX model"),
        ("opset_9", "opset 9 is not supported"),
        ("unknown_op", "not a valid ONNX model"),
        ("custom_op", "onnxruntime cannot load the original model"),
        ("bad_dim", "expected name=size"),
        ("unknown_dim", "unknown dim(s) width"),
        ("unknown_variant", "unknown variant(s)"),
        ("same_output", "another file than the input"),
    ],
)
def test_bad_input_is_one_line(case, expected, model_path, tmp_path) -> None:
    path, extra = tmp_path / "model.onnx", []
    if case == "truncated":
        data = model_path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "not_onnx":
        path.write_text("name,value\nseq,128\n" * 20)
    elif case == "opset_9":
        _tiny(path, opset=9)
    elif case == "unknown_op":
        _tiny(path, op="NoSuchOp")
    elif case == "custom_op":
        _tiny(path, op="NoSuchOp", domain="com.example")
    elif case == "same_output":
        path = _tiny(path)
    elif case != "missing":
        path = model_path
        extra = {
            "bad_dim": ["--dim", "seq"],
            "unknown_dim": ["--dim", "width=3"],
            "unknown_variant": ["--variant", "magic"],
        }[case]
    out = path if case == "same_output" else tmp_path / "o.onnx"
    result = runner.invoke(app, ["convert", str(path), "-o", str(out), *extra])
    assert result.exit_code == 1, result.output
    assert result.stdout == "" and "Traceback" not in result.output
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("error: ") and expected in line, line


def test_no_arguments_shows_help() -> None:
    result = runner.invoke(app, [])
    assert "inspect" in result.output and "convert" in result.output


def test_tune_is_a_subcommand(tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'tuning.db'}"
    result = runner.invoke(app, ["tune", "--show", "--storage", storage])
    assert result.exit_code == 0, result.output
    assert "no tuned configs" in result.output
    bad = runner.invoke(app, ["tune", "b=1,h=2,n=64,d=0"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output


def tiny_lm_spec():
    """``attnopt optimize tests.test_cli:tiny_lm_spec``: the trained fixture, two batches."""
    import torch

    from tests.fixtures import tiny_lm

    data = tiny_lm.text_bytes(tiny_lm.HELD_OUT_FILES)
    cal = [(b,) for b in tiny_lm.batches(data, 2, 48, 2, seed=4)]
    return tiny_lm.load(), cal[0], cal + [(torch.flip(cal[0][0], dims=[1]),)]


def test_optimize_command_budget_and_knobs(tmp_path) -> None:
    saved = tmp_path / "report.json"
    args = ["optimize", "tests.test_cli:tiny_lm_spec", "--variant", "hybrid", "--variant"]
    args += ["exact", "--tolerance", "rel_l1=0.8", "--tolerance", "cos=0.5"]
    args += ["--knob", "hybrid.window=16", "--knob", "blocks.1/hybrid.feature_map=elu"]
    result = runner.invoke(app, [*args, "-o", str(saved)])
    assert result.exit_code == 0, result.output
    assert "blocks.0" in result.output and "hybrid" in result.output
    report = json.loads(saved.read_text())
    assert report["budget"] == {"rel_l1": 0.8, "cos": 0.5, "model_rel_l1": 0.8, "model_cos": 0.5}
    kept = [site["trials"][-1] for site in report["sites"]]
    assert [t["knobs"]["window"] for t in kept] == [16, 16]
    assert [t["knobs"]["feature_map"] for t in kept] == ["hedgehog", "elu"]
    assert all(site["variant"] == "hybrid" for site in report["sites"])


def test_optimize_command_search_json() -> None:
    args = ["optimize", "tests.test_cli:tiny_lm_spec", "--variant", "linear", "--variant"]
    args += ["exact", "--tolerance", "rel_l1=0.6", "--search", "--search-trials", "3", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["pareto"] and all(s["trials"] for s in report["sites"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nomodule"], "expected module:factory"),
        (["tests.no_such_module:f"], "cannot import"),
        (["tests.test_cli:missing"], "has no callable missing"),
        (["tests.test_cli:tiny_lm_spec", "--tolerance", "rel_l1=x"], "expected metric=value"),
        (["tests.test_cli:tiny_lm_spec", "--knob", "window=3"], "expected variant.knob=value"),
    ],
)
def test_optimize_command_bad_input(args, message) -> None:
    result = runner.invoke(app, ["optimize", *args])
    assert result.exit_code == 1 and message in result.output, result.output


def test_knob_switches_parse_as_bools() -> None:
    from attnopt.cli import _knobs

    parsed = _knobs(["quant.quant_projections=true", "blocks.1/quant.quant_projections=False"])
    assert parsed == {
        "quant": {"quant_projections": True},
        "blocks.1": {"quant": {"quant_projections": False}},
    }
