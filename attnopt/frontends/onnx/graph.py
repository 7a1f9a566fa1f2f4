"""The ONNX front end: a checked, shape-inferred ModelProto seen as a GraphView.

View node ids are ONNX value names (a node's outputs each get one view node; the first carries
the node's meaning, the others are ``opaque``), so a site's q, k, v, masks and output are values
the rewrite can read and replace. A converter per ``op_type`` reads inputs and attributes into
canonical operands, taking slice bounds, ``Range`` limits, axes and scales from the graph's
known values. Ops of other domains, and ops whose inputs cannot be read, are ``opaque``.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from attnopt.frontends.onnx.model import DTYPE_NAMES, ShapeTable, infer_shapes, opset
from attnopt.frontends.onnx.values import Values, constant_of, known_values
from attnopt.rewriter.einsum import einsum_as_matmul
from attnopt.rewriter.graph import Const, GraphView

#: Constants up to this many elements are read into the view (buffers such as a causal
#: ``tril`` table are analysed by value); larger ones are weights and stay unread.
PARAM_VALUE_LIMIT = 2**21
#: Ops that already are fused attention: counted for the report, never rewritten again.
FUSED_ATTENTION = {
    ("", "Attention"),
    ("com.microsoft", "Attention"),
    ("com.microsoft", "MultiHeadAttention"),
    ("com.microsoft", "GroupQueryAttention"),
    ("com.microsoft", "PackedMultiHeadAttention"),
    ("com.microsoft", "SparseAttention"),
}
_COMPARES = {
    "Equal": "eq",
    "Greater": "gt",
    "Less": "lt",
    "GreaterOrEqual": "ge",
    "LessOrEqual": "le",
}
_RESHAPES = {"Reshape", "Flatten", "Squeeze"}


@dataclass
class OnnxGraph:
    """Everything later stages read about one model: the view and what it was built from."""

    model: onnx.ModelProto
    view: GraphView
    shapes: ShapeTable
    values: Values
    opset: int
    fused: dict[str, int]  # op type -> count of attention ops already fused in the model


def analyse(model: onnx.ModelProto) -> OnnxGraph:
    """Shape-infer ``model`` and build its GraphView."""
    shapes = infer_shapes(model)
    values = known_values(model, shapes)
    builder = _Builder(model, shapes, values)
    view = builder.build()
    return OnnxGraph(model, view, shapes, values, opset(model), builder.fused)


def location(node: onnx.NodeProto) -> str:
    """The module path a node was exported from: the dynamo exporter's name scopes, else the
    TorchScript exporter's ``/module/path/Op`` node name."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = [s for s in ast.literal_eval(prop.value)[:-1] if s]
            except (ValueError, SyntaxError):
                break
            if scopes:
                return scopes[-1]
    parts = [p for p in node.name.split("/") if p]
    if len(parts) > 1:
        return ".".join(parts[:-1])
    return node.name or node.output[0]


class _Builder:
    def __init__(self, model: onnx.ModelProto, shapes: ShapeTable, values: Values) -> None:
        self.model = model
        self.shapes = shapes
        self.values = values
        self.opset = opset(model)
        self.view = GraphView(shapes_hold_for_all_inputs=True)
        self.fused: dict[str, int] = {}
        self.read = {o.name for o in model.graph.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in model.graph.node:
            self.read.update(_reads(node))
            self.producer.update((name, node) for name in node.output)
        self.nan_guards, self.nan_tests = _nan_guards(model, self.producer, values)

    # -- helpers used by converters ----------------------------------------------------------
    def rank(self, name: str) -> int | None:
        shape = self.shapes.shape(name)
        return None if shape is None else len(shape)

    def attr(self, node: onnx.NodeProto, name: str, default: object = None) -> object:
        for attr in node.attribute:
            if attr.name == name:
                return onnx.helper.get_attribute_value(attr)
        return default

    def input(self, node: onnx.NodeProto, index: int) -> str | None:
        return node.input[index] if index < len(node.input) and node.input[index] else None

    def ints(self, node: onnx.NodeProto, index: int, attr: str | None = None) -> tuple | None:
        """An integer-vector operand (or, in older opsets, the attribute ``attr``)."""
        name = self.input(node, index)
        if name is not None:
            return self.values.ints.get(name)
        value = self.attr(node, attr) if attr else None
        return None if value is None else tuple(int(v) for v in value)

    def emit(self, node: onnx.NodeProto, op: str, operands: list, **attrs: object) -> None:
        out = node.output[0]
        self.view.add(
            out,
            op,
            operands,
            attrs=attrs,
            shape=self.shapes.shape(out),
            dtype=self.shapes.dtype(out),
            handle=node,
            location=location(node),
        )

    def virtual(self, node: onnx.NodeProto, op: str, operands: list, shape, **attrs) -> str:
        """A view node that is part of ``node`` but not its final value."""
        return self.view.add(
            self.view.fresh_id(node.output[0]),
            op,
            operands,
            attrs=attrs,
            shape=shape,
            dtype=self.shapes.dtype(node.output[0]),
            handle=node,
            real=False,
            location=location(node),
        )

    def opaque(self, node: onnx.NodeProto, name: str | None = None) -> None:
        self.emit(node, "opaque", _reads(node), name=name or node.op_type)

    # -- the walk ----------------------------------------------------------------------------
    def build(self) -> GraphView:
        graph = self.model.graph
        initializers = {init.name: init for init in graph.initializer}
        for value in graph.input:
            self.view.add(
                value.name,
                "input",
                [],
                shape=self.shapes.shape(value.name),
                dtype=self.shapes.dtype(value.name),
                location=value.name,
            )
        for name, init in initializers.items():
            if name not in self.view.g:  # an initializer that is also an input can be fed
                self._constant(name, init, None)
        for node in graph.node:
            self._node(node)
        self.view.add(
            self.view.fresh_id("graph_output"),
            "output",
            [o.name for o in graph.output],
            location="output",
        )
        return self.view

    def _constant(self, name: str, init: onnx.TensorProto | None, node) -> None:
        number = self.values.number(name)
        shape = self.shapes.shape(name)
        dtype = self.shapes.dtype(name)
        if number is not None:
            self.view.add(name, "constant", [], attrs={"value": number}, shape=shape, dtype=dtype)
            return
        value = None
        size = math.prod(init.dims) if init is not None else None
        if size is not None and size <= PARAM_VALUE_LIMIT and init.data_type in DTYPE_NAMES:
            value = _torch(numpy_helper.to_array(init))
        elif node is not None:
            array = constant_of(node)
            value = None if array is None or array.size > PARAM_VALUE_LIMIT else _torch(array)
        self.view.add(
            name,
            "param",
            [],
            attrs={"value": value},
            shape=shape,
            dtype=dtype,
            handle=node,
            location=name,
        )

    def _node(self, node: onnx.NodeProto) -> None:
        domain = "" if node.domain == "ai.onnx" else node.domain
        if (domain, node.op_type) in FUSED_ATTENTION:
            self.fused[node.op_type] = self.fused.get(node.op_type, 0) + 1
        if domain == "" and node.op_type == "Constant":
            self._constant(node.output[0], None, node)
        elif self.values.number(node.output[0]) is not None:
            self.emit(node, "constant", [], value=self.values.number(node.output[0]))
        elif domain == "" and node.op_type in _CONVERTERS:
            _CONVERTERS[node.op_type](self, node)
        else:
            self.opaque(node)
        for extra in node.output[1:]:  # extra outputs nothing reads (Dropout's mask) are left out
            if extra in self.read:
                self.view.add(
                    extra,
                    "opaque",
                    _reads(node),
                    attrs={"name": node.op_type},
                    shape=self.shapes.shape(extra),
                    dtype=self.shapes.dtype(extra),
                    handle=node,
                    location=location(node),
                )


def _torch(array: np.ndarray) -> torch.Tensor | None:
    try:
        return torch.from_numpy(np.array(array))
    except TypeError:  # dtypes torch cannot hold (strings)
        return None


def _reads(node: onnx.NodeProto) -> list[str]:
    """Every value a node reads, those its subgraphs read from the outer scope included."""
    names = [name for name in node.input if name]
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for graph in graphs:
            inner = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
            inner |= {i.name for i in graph.initializer}
            for sub in graph.node:
                names += [n for n in _reads(sub) if n not in inner]
            names += [o.name for o in graph.output if o.name not in inner]
    return list(dict.fromkeys(names))


# -- converters: one per op type, registered by name ----------------------------------------
_CONVERTERS: dict[str, Callable[[_Builder, onnx.NodeProto], None]] = {}


def _converts(*names: str):
    def register(fn):
        for name in names:
            _CONVERTERS[name] = fn
        return fn

    return register


@_converts("MatMul")
def _matmul(b: _Builder, node: onnx.NodeProto) -> None:
    b.emit(node, "matmul", list(node.input[:2]))


@_converts("Transpose")
def _transpose(b: _Builder, node: onnx.NodeProto) -> None:
    rank = b.rank(node.input[0])
    perm = b.attr(node, "perm")
    if perm is None and rank is None:
        b.opaque(node)
        return
    perm = tuple(perm) if perm is not None else tuple(reversed(range(rank)))
    b.emit(node, "transpose", [node.input[0]], perm=perm)


@_converts("Mul", "Add", "Sub")
def _binary(b: _Builder, node: onnx.NodeProto) -> None:
    b.emit(node, node.op_type.lower(), list(node.input[:2]))


@_converts("Div")
def _div(b: _Builder, node: onnx.NodeProto) -> None:
    """``x / c`` by a known scalar is ``x * (1/c)``, as the torch front end reads it."""
    divisor = b.values.number(node.input[1])
    if isinstance(divisor, int | float) and not isinstance(divisor, bool) and divisor != 0:
        b.emit(node, "mul", [node.input[0], Const(1.0 / divisor)])
    else:
        b.emit(node, "div", list(node.input[:2]))


@_converts("Where")
def _where(b: _Builder, node: onnx.NodeProto) -> None:
    guarded = b.nan_guards.get(node.output[0])
    if guarded is not None:  # NaN -> 0: the rewrite keeps it on the site's output
        b.emit(node, "identity", [guarded], nan_to_zero=True)
    else:
        b.emit(node, "where", list(node.input[:3]))


@_converts("IsNaN")
def _isnan(b: _Builder, node: onnx.NodeProto) -> None:
    """The test inside a NaN guard is part of the guard: it is no user of the guarded value."""
    b.emit(node, "opaque", [] if node.output[0] in b.nan_tests else _reads(node), name="IsNaN")


def _nan_guards(
    model: onnx.ModelProto, producer: dict[str, onnx.NodeProto], values: Values
) -> tuple[dict[str, str], set[str]]:
    """``Where`` nodes that only replace NaN by 0, ``Where(IsNaN(x), 0, x)`` or
    ``Where(Not(IsNaN(x)), x, 0)``: each output -> its ``x``; and the tests' outputs."""
    users: dict[str, int] = {o.name: 1 for o in model.graph.output}
    for node in model.graph.node:
        for name in _reads(node):
            users[name] = users.get(name, 0) + 1
    guards, tests = {}, set()
    for node in model.graph.node:
        if node.op_type != "Where" or len(node.input) != 3:
            continue
        test, then, other = node.input
        negated = test in producer and producer[test].op_type == "Not"
        if negated:
            then, other = other, then
            test = producer[test].input[0]
        isnan = producer.get(test)
        if (
            isnan is not None
            and isnan.op_type == "IsNaN"
            and isnan.input[0] == other
            and values.number(then) == 0
            and users.get(isnan.output[0]) == 1
            and (not negated or users.get(node.input[0]) == 1)
        ):
            guards[node.output[0]] = other
            tests.update({node.input[0], isnan.output[0]})
    return guards, tests


@_converts("Softmax", "LogSoftmax")
def _softmax(b: _Builder, node: onnx.NodeProto) -> None:
    """Before opset 13 Softmax flattens the input from ``axis`` on: the same as softmax over
    the last axis only when ``axis`` is the last axis, opaque otherwise. ``LogSoftmax`` stays
    itself, for canonicalization to fold ``Exp(LogSoftmax(x))``."""
    rank = b.rank(node.input[0])
    axis = b.attr(node, "axis", -1 if b.opset >= 13 else 1)
    if rank is None:
        b.opaque(node)
        return
    axis %= rank
    if b.opset < 13 and axis != rank - 1:
        b.opaque(node, f"{node.op_type} (opset < 13, flattening)")
        return
    op = "log_softmax" if node.op_type == "LogSoftmax" else "softmax"
    b.emit(node, op, [node.input[0]], axis=axis)


@_converts("Cast", "CastLike")
def _cast(b: _Builder, node: onnx.NodeProto) -> None:
    b.emit(node, "cast", [node.input[0]], to=b.shapes.dtype(node.output[0]))


@_converts("Identity")
def _identity(b: _Builder, node: onnx.NodeProto) -> None:
    b.emit(node, "identity", [node.input[0]])


@_converts("Dropout")
def _dropout(b: _Builder, node: onnx.NodeProto) -> None:
    """Opset 12 moved ratio and training mode to inputs; an unknown mode counts as training."""
    if b.opset >= 12:
        ratio_name, mode_name = b.input(node, 1), b.input(node, 2)
        ratio = 0.5 if ratio_name is None else b.values.number(ratio_name)
        train = False if mode_name is None else b.values.number(mode_name)
    else:
        ratio, train = b.attr(node, "ratio", 0.5), False
    b.emit(
        node,
        "dropout",
        [node.input[0]],
        p=float(0.5 if ratio is None else ratio),
        train=True if train is None else bool(train),
    )


@_converts("Einsum")
def _einsum(b: _Builder, node: onnx.NodeProto) -> None:
    """Two-operand einsums with one contracted and one free index per side become matmuls."""
    equation = b.attr(node, "equation").decode().replace(" ", "")
    plan = einsum_as_matmul(equation) if len(node.input) == 2 else None
    if plan is None:
        b.opaque(node)
        return
    perm_a, perm_b, perm_out = plan
    left = _maybe_permute(b, node, node.input[0], perm_a)
    right = _maybe_permute(b, node, node.input[1], perm_b)
    if perm_out is None:
        b.emit(node, "matmul", [left, right])
        return
    inv = [perm_out.index(i) for i in range(len(perm_out))]
    out_shape = b.shapes.shape(node.output[0])
    mm_shape = tuple(out_shape[i] for i in inv) if out_shape else None
    product = b.virtual(node, "matmul", [left, right], mm_shape)
    b.emit(node, "transpose", [product], perm=tuple(perm_out))


def _maybe_permute(b: _Builder, node: onnx.NodeProto, value: str, perm: tuple | None) -> str:
    if perm is None:
        return value
    shape = b.shapes.shape(value)
    permuted = tuple(shape[i] for i in perm) if shape else None
    return b.virtual(node, "transpose", [value], permuted, perm=tuple(perm))


@_converts("Expand")
def _expand(b: _Builder, node: onnx.NodeProto) -> None:
    """Expanding a scalar fills a tensor (``torch.ones``/``full`` as the exporters write them)."""
    fill = b.values.number(node.input[0])
    if fill is not None:
        _emit_filled(b, node, fill)
    else:
        b.emit(node, "expand", [node.input[0]])


@_converts("ConstantOfShape")
def _constant_of_shape(b: _Builder, node: onnx.NodeProto) -> None:
    value = b.attr(node, "value")
    fill = numpy_helper.to_array(value).reshape(-1)[0].item() if value is not None else 0.0
    _emit_filled(b, node, fill)


def _emit_filled(b: _Builder, node: onnx.NodeProto, value: object) -> None:
    shape = b.shapes.shape(node.output[0])
    if shape is not None and all(s == 1 for s in shape):
        b.emit(node, "constant", [], value=value)
    else:
        b.emit(node, "full", [], value=value)


@_converts("Tile")
def _tile(b: _Builder, node: onnx.NodeProto) -> None:
    """Tiling only axes of size 1 is broadcasting (how TorchScript exports ``repeat_kv``)."""
    shape, repeats = b.shapes.shape(node.input[0]), b.ints(node, 1)
    if shape is None or repeats is None or len(repeats) != len(shape):
        b.opaque(node)
        return
    if all(r == 1 or s == 1 for s, r in zip(shape, repeats, strict=True)):
        b.emit(node, "expand", [node.input[0]])
    else:
        b.opaque(node)


@_converts(*_RESHAPES)
def _reshape(b: _Builder, node: onnx.NodeProto) -> None:
    """Operands: the input, then (``Reshape``) the target-shape tensor."""
    swapped = _swap_through_views(b, node)
    if swapped is not None:
        rank = len(b.shapes.shape(swapped))
        b.emit(node, "transpose", [swapped], perm=(*range(rank - 2), rank - 1, rank - 2))
        return
    sizes = [node.input[1]] if node.op_type == "Reshape" else []
    b.emit(node, "reshape", [node.input[0], *sizes])


def _swap_through_views(b: _Builder, node: onnx.NodeProto) -> str | None:
    """``x`` when ``node`` is ``reshape(transpose(reshape(x)))`` that merges x's leading axes,
    swaps the last two and splits the leading axes back: how onnxscript spells ``kᵀ`` in its
    SDPA decomposition. Reshapes that keep the last two axes only regroup the batch of
    matrices, so the whole is x with its last two axes swapped."""
    inner = b.producer.get(node.input[0])
    if inner is None or inner.op_type != "Transpose" or node.op_type != "Reshape":
        return None
    flat = b.producer.get(inner.input[0])
    if flat is None or flat.op_type != "Reshape":
        return None
    x = flat.input[0]
    shapes = [b.shapes.shape(name) for name in (x, flat.output[0], node.output[0])]
    if any(s is None or len(s) < 2 for s in shapes):
        return None
    source, merged, out = shapes
    perm = b.attr(inner, "perm")
    swap = (*range(len(merged) - 2), len(merged) - 1, len(merged) - 2)
    same = b.view.same_size
    return (
        x
        if perm is not None
        and tuple(perm) == swap
        and len(out) == len(source)
        and same(merged[-1], source[-1])
        and same(merged[-2], source[-2])
        and all(map(same, out[:-2], source[:-2]))
        and same(out[-1], source[-2])
        and same(out[-2], source[-1])
        else None
    )


@_converts("Unsqueeze")
def _unsqueeze(b: _Builder, node: onnx.NodeProto) -> None:
    axes, rank = b.ints(node, 1, "axes"), b.rank(node.output[0])
    if axes is None or rank is None or len(axes) != 1:
        b.emit(node, "reshape", [node.input[0]])
        return
    b.emit(node, "unsqueeze", [node.input[0]], dim=axes[0] % rank)


@_converts("Slice")
def _slice(b: _Builder, node: onnx.NodeProto) -> None:
    """One view ``slice`` per sliced axis, chained (the last stands for the node's value)."""
    starts, ends = b.ints(node, 1), b.ints(node, 2)
    axes, steps = b.ints(node, 3), b.ints(node, 4)
    shape = b.shapes.shape(node.input[0])
    if starts is None or ends is None or shape is None or (b.input(node, 3) and axes is None):
        b.opaque(node)
        return
    axes = axes or tuple(range(len(starts)))
    steps = steps or (1,) * len(starts)
    cur, rank = node.input[0], len(shape)
    cur_shape = list(shape)
    parts = list(zip(axes, starts, ends, steps, strict=True))
    for index, (axis, start, end, step) in enumerate(parts):
        axis %= rank
        start = start + shape[axis] if isinstance(start, int) and start < 0 else start
        end = end + shape[axis] if isinstance(end, int) and end < 0 else end
        attrs = {"dim": axis, "start": start, "end": end, "step": step}
        if index == len(parts) - 1:
            b.emit(node, "slice", [cur], **attrs)
        else:
            out_shape = b.shapes.shape(node.output[0])
            if out_shape is not None:
                cur_shape[axis] = out_shape[axis]
            cur = b.virtual(node, "slice", [cur], tuple(cur_shape), **attrs)


@_converts("Trilu")
def _trilu(b: _Builder, node: onnx.NodeProto) -> None:
    name = b.input(node, 1)
    diagonal = 0 if name is None else b.values.size(name)
    if diagonal is None:
        b.opaque(node)
        return
    op = "triu" if b.attr(node, "upper", 1) else "tril"
    b.emit(node, op, [node.input[0]], diagonal=diagonal)


@_converts("Range")
def _range(b: _Builder, node: onnx.NodeProto) -> None:
    start, end, step = (b.values.size(node.input[i]) for i in range(3))
    if start is None or end is None or step is None:
        b.opaque(node)
        return
    b.emit(node, "arange", [], start=start, end=end, step=step)


@_converts(*_COMPARES)
def _compare(b: _Builder, node: onnx.NodeProto) -> None:
    b.emit(node, "compare", list(node.input[:2]), cmp=_COMPARES[node.op_type])


@_converts("Not")
def _not(b: _Builder, node: onnx.NodeProto) -> None:
    if node.output[0] in b.nan_tests:
        b.emit(node, "opaque", [], name="Not")
    else:
        b.emit(node, "not", [node.input[0]])


@_converts("And")
def _and(b: _Builder, node: onnx.NodeProto) -> None:
    b.emit(node, "and", list(node.input[:2]))


@_converts("Exp")
def _exp(b: _Builder, node: onnx.NodeProto) -> None:
    b.emit(node, "exp", [node.input[0]])


@_converts("ReduceMax", "ReduceSum")
def _reduce(b: _Builder, node: onnx.NodeProto) -> None:
    axes = b.ints(node, 1, "axes")
    rank = b.rank(node.input[0])
    if axes is None or rank is None or len(axes) != 1 or not isinstance(axes[0], int):
        b.opaque(node)
        return
    op = "sum" if node.op_type == "ReduceSum" else "amax"
    keepdim = bool(b.attr(node, "keepdims", 1))
    b.emit(node, op, [node.input[0]], axis=axes[0] % rank, keepdim=keepdim, returns_tuple=False)


@_converts("Shape")
def _shape(b: _Builder, node: onnx.NodeProto) -> None:
    """Reads only its input's shape: a site may end there (``expand_as(scores)``)."""
    b.emit(node, "shape", [node.input[0]], start=b.attr(node, "start", 0), end=b.attr(node, "end"))
