"""``attnopt tune``: signature parsing, tuning from the command line, ``--show``, errors."""

from __future__ import annotations

import json

import pytest
import typer
from conftest import TOY
from typer.testing import CliRunner

import attnopt
from attnopt.autotune.cli import parse_signature, tune_app
from attnopt.codegen.signature import KernelSignature

SIG = "b=1,h=2,n=256,d=32,dtype=fp32"


def test_parse_signature():
    sig = parse_signature("b=1,h=16,n=4096,d=128,dtype=bf16,causal=1,kv_heads=4")
    assert sig == KernelSignature(
        head_dim=128,
        dtype="bfloat16",
        mask_kind="causal",
        kv_group=4,
        n=4096,
        m=4096,
        heads=16,
        batch=1,
    )
    sig = parse_signature("n=100,m=77,d=64,dv=32,dtype=fp16,mask=sliding_window")
    assert (sig.n, sig.m, sig.value_dim, sig.mask_kind, sig.heads) == (
        100,
        77,
        32,
        "sliding_window",
        8,
    )


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("n=1,d=64,dtype=fp16,colour=red", "cannot read 'colour=red'"),
        ("n=1,d=64,dtype=int3", "cannot read 'dtype=int3'"),
        ("n=1,d=sixty,dtype=fp16", "cannot read 'd=sixty'"),
        ("d=64,dtype=fp16", "needs n=, d= and dtype="),
        ("n=8,d=64,h=6,kv_heads=4,dtype=fp16", "kv_heads=4 must divide h=6"),
    ],
)
def test_bad_signatures_say_what_to_write(text, complaint):
    with pytest.raises(typer.BadParameter, match=complaint):
        parse_signature(text)


def _tune(*args: str):
    return CliRunner(env={"COLUMNS": "200"}).invoke(tune_app, list(args), catch_exceptions=False)


def test_tune_then_show(storage):
    common = ("--kernel", TOY, "--target", "cpu", "--storage", storage)
    tuned = _tune(SIG, "n=200,d=32,dtype=fp32,h=2", *common, "--trials", "6", "--seed", "0")
    assert tuned.exit_code == 0, tuned.output
    assert "toy.blocked" in tuned.output and "float32 d32 none n256 m256" in tuned.output
    shown = _tune("--show", "--json", "--storage", storage)
    rows = json.loads(shown.output)
    assert len(rows) == 1  # n=200 and n=256 share the n=256 bucket: one study
    (row,) = rows
    assert row["key"]["kernel"] == "toy.blocked" and row["key"]["n"] == 256
    assert row["complete"] + row["failed"] == 6 and row["best_ms"] > 0
    table = _tune("--show", "--storage", storage)
    assert table.exit_code == 0 and "toy.blocked" in table.output
    assert "float32 d32 none n256 m256" in table.output and "block_m=" in table.output


def test_tune_json_reports_best_and_default(storage):
    result = _tune(
        SIG,
        "--kernel",
        TOY,
        "--target",
        "cpu",
        "--storage",
        storage,
        "--trials",
        "4",
        "--sampler",
        "grid",
        "--json",
    )
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert row["measured"] == 4 and row["default"] == {"block_m": 16, "block_n": 32, "split": 1}
    assert row["ms"] > 0 and set(row["config"]) == {"block_m", "block_n", "split"}


def test_tune_from_a_torch_model_factory(storage):
    result = _tune(
        f"{TOY}:tiny_model",
        "--kernel",
        TOY,
        "--target",
        "cpu",
        "--storage",
        storage,
        "--trials",
        "3",
        "--json",
    )
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert (
        row["study"].startswith("toy.blocked.exact/cpu/float32/d32/none/") and row["measured"] == 3
    )


def test_model_sources_without_inspect_fail_clearly(monkeypatch, storage):
    monkeypatch.delattr(attnopt, "inspect")
    result = CliRunner().invoke(tune_app, [f"{TOY}:tiny_model", "--storage", storage])
    assert result.exit_code == 2
    assert "needs attnopt.inspect" in result.output


def test_storage_and_kernel_errors_are_one_line_not_a_traceback(tmp_path):
    corrupt = tmp_path / "bad.db"
    corrupt.write_bytes(b"garbage" * 1000)
    result = _tune("--show", "--storage", str(corrupt))
    assert result.exit_code == 1 and "file is not a database" in result.output
    assert "Traceback" not in result.output
    result = _tune(SIG, "--kernel", "no_such_kernel_module", "--storage", str(tmp_path / "ok.db"))
    assert (
        result.exit_code == 1 and "kernel 'no_such_kernel_module' is not available" in result.output
    )
