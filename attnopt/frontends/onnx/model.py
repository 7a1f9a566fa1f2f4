"""Loading, checking and saving ONNX models, and what shape inference knows about their values.

Shapes come from onnxruntime's symbolic shape inference when it succeeds (it follows sizes
through ``Shape``/``Gather``/``Concat`` into ``Reshape``/``Expand``/``Tile``, which ONNX's own
inference leaves unknown), else from ``onnx.shape_inference`` with data propagation. Symbolic
sizes become sympy expressions of the ``dim_param`` names, so equal names are provably equal
sizes; a size neither knows becomes a fresh symbol equal to nothing else.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import sympy
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper

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
    """Write ``model`` (weights in ``<name>.data`` beside it if ``external`` or too large; then
    ``model`` itself points at that file, as ``onnx.save_model`` leaves it)."""
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


def dim_expr(text: str, symbol: Callable[[str], sympy.Symbol] = size_symbol) -> sympy.Expr:
    """A ``dim_param`` as sympy: a name is a symbol, an exporter's expression
    (``Min(32, seq)``, ``2*seq``) is parsed with its names as symbols (never evaluated as code)."""
    if _IDENTIFIER.fullmatch(text) or not _EXPRESSION.match(text):
        return symbol(text)
    from sympy.parsing.sympy_parser import parse_expr, standard_transformations

    names = {n: symbol(n) for n in _IDENTIFIER.findall(text) if n not in _FUNCTIONS}
    allowed = {
        "Integer": sympy.Integer,
        "Float": sympy.Float,
        "Rational": sympy.Rational,
        "Symbol": sympy.Symbol,
        **_FUNCTIONS,
    }
    try:
        expr = parse_expr(
            text, local_dict=names, global_dict=allowed, transformations=standard_transformations
        )
        return sympy.sympify(expr)
    except Exception:  # anything sympy cannot read stays one opaque size
        return symbol(text)


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
    """The shapes of every value of ``model`` (which is left unchanged).

    onnxruntime's inference first; values it left untyped (it stops at an op it cannot follow)
    from ONNX's. The dims each engine invents are its own: only names the model itself uses are
    shared between them, so two engines' ``unk__0`` are never taken for one size."""
    shared = _dim_params(model)
    sources = [("ort", _symbolic(model))]
    produced = {o for n in model.graph.node for o in n.output if o}
    if not produced <= {v.name for v in sources[0][1]}:
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except (onnx.shape_inference.InferenceError, ValueError):
            inferred = model
        graph = inferred.graph
        sources.append(("onnx", [*graph.input, *graph.value_info, *graph.output]))
    table = ShapeTable(method=" + ".join(_ENGINES[name] for name, infos in sources if infos))
    for namespace, infos in sources:

        def symbol(name: str, namespace: str = namespace) -> sympy.Symbol:
            return size_symbol(name if name in shared else f"{namespace}:{name}")

        exprs: dict[str, sympy.Expr] = {}
        for value in infos:
            if value.name in table.values or not value.type.HasField("tensor_type"):
                continue
            tensor = value.type.tensor_type
            shape = None
            if tensor.HasField("shape"):
                shape = tuple(_dim(d, exprs, symbol) for d in tensor.shape.dim)
            table.values[value.name] = ValueInfo(
                shape, DTYPE_NAMES.get(tensor.elem_type), tensor.elem_type
            )
    for init in model.graph.initializer:
        table.values[init.name] = ValueInfo(
            tuple(int(d) for d in init.dims), DTYPE_NAMES.get(init.data_type), init.data_type
        )
    return table


_BROADCASTING = {
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Where", "Sum", "Min", "Max", "And", "Or", "Xor",
    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
}  # fmt: skip
_ENGINES = {"ort": "onnxruntime symbolic shape inference", "onnx": "onnx shape inference"}


def _dim_params(model: onnx.ModelProto) -> set[str]:
    """The dim names the model itself declares (inputs, outputs, stored value_info)."""
    graph = model.graph
    return {
        d.dim_param
        for v in [*graph.input, *graph.value_info, *graph.output]
        for d in v.type.tensor_type.shape.dim
        if d.dim_param
    }


def _dim(dim: onnx.TensorShapeProto.Dimension, exprs: dict, symbol: Callable) -> object:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    if dim.HasField("dim_param") and dim.dim_param:
        if dim.dim_param not in exprs:
            exprs[dim.dim_param] = dim_expr(dim.dim_param, symbol)
        return exprs[dim.dim_param]
    return sympy.Dummy("unknown", integer=True, positive=True)


def _symbolic(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """What onnxruntime's symbolic shape inference learns, as far as it gets.

    Run here with its loop rather than ``infer_shapes`` (which, when it stops early, raises and
    writes the model into the current directory), and without ``auto_merge``, which would take
    two sizes broadcast together for equal although either may be 1. Instead a broadcast of
    sizes it cannot merge is their ``Max``: exactly the size broadcasting gives for every input
    the model accepts (``Max(Min(64, seq), seq)`` is ``seq``)."""
    if model.ByteSize() >= MAX_MODEL_BYTES:
        return []
    from onnxruntime.tools.symbolic_shape_infer import (
        SymbolicShapeInference,
        get_shape_from_value_info,
    )

    class Inference(SymbolicShapeInference):
        def _onnx_infer_single_node(self, node):
            super()._onnx_infer_single_node(node)
            out = self.known_vi_.get(node.output[0]) if node.output else None
            if node.op_type not in _BROADCASTING or out is None:
                return
            shape = get_shape_from_value_info(out)
            if shape is None or not self._is_shape_contains_none_dim(shape):
                return
            inputs = [self._get_shape(node, i) for i in range(len(node.input)) if node.input[i]]
            if any(s is None for s in inputs):
                return
            merged = functools.reduce(self._broadcast_shapes, inputs)
            elem_type = out.type.tensor_type.elem_type
            out.CopyFrom(helper.make_tensor_value_info(out.name, elem_type, merged))

        def _broadcast_shapes(self, shape1, shape2):
            shape = super()._broadcast_shapes(shape1, shape2)
            rank = len(shape)
            first = [1] * (rank - len(shape1)) + list(shape1)
            second = [1] * (rank - len(shape2)) + list(shape2)
            return [
                self._max(a, b) if d is None else d
                for d, a, b in zip(shape, first, second, strict=True)
            ]

        def _max(self, a, b):
            size = sympy.Max(*(self._sympy_dim(d) for d in (a, b)))
            if isinstance(size, sympy.Integer):
                return int(size)
            self.symbolic_dims_.setdefault(str(size), size)
            return str(size)

        def _sympy_dim(self, d):
            if isinstance(d, str):
                return self.symbolic_dims_.get(d, sympy.Symbol(d, integer=True, nonnegative=True))
            return sympy.Integer(d)

    logger = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        inference = Inference(2**31 - 1, False, False, 0)
        inference._preprocess(model)
        while inference.run_:
            inference._infer_impl()
        return list(inference.known_vi_.values())
    except Exception:  # its failures are asserts and KeyErrors on ops it does not know
        return []
    finally:
        logger.setLevel(level)
