"""Run ONNX models in onnxruntime to check a conversion: inputs, sessions, errors, latency.

Inputs are random but plausible: floats from a normal distribution, integer inputs that index
an embedding table within its rows, ``*mask*`` inputs mostly ones (the first row padded at the
end), bool inputs mostly true with every query keeping its first key.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from attnopt.errors import OnnxModelError
from attnopt.rewriter.onnx_model import MAX_MODEL_BYTES
from attnopt.validate import max_error as _max_error
from attnopt.validate import tolerance_for

DEFAULT_BATCH = 2
DEFAULT_SIZE = 128  # any other dynamic size (sequence length, ...)
PROVIDERS = ["CPUExecutionProvider"]


def input_dims(model: onnx.ModelProto) -> list[str]:
    """The names of the graph inputs' symbolic dims, in order of appearance."""
    names: dict[str, None] = {}
    for value in _feedable(model):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param:
                names[dim.dim_param] = None
    return list(names)


def resolve_dims(model: onnx.ModelProto, dims: dict[str, int] | None) -> dict[str, int]:
    """A size for every symbolic input dim: the user's, else batch-like 2, others 128."""
    dims = dict(dims or {})
    names = input_dims(model)
    unknown = sorted(set(dims) - set(names))
    if unknown:
        have = ", ".join(names) or "none"
        raise OnnxModelError(f"unknown dim(s) {', '.join(unknown)}; the model's dims: {have}")
    return {
        name: dims.get(name, DEFAULT_BATCH if "batch" in name.lower() else DEFAULT_SIZE)
        for name in names
    }


def _feedable(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def _table_rows(model: onnx.ModelProto) -> dict[str, int]:
    """Integer inputs used as ``Gather`` indices into an initializer: how many rows it has."""
    tables = {t.name: t for t in model.graph.initializer}
    rows: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in tables:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            table = tables[node.input[0]]
            rows[node.input[1]] = min(rows.get(node.input[1], 2**62), table.dims[axis])
    return rows


def random_feeds(model: onnx.ModelProto, dims: dict[str, int], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows = _table_rows(model)
    feeds = {}
    for value in _feedable(model):
        tensor = value.type.tensor_type
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else dims.get(d.dim_param, 1)
            for d in tensor.shape.dim
        )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        feeds[value.name] = _random(value.name, shape, dtype, rows.get(value.name), rng)
    return feeds


def _random(name: str, shape: tuple, dtype: np.dtype, rows: int | None, rng) -> np.ndarray:
    if dtype == np.bool_:
        keep = rng.random(shape) > 0.3
        if keep.ndim:
            keep[..., 0] = True
        return keep
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if rows is not None:
        return rng.integers(0, rows, shape).astype(dtype)
    if "mask" in name.lower():
        mask = np.ones(shape, dtype)
        if mask.ndim == 2 and shape[0] > 1 and shape[1] > 4:
            mask[0, -shape[1] // 4 :] = 0
        return mask
    return rng.integers(0, 2, shape).astype(dtype)


def session(model: onnx.ModelProto | Path, what: str, fuse: bool = True) -> ort.InferenceSession:
    """An onnxruntime session on the CPU provider; a model it cannot load is a clear error.

    ``fuse=False`` keeps onnxruntime from fusing attention itself (basic optimizations only),
    so a reference computed with it is the model's own decomposed attention."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not fuse:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() >= MAX_MODEL_BYTES:
            raise OnnxModelError(f"{what} is over 2 GB: save it and pass its path")
        source: bytes | str = model.SerializeToString()
    else:
        source = str(model)
    try:
        return ort.InferenceSession(source, options, providers=PROVIDERS)
    except Exception as err:  # onnxruntime raises its own exception types
        raise OnnxModelError(f"onnxruntime cannot load {what} ({_first_line(err)})") from None


def run(sess: ort.InferenceSession, feeds: dict, what: str) -> dict[str, np.ndarray]:
    try:
        outputs = sess.run(None, feeds)
    except Exception as err:
        raise OnnxModelError(
            f"onnxruntime cannot run {what} on random inputs ({_first_line(err)}); "
            "give the dynamic sizes with --dim name=value"
        ) from None
    return {o.name: v for o, v in zip(sess.get_outputs(), outputs, strict=True)}


def _first_line(err: Exception) -> str:
    text = str(err).replace("\x1b[1;31m", "").replace("\x1b[m", "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def max_error(candidate: np.ndarray, reference: np.ndarray) -> float:
    """attnopt's one error measure (``attnopt.validate.max_error``) on arrays."""
    if candidate.dtype != reference.dtype or candidate.shape != reference.shape:
        return float("inf")
    if not np.issubdtype(reference.dtype, np.floating):
        return 0.0 if np.array_equal(candidate, reference) else float("inf")
    return _max_error(torch.from_numpy(candidate), torch.from_numpy(reference))


def tolerance(reference: np.ndarray, user_tolerance: float | None) -> float:
    return tolerance_for(torch.from_numpy(reference.reshape(-1)[:0]).dtype, user_tolerance)


def compare(candidate: dict, reference: dict) -> float:
    """The worst error over the outputs both runs share by name."""
    return max((max_error(candidate[k], v) for k, v in reference.items()), default=0.0)


def latency_ms(sessions: dict[str, ort.InferenceSession], feeds: dict, budget_s: float = 2.0):
    """Median wall time (ms) of one run of each session, the sessions taking turns so that a
    change in machine load touches all alike; after a warm-up, as many rounds as fit in
    ``budget_s`` (at least 3, at most 200)."""
    for sess in sessions.values():
        sess.run(None, feeds)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    start = time.perf_counter()
    rounds = 0
    while rounds < 3 or (time.perf_counter() - start < budget_s and rounds < 200):
        for name, sess in sessions.items():
            begin = time.perf_counter()
            sess.run(None, feeds)
            times[name].append(time.perf_counter() - begin)
        rounds += 1
    return {name: statistics.median(runs) * 1e3 for name, runs in times.items()}
