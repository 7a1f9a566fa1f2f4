"""ONNX test support: export test models inside the tests (no model files are committed), with
the dynamo exporter or the TorchScript one and dynamic batch and length, and check a conversion:
site counts, fused ops present, graph interface kept, outputs equal in onnxruntime at the
export's sizes and at others."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

from attnopt.frontends.onnx.convert import convert
from attnopt.frontends.onnx.inputs import random_feeds
from attnopt.report import Report

FUSED = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}


class Positional(nn.Module):
    """Calls ``model(**dict(zip(names, args)))`` (``model(*args)`` without names) and returns
    its tensors as a flat tuple: both exporters take positional inputs and tensor outputs."""

    def __init__(self, model: nn.Module, names: list[str] | None) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args: torch.Tensor):
        if self.names is None:
            out = self.model(*args)
        else:
            out = self.model(**dict(zip(self.names, args, strict=True)))
        if isinstance(out, torch.Tensor):
            return out
        values = out.values() if hasattr(out, "values") else out
        return tuple(v for v in values if isinstance(v, torch.Tensor))


def export(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    path: Path,
    *,
    dynamo: bool,
    opset: int,
    dynamic: dict[str, dict[int, str]],
    keywords: bool = True,
) -> Path:
    """Export ``model`` called with ``inputs`` (as keywords, or positionally in their order) to
    ``path``; ``dynamic`` names each input's dynamic dims (``{"x": {0: "batch", 1: "seq"}}``)."""
    names = list(inputs)
    wrapped = Positional(model, names if keywords else None).eval()
    args = tuple(inputs.values())
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            if dynamo:
                torch.onnx.export(
                    wrapped,
                    args,
                    str(path),
                    dynamo=True,
                    opset_version=opset,
                    input_names=names,
                    dynamic_shapes=(tuple(dynamic.get(n, {}) for n in names),),  # *args
                )
            else:
                torch.onnx.export(
                    wrapped,
                    args,
                    str(path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=names,
                    dynamic_axes={n: d for n, d in dynamic.items() if d},
                )
        finally:
            logging.disable(logging.NOTSET)
    return path


def form_inputs(form) -> tuple[dict[str, torch.Tensor], dict[str, dict[int, str]]]:
    """A form's inputs by name (``x``, ``in1``, ...) and their dynamic dims: batch and
    sequence (``seq``; ``ctx`` for a second, context sequence) where the form has them."""
    from tests.forms import B, H, N

    inputs, dynamic = {}, {}
    for index, tensor in enumerate(form.inputs()):
        name = "x" if index == 0 else f"in{index}"
        inputs[name] = tensor
        if tensor.dim() == 3 and tensor.is_floating_point() and tensor.shape[0] == B:
            dynamic[name] = {0: "batch", 1: "seq" if index == 0 else "ctx"}
        elif tensor.dim() == 2 and tuple(tensor.shape) == (B, N):
            dynamic[name] = {0: "batch", 1: "seq"}  # a padding mask per token
        elif tensor.dim() == 4 and tensor.shape[:2] == (B, H) and tensor.is_floating_point():
            dynamic[name] = {0: "batch", 2: "seq"}  # q, k or v as (batch, heads, seq, head dim)
        elif tensor.dim() == 4 and tensor.shape[0] == B:
            dynamic[name] = {0: "batch", 3: "seq"} | ({} if tensor.shape[2] == 1 else {2: "seq"})
    return inputs, dynamic


def fused_ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node if n.op_type in FUSED]


def _interface(model: onnx.ModelProto) -> list:
    graph = model.graph
    return [(v.name, v.type.SerializeToString()) for v in [*graph.input, *graph.output]]


def _run(path: Path, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def check_conversion(
    path: Path, dims: dict[str, int], sites: int, rewritten: int | None = None, **kwargs
) -> Report:
    """Convert ``path`` and check the result: ``sites`` found, ``rewritten`` (default: all)
    replaced by as many fused ops, inputs and outputs unchanged, outputs equal to 1e-5 (fp32)
    at ``dims`` and with every dynamic size one larger (when the original runs at those)."""
    rewritten = sites if rewritten is None else rewritten
    out = path.with_name(path.stem + ".attnopt.onnx")
    report = convert(path, out, dims=dims, **kwargs)
    assert len(report.sites) == sites, report.to_json()
    assert len(report.rewritten) == rewritten, report.to_json()
    assert len(fused_ops(out)) - len(fused_ops(path)) == rewritten
    original, converted = onnx.load(str(path)), onnx.load(str(out))
    assert _interface(converted) == _interface(original)
    onnx.checker.check_model(str(out))
    tolerance = 2e-3 if "float16" in report.to_json() else 1e-5
    if rewritten:
        assert report.output_error is not None and report.output_error <= tolerance
    for sizes in ({k: v + 1 for k, v in dims.items()}, {**dims, "batch": dims.get("batch", 2) + 1}):
        feeds = random_feeds(original, sizes, seed=1)
        try:
            expected = _run(path, feeds)
        except Exception:  # the model itself fixes some size (a buffer, a static bias)
            continue
        for got, want in zip(_run(out, feeds), expected, strict=True):
            np.testing.assert_allclose(got, want, atol=tolerance, rtol=tolerance)
        break
    else:
        raise AssertionError("the original model runs at no other size")
    return report
