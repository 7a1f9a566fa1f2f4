"""The NaN guard exporters put after the softmax (rows whose keys are all masked by -inf give
NaN probabilities, set to 0) is part of the site: the site is fused, and the fused op's output
gets the same guard, so such rows stay 0 where the op alone would give NaN."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from attnopt.frontends.onnx.convert import convert
from tests.onnx_helpers import fused_ops

B, N, S, H = 2, 2, 5, 8


def _attention(guard: str) -> onnx.ModelProto:
    """softmax(q·kᵀ/√H + mask)·v over (B, N, S, H) inputs, the probabilities NaN-guarded."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"]),
        helper.make_node("Mul", ["qk", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "mask"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
        helper.make_node("IsNaN", ["p"], ["nan"]),
    ]
    if guard == "where_isnan":
        nodes.append(helper.make_node("Where", ["nan", "zero", "p"], ["guarded"]))
    else:  # Where(Not(IsNaN(p)), p, 0)
        nodes.append(helper.make_node("Not", ["nan"], ["finite"]))
        nodes.append(helper.make_node("Where", ["finite", "p", "zero"], ["guarded"]))
    nodes.append(helper.make_node("MatMul", ["guarded", "v"], ["out"]))
    inputs = [helper.make_tensor_value_info(x, f, [B, N, S, H]) for x in "qkv"]
    inputs.append(helper.make_tensor_value_info("mask", f, [B, 1, S, S]))
    consts = [
        numpy_helper.from_array(np.array(H**-0.5, np.float32), "scale"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    output = [helper.make_tensor_value_info("out", f, [B, N, S, H])]
    graph = helper.make_graph(nodes, "guarded", inputs, output, consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("guard", ["where_isnan", "where_not_isnan"])
def test_nan_guard_is_part_of_the_site(guard: str, tmp_path) -> None:
    path, out = tmp_path / "model.onnx", tmp_path / "converted.onnx"
    onnx.save(_attention(guard), path)
    report = convert(path, out)
    assert len(report.rewritten) == 1 and not report.near_misses, report.to_json()
    assert fused_ops(out) == ["MultiHeadAttention"]
    rng = np.random.default_rng(0)
    feeds = {x: rng.standard_normal((B, N, S, H)).astype(np.float32) for x in "qkv"}
    mask = np.zeros((B, 1, S, S), np.float32)
    mask[1, 0, 2, :] = -np.inf  # a query that sees no key
    feeds["mask"] = mask
    want, got = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        for p in (path, out)
    )
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(want[1, :, 2], 0.0)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
