"""Run ONNX models in onnxruntime to check a conversion: sessions, errors, latency.

The inputs they run on are ``attnopt.frontends.onnx.inputs``'s.
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
from attnopt.frontends.onnx.model import MAX_MODEL_BYTES
from attnopt.validate import max_error as _max_error
from attnopt.validate import tolerance_for

PROVIDERS = ["CPUExecutionProvider"]


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
