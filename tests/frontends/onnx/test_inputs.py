"""Verification inputs for ONNX models: composite dims from their parts, sizes within the
position table (config.json or the graph), integer inputs the model's tables accept."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from attnopt.errors import OnnxModelError
from attnopt.frontends.onnx import inputs as onnx_inputs

TOTAL = "past_sequence_length + sequence_length"
VOCAB, POSITIONS = 50, 48


def _decoder_inputs(with_positions: bool = True) -> onnx.ModelProto:
    """The interface of an optimum decoder with past: ids (reshaped before the embedding),
    a mask over past + new, position ids gathered from a position table, one past key."""
    ints = TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("input_ids", ints, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", ints, ["batch_size", TOTAL]),
        helper.make_tensor_value_info(
            "past_key_values.0.key", TensorProto.FLOAT, ["batch_size", 2, "past_sequence_length", 4]
        ),
    ]
    tables = [numpy_helper.from_array(np.ones((VOCAB, 4), np.float32), "wte")]
    nodes = [
        helper.make_node("Flatten", ["input_ids"], ["flat_ids"], axis=0),
        helper.make_node("Gather", ["wte", "flat_ids"], ["tokens"]),
        helper.make_node("ReduceSum", ["attention_mask"], ["mask_sum"]),
    ]
    outputs = [
        helper.make_tensor_value_info("tokens", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("mask_sum", ints, None),
    ]
    if with_positions:
        inputs.append(
            helper.make_tensor_value_info("position_ids", ints, ["batch_size", "sequence_length"])
        )
        tables.append(numpy_helper.from_array(np.ones((POSITIONS, 4), np.float32), "wpe"))
        nodes.append(helper.make_node("Gather", ["wpe", "position_ids"], ["positions"]))
        outputs.append(helper.make_tensor_value_info("positions", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, tables)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_composite_dims_evaluated_from_their_parts() -> None:
    model = _decoder_inputs()
    assert onnx_inputs.base_dims(model) == [
        "batch_size",
        "sequence_length",
        "past_sequence_length",
    ]
    dims = onnx_inputs.resolve_dims(model, {"sequence_length": 3, "past_sequence_length": 5})
    assert dims[TOTAL] == 8
    feeds = onnx_inputs.random_feeds(model, dims)
    assert feeds["attention_mask"].shape == (2, 8)
    assert feeds["past_key_values.0.key"].shape == (2, 2, 5, 4)
    # positions continue after the past, for every row
    np.testing.assert_array_equal(feeds["position_ids"], [[5, 6, 7]] * 2)


def test_dim_option_takes_base_dims_only() -> None:
    model = _decoder_inputs()
    with pytest.raises(OnnxModelError, match="give its parts"):
        onnx_inputs.resolve_dims(model, {TOTAL: 24})
    with pytest.raises(OnnxModelError, match="unknown dim"):
        onnx_inputs.resolve_dims(model, {"seq": 24})


def test_sizes_stay_within_the_position_table_of_the_graph() -> None:
    model = _decoder_inputs()
    bounds = onnx_inputs.limits(model)
    assert (bounds.positions, bounds.source) == (POSITIONS, "the position table")
    dims = onnx_inputs.resolve_dims(model, None, bounds)
    assert dims[TOTAL] <= POSITIONS and dims["sequence_length"] > 1
    feeds = onnx_inputs.random_feeds(model, dims, bounds=bounds)
    assert feeds["input_ids"].max() < VOCAB and feeds["position_ids"].max() < POSITIONS
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    sess.run(None, feeds)  # the model accepts them
    assert "positions ≤ 48" in onnx_inputs.describe(dims, bounds)


def test_sizes_from_config_json_beside_the_model(tmp_path) -> None:
    """A rotary model has no position table: config.json says how long a sequence can be."""
    model = _decoder_inputs(with_positions=False)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    assert onnx_inputs.limits(model, path).positions is None
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 20}))
    bounds = onnx_inputs.limits(model, path)
    assert (bounds.positions, bounds.source) == (20, "config.json")
    assert onnx_inputs.resolve_dims(model, None, bounds)[TOTAL] <= 20
