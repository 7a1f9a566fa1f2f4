"""Models as users get them from Hugging Face optimum (``optimum-cli export onnx``), decoders
with a KV cache included: ``attnopt convert`` with no ``--dim`` fuses every attention site,
and the converted model's outputs, ``present.*`` included, equal the original's in
onnxruntime, also with left padding that masks every key of some query rows.

The exports come from ``tests/fixtures/export_optimum.py``, run once by ``.ci/export_optimum``
in an environment of its own (optimum-onnx pins an older transformers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from attnopt.cli import app
from attnopt.frontends.onnx import inputs as onnx_inputs
from tests.onnx_helpers import fused_ops

EXPORTS = Path(__file__).parents[1] / "fixtures" / "optimum"
#: file (under EXPORTS) -> attention sites in it
MODELS = {
    "llama/model.onnx": 2,
    "qwen2/model.onnx": 2,
    "mistral/model.onnx": 2,
    "gpt2/model.onnx": 2,
    "bert/model.onnx": 2,
    "t5/encoder_model.onnx": 2,
    "t5/decoder_model.onnx": 4,
    "t5/decoder_with_past_model.onnx": 4,
}

pytestmark = pytest.mark.skipif(
    not all((EXPORTS / name).is_file() for name in MODELS),
    reason=f"optimum exports missing from {EXPORTS}: run .ci/export_optimum first",
)


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(path: Path, model: onnx.ModelProto) -> dict:
    """Small sizes, not the conversion's, with a past where there is one; the second row is
    left-padded past the past, so its first queries see no key at all."""
    sizes = {"sequence_length": 5, "past_sequence_length": 7, "decoder_sequence_length": 3}
    sizes |= {"past_decoder_sequence_length": 6, "encoder_sequence_length": 9}
    base = onnx_inputs.base_dims(model)
    bounds = onnx_inputs.limits(model, path)
    dims = onnx_inputs.resolve_dims(model, {k: v for k, v in sizes.items() if k in base}, bounds)
    feeds = onnx_inputs.random_feeds(model, dims, seed=5, bounds=bounds)
    if "past_sequence_length" in base:
        feeds["attention_mask"][1, : dims["past_sequence_length"] + 2] = 0
    return feeds


@pytest.mark.parametrize("name", list(MODELS))
def test_optimum_export_converted_without_dims(name: str, tmp_path) -> None:
    path = EXPORTS / name
    out = tmp_path / "converted.onnx"
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        app, ["convert", str(path), "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert len(fused_ops(out)) == MODELS[name], result.output
    assert "verified at" in result.output
    model = onnx.load(str(path))
    feeds = _feeds(path, model)
    before, after = _session(path), _session(out)
    names = [o.name for o in before.get_outputs()]
    assert names == [o.name for o in after.get_outputs()]
    for output, want, got in zip(
        names, before.run(None, feeds), after.run(None, feeds), strict=True
    ):
        assert not np.isnan(want).any(), output
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=output)
