"""Loading, checking and saving ONNX models, and what shape inference knows about their values.

Shapes come from onnxruntime's symbolic shape inference when it succeeds (it follows sizes
through ``Shape``/``Gather``/``Concat`` into ``Reshape``/``Expand``/``Tile``, which ONNX's own
inference leaves unknown), else from ``onnx.shape_inference`` with data propagation. Symbolic
sizes become sympy expressions of the ``dim_param`` names, so equal names are provably equal
sizes; a size neither knows becomes a fresh symbol equal to nothing else.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import sympy
from google.protobuf.message import DecodeError
from onnx import TensorProto

from attnopt.errors import OnnxModelError

MIN_OPSET = 10  # input-form Slice; older models: onnx.version_converter first
MAX_MODEL_BYTES = 2**31 - 1  # protobuf's limit; larger models are saved with external data

DTYPE_NAMES = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16",
    TensorProto.DOUBLE: "float64",
    TensorProto.INT8: "int8",
    TensorProto.INT16: "int16",
    TensorProto.INT32: "int32",
    TensorProto.INT64: "int64",
    TensorProto.UINT8: "uint8",
    TensorProto.UINT16: "uint16",
    TensorProto.UINT32: "uint32",
    TensorProto.UINT64: "uint64",
    TensorProto.BOOL: "bool",
}
ELEM_TYPES = {name: elem for elem, name in DTYPE_NAMES.items()}


def opset(model: onnx.ModelProto) -> int:
    """The model's version of the default (``ai.onnx``) domain."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 0


@dataclass
class Loaded:
    model: onnx.ModelProto
    path: Path
    external: bool  # weights were in external data files


def load(path: str | Path) -> Loaded:
    """Read and check a model (external data is read from the model's directory)."""
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise OnnxModelError(f"{path}: not an ONNX model (cannot parse it: {err})") from None
    if not model.graph.node and not model.graph.output:
        raise OnnxModelError(f"{path}: not an ONNX model (no graph in the file)")
    version = opset(model)
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= version <= newest:
        raise OnnxModelError(
            f"{path}: opset {version} is not supported (supported: {MIN_OPSET}-{newest}); "
            "convert it with onnx.version_converter"
        )
    external = any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    try:
        onnx.checker.check_model(str(path))
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except onnx.checker.ValidationError as err:
        raise OnnxModelError(f"{path}: not a valid ONNX model ({_first_line(err)})") from None
    except (OSError, ValueError) as err:
        raise OnnxModelError(f"{path}: cannot read its external data ({err})") from None
    return Loaded(model, path, external)


def save(model: onnx.ModelProto, path: str | Path, external: bool) -> None:
    """Write ``model`` (weights in ``<name>.data`` beside it if ``external`` or too large)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external or model.ByteSize() > MAX_MODEL_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, location=f"{path.name}.data")
    else:
        onnx.save_model(model, str(path))


def check(model: onnx.ModelProto, what: str) -> None:
    """``onnx.checker`` on a model this package produced; a failure is our bug, said plainly."""
    try:
        onnx.checker.check_model(model, full_check=model.ByteSize() < MAX_MODEL_BYTES)
    except onnx.checker.ValidationError as err:
        raise OnnxModelError(f"{what} fails onnx.checker ({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


# -- shapes ---------------------------------------------------------------------------------
_FUNCTIONS = {"Min": sympy.Min, "Max": sympy.Max, "floor": sympy.floor, "ceiling": sympy.ceiling}
_EXPRESSION = re.compile(r"^[A-Za-z0-9_ +\-*/(),]+$")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def size_symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True, positive=True)


def dim_expr(text: str) -> sympy.Expr:
    """A ``dim_param`` as sympy: a name is a symbol, an exporter's expression
    (``Min(32, seq)``, ``2*seq``) is parsed with its names as symbols (never evaluated as code)."""
    if _IDENTIFIER.fullmatch(text) or not _EXPRESSION.match(text):
        return size_symbol(text)
    from sympy.parsing.sympy_parser import parse_expr, standard_transformations

    names = {n: size_symbol(n) for n in _IDENTIFIER.findall(text) if n not in _FUNCTIONS}
    allowed = {
        "Integer": sympy.Integer,
        "Float": sympy.Float,
        "Rational": sympy.Rational,
        "Symbol": sympy.Symbol,
        **_FUNCTIONS,
    }
    try:
        return sympy.sympify(
            parse_expr(
                text,
                local_dict=names,
                global_dict=allowed,
                transformations=standard_transformations,
            )
        )
    except Exception:  # anything sympy cannot read stays one opaque size
        return size_symbol(text)


@dataclass
class ValueInfo:
    shape: tuple | None
    dtype: str | None
    elem_type: int


@dataclass
class ShapeTable:
    """Shape (ints and sympy sizes) and dtype of every value shape inference could type."""

    values: dict[str, ValueInfo] = field(default_factory=dict)
    method: str = ""

    def shape(self, name: str) -> tuple | None:
        info = self.values.get(name)
        return None if info is None else info.shape

    def dtype(self, name: str) -> str | None:
        info = self.values.get(name)
        return None if info is None else info.dtype

    def elem_type(self, name: str) -> int:
        info = self.values.get(name)
        return TensorProto.UNDEFINED if info is None else info.elem_type


def infer_shapes(model: onnx.ModelProto) -> ShapeTable:
    """The shapes of every value of ``model`` (which is left unchanged)."""
    inferred, method = _symbolic(model), "onnxruntime symbolic shape inference"
    if inferred is None:
        method = "onnx shape inference"
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except (onnx.shape_inference.InferenceError, ValueError):
            inferred = model
    table = ShapeTable(method=method)
    exprs: dict[str, sympy.Expr] = {}
    graph = inferred.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            continue
        shape = None
        if tensor.HasField("shape"):
            shape = tuple(_dim(d, exprs) for d in tensor.shape.dim)
        table.values[value.name] = ValueInfo(
            shape, DTYPE_NAMES.get(tensor.elem_type), tensor.elem_type
        )
    for init in graph.initializer:
        table.values[init.name] = ValueInfo(
            tuple(int(d) for d in init.dims), DTYPE_NAMES.get(init.data_type), init.data_type
        )
    return table


def _dim(dim: onnx.TensorShapeProto.Dimension, exprs: dict) -> object:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    if dim.HasField("dim_param") and dim.dim_param:
        if dim.dim_param not in exprs:
            exprs[dim.dim_param] = dim_expr(dim.dim_param)
        return exprs[dim.dim_param]
    return sympy.Dummy("unknown", integer=True, positive=True)


def _symbolic(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """onnxruntime's symbolic inference without ``auto_merge`` (which would assume sizes equal
    whenever broadcasting needs them to be); None where it gives up."""
    if model.ByteSize() >= MAX_MODEL_BYTES:
        return None
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    logger = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level, logger.level = logger.level, logging.ERROR
    try:
        return SymbolicShapeInference.infer_shapes(model, auto_merge=False)
    except Exception:  # its failures are asserts and KeyErrors on ops it does not know
        return None
    finally:
        logger.setLevel(level)
