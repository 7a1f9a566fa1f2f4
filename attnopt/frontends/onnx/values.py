"""What the small computations of an ONNX graph are known to be.

Exporters compute sizes in the graph (``Shape`` → ``Gather`` → ``Concat`` feeding ``Reshape``,
``Range`` limits, ``Slice`` bounds) and sometimes the attention scale (``1/sqrt`` of a head
dim read with ``Shape``). Detection needs those as numbers: integer vectors are followed
symbolically (entries are ints or sympy sizes from the shape table), and a computation whose
result is one element and whose inputs are all known is evaluated with ``onnx.reference``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import sympy
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from attnopt.frontends.onnx.model import ShapeTable

SMALL = 64  # elements: larger constants are weights or masks, never sizes or scales


@dataclass
class Values:
    ints: dict[str, tuple] = field(default_factory=dict)  # rank <= 1 integer tensors
    consts: dict[str, np.ndarray] = field(default_factory=dict)  # fully known, <= SMALL

    def number(self, name: str) -> int | float | bool | None:
        """The value of a one-element constant."""
        array = self.consts.get(name)
        if array is None or array.size != 1:
            return None
        return array.reshape(()).item()

    def size(self, name: str) -> object:
        """A one-element integer value as an int or a sympy size (None if unknown)."""
        values = self.ints.get(name)
        return values[0] if values is not None and len(values) == 1 else None

    def set_const(self, name: str, array: np.ndarray) -> None:
        if array.size > SMALL:
            return
        self.consts[name] = array
        if array.dtype.kind in "iu" and array.ndim <= 1:
            self.ints[name] = tuple(int(x) for x in array.ravel())


def constant_of(node: onnx.NodeProto) -> np.ndarray | None:
    """The tensor a ``Constant`` node holds (None for sparse and string constants)."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_int"):
            return np.array(onnx.helper.get_attribute_value(attr))
        if attr.name in ("value_floats", "value_ints"):
            return np.array(list(onnx.helper.get_attribute_value(attr)))
    return None


def known_values(model: onnx.ModelProto, shapes: ShapeTable) -> Values:
    values = Values()
    for init in model.graph.initializer:
        if math.prod(init.dims) <= SMALL:
            values.set_const(init.name, numpy_helper.to_array(init))
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            _evaluate(values, node, shapes)
        except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError, RuntimeError):
            continue  # a value that cannot be followed stays unknown
    return values


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _ints(values: Values, node: onnx.NodeProto, index: int) -> tuple | None:
    if index >= len(node.input) or not node.input[index]:
        return None
    return values.ints.get(node.input[index])


def _floor_div(a: object, b: object) -> object:
    if isinstance(a, int) and isinstance(b, int):
        return int(a / b)  # ONNX integer Div truncates
    return sympy.floor(sympy.sympify(a) / b)


_ARITHMETIC: dict[str, Callable] = {
    "Add": operator.add,
    "Sub": operator.sub,
    "Mul": operator.mul,
    "Div": _floor_div,
    "Min": lambda a, b: min(a, b) if isinstance(a, int) and isinstance(b, int) else sympy.Min(a, b),
    "Max": lambda a, b: max(a, b) if isinstance(a, int) and isinstance(b, int) else sympy.Max(a, b),
}
_SAME_VALUES = {"Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten"}


def _evaluate(values: Values, node: onnx.NodeProto, shapes: ShapeTable) -> None:
    op, out = node.op_type, node.output[0]
    if op == "Constant":
        array = constant_of(node)
        if array is not None:
            values.set_const(out, array)
        return
    result = _symbolic(values, node, shapes)
    if result is not None:
        values.ints[out] = result
        if all(isinstance(x, int) for x in result):
            values.set_const(out, np.array(result, dtype=np.int64))
        return
    inputs = [name for name in node.input if name]
    shape = shapes.shape(out)
    if (
        len(node.output) == 1
        and inputs
        and all(name in values.consts for name in inputs)
        and shape is not None
        and all(isinstance(s, int) for s in shape)
        and math.prod(shape) == 1
        and not any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute)
    ):
        feeds = {name: values.consts[name] for name in inputs}
        (array,) = ReferenceEvaluator(node).run(None, feeds)
        values.set_const(out, np.asarray(array))


def _symbolic(values: Values, node: onnx.NodeProto, shapes: ShapeTable) -> tuple | None:
    """Integer vectors through the ops exporters compute sizes with."""
    op = node.op_type
    if op == "Shape":
        shape = shapes.shape(node.input[0])
        if shape is None:
            return None
        start, end = _attr(node, "start", 0), _attr(node, "end", None)
        return tuple(shape[start:end])
    if op in _SAME_VALUES or (op == "Cast" and _attr(node, "to") in _INT_TYPES):
        return _ints(values, node, 0)
    if op == "Gather" and _attr(node, "axis", 0) == 0:
        data, index = _ints(values, node, 0), _ints(values, node, 1)
        if data is None or index is None:
            return None
        return tuple(data[i] for i in index)
    if op == "Concat":
        parts = [_ints(values, node, i) for i in range(len(node.input))]
        return None if any(p is None for p in parts) else tuple(x for p in parts for x in p)
    if op in _ARITHMETIC:
        parts = [_ints(values, node, i) for i in range(len(node.input))]
        if any(p is None for p in parts) or not parts:
            return None
        result = parts[0]
        for part in parts[1:]:
            result = _broadcast(_ARITHMETIC[op], result, part)
        return result
    if op == "Slice" and len(node.input) >= 3:
        data, starts, ends = (_ints(values, node, i) for i in range(3))
        steps = _ints(values, node, 4) or (1,)
        if data is None or starts is None or ends is None:
            return None
        return tuple(data[slice(starts[0], ends[0], steps[0])])
    return None


_INT_TYPES = {
    onnx.TensorProto.INT64,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT16,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT64,
    onnx.TensorProto.UINT32,
}


def _broadcast(fn: Callable, a: tuple, b: tuple) -> tuple:
    if len(a) == 1:
        a = a * len(b)
    if len(b) == 1:
        b = b * len(a)
    if len(a) != len(b):
        raise ValueError("shapes do not broadcast")
    return tuple(fn(x, y) for x, y in zip(a, b, strict=True))
