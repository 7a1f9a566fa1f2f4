"""Verification inputs an ONNX model accepts: a size for every dynamic dim, plausible values.

Exporters name dynamic dims, and a dim that is a sum of others is named by its expression
(optimum writes ``past_sequence_length + sequence_length`` for the attention mask of a decoder
with a KV cache). The user sizes the base dims only; composite dims are evaluated from them.
Sequence sizes stay within the model's position table: ``config.json`` beside the model when
present (``max_position_embeddings``, ``n_positions``), else a ``Gather`` on a table whose
indices are positions (a ``Range``, or an ``arange`` buffer). Integer inputs index their
embedding table within its rows (else the config's ``vocab_size``), ``*mask*`` inputs are mostly
ones (the first row padded at the end), ``*position*`` inputs continue after the past length,
bool inputs are mostly true with every query keeping its first key; floats are normal.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from attnopt.errors import OnnxModelError

DEFAULT_BATCH = 2
DEFAULT_SIZE = 128  # any other dynamic size (sequence length, ...)
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z_0-9.]*")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
#: Ops that only reshape or retype an index.
_VIEW_OPS = {"Reshape", "Flatten", "Unsqueeze", "Squeeze", "Cast", "Identity"}
#: Ops an index passes through on its way from a position source to a ``Gather``.
_INDEX_OPS = {"Unsqueeze", "Squeeze", "Cast", "Slice", "Add", "Sub", "Expand", "Reshape"}


@dataclass
class Limits:
    """What bounds the inputs: the longest sequence the position table takes, the vocabulary,
    and where each was read (for the report)."""

    positions: int | None = None
    vocab: int | None = None
    source: str = ""


def input_dims(model: onnx.ModelProto) -> list[str]:
    """The names of the graph inputs' symbolic dims (composite ones too), in order."""
    names: dict[str, None] = {}
    for value in _feedable(model):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param:
                names[dim.dim_param] = None
    return list(names)


def base_dims(model: onnx.ModelProto) -> list[str]:
    """The dims a user sizes: plain names, and the names composite dims are made of."""
    names: dict[str, None] = {}
    for dim in input_dims(model):
        names.update((n, None) for n in _names(dim))
    return list(names)


def limits(model: onnx.ModelProto, path: str | Path | None = None) -> Limits:
    """The model's position and vocabulary limits, from ``config.json`` beside ``path`` when it
    has them, else (positions) from the graph."""
    found = Limits()
    config = Path(path).parent / "config.json" if path is not None else None
    if config is not None and config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):
            data = {}
        sizes = [data[k] for k in _POSITION_KEYS if isinstance(data.get(k), int)]
        found.positions = sizes[0] if sizes else None
        found.vocab = data.get("vocab_size") if isinstance(data.get("vocab_size"), int) else None
        if found.positions is not None:
            found.source = "config.json"
    if found.positions is None:
        found.positions = _position_rows(model)
        found.source = "the position table" if found.positions is not None else ""
    return found


def resolve_dims(
    model: onnx.ModelProto, dims: dict[str, int] | None, bounds: Limits | None = None
) -> dict[str, int]:
    """A size for every symbolic input dim: the user's for base dims, else batch-like 2 and
    others 128 (less where the position table is shorter); composite dims evaluated."""
    dims = dict(dims or {})
    bounds = bounds or Limits()
    names, base = input_dims(model), base_dims(model)
    composite = sorted(set(dims) - set(base) & set(names))
    if composite:
        raise OnnxModelError(
            f"--dim {composite[0]!r} is computed from other dims: give its parts "
            f"({', '.join(_names(composite[0]))}) instead"
        )
    unknown = sorted(set(dims) - set(base))
    if unknown:
        have = ", ".join(base) or "none"
        raise OnnxModelError(f"unknown dim(s) {', '.join(unknown)}; the model's dims: {have}")
    size = DEFAULT_SIZE
    if bounds.positions is not None:
        parts = max((len(_names(n)) for n in names if not _is_batch(n)), default=1)
        size = max(1, min(DEFAULT_SIZE, bounds.positions // max(parts, 1)))
    resolved = {name: dims.get(name, DEFAULT_BATCH if _is_batch(name) else size) for name in base}
    return with_composites(model, resolved)


def with_composites(model: onnx.ModelProto, dims: dict[str, int]) -> dict[str, int]:
    """``dims`` plus every composite input dim evaluated from them."""
    out = dict(dims)
    for name in input_dims(model):
        if name not in out and all(n in out for n in _names(name)):
            out[name] = _evaluate(name, out)
    return out


def describe(dims: dict[str, int], bounds: Limits) -> str:
    """The note the report carries: the sizes verification used and what bounded them."""
    sizes = ", ".join(f"{k}={v}" for k, v in dims.items()) or "static"
    limit = f" (positions ≤ {bounds.positions}, from {bounds.source})" if bounds.source else ""
    return f"verified at {sizes}{limit}"


def random_feeds(
    model: onnx.ModelProto, dims: dict[str, int], seed: int = 0, bounds: Limits | None = None
) -> dict:
    rng = np.random.default_rng(seed)
    dims = with_composites(model, dims)
    rows = _table_rows(model)
    vocab = (bounds or Limits()).vocab
    feeds = {}
    for value in _feedable(model):
        tensor = value.type.tensor_type
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else dims.get(d.dim_param, 1)
            for d in tensor.shape.dim
        )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        name = value.name
        row_count = rows.get(name, vocab if name.endswith("input_ids") else None)
        if "position" in name.lower() and np.issubdtype(dtype, np.integer) and shape:
            offset = _past_length(model, tensor.shape.dim[-1].dim_param, dims)
            feeds[name] = np.broadcast_to(np.arange(offset, offset + shape[-1]), shape).astype(
                dtype
            )
        else:
            feeds[name] = _random(name, shape, dtype, row_count, rng)
    return feeds


def _is_batch(name: str) -> bool:
    return "batch" in name.lower()


def _names(dim: str) -> list[str]:
    """The base names in a dim expression (``a + b`` -> a, b; a plain name is itself)."""
    return list(dict.fromkeys(_IDENTIFIER.findall(dim))) or [dim]


def _evaluate(expr: str, dims: dict[str, int]) -> int:
    def value(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name | ast.Attribute):
            return dims[ast.unparse(node)]
        raise OnnxModelError(f"cannot evaluate the dim {expr!r}: give --dim for its parts")

    try:
        tree = ast.parse(expr, mode="eval").body
    except SyntaxError:
        raise OnnxModelError(f"cannot read the dim {expr!r}") from None
    return value(tree)


def _past_length(model: onnx.ModelProto, dim: str, dims: dict[str, int]) -> int:
    """How many positions come before a ``dim``-long sequence: a composite dim ``past + dim``
    of another input says (0 when none does)."""
    if not dim:
        return 0
    for name in input_dims(model):
        if name != dim and dim in _names(name):
            return max(0, _evaluate(name, dims) - dims.get(dim, 0))
    return 0


def _feedable(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def _table_rows(model: onnx.ModelProto) -> dict[str, int]:
    """Integer inputs used (reshaped or cast on the way) as ``Gather`` indices into an
    initializer: how many rows it has."""
    tables = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    rows: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in tables:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            index = node.input[1]
            while index in producer and producer[index].op_type in _VIEW_OPS:
                index = producer[index].input[0]
            table = tables[node.input[0]]
            rows[index] = min(rows.get(index, 2**62), table.dims[axis])
    return rows


def _position_rows(model: onnx.ModelProto) -> int | None:
    """Rows of the smallest table gathered at positions (indices from a ``Range``, an
    ``arange`` constant or a ``*position*`` input), the longest sequence the model takes."""
    graph = model.graph
    tables = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    inputs = {v.name for v in _feedable(model) if "position" in v.name.lower()}

    def is_arange(name: str) -> bool:
        array = None
        if name in tables:
            array = numpy_helper.to_array(tables[name])
        elif name in producer and producer[name].op_type == "Constant":
            attr = producer[name].attribute[0]
            array = numpy_helper.to_array(attr.t) if attr.HasField("t") else None
        if array is None or array.size < 2 or not np.issubdtype(array.dtype, np.integer):
            return False
        flat = array.reshape(-1)
        return bool(np.array_equal(flat, np.arange(flat.size)))

    def from_positions(name: str, depth: int) -> bool:
        node = producer.get(name)
        if node is None:
            return name in inputs or is_arange(name)
        if node.op_type == "Range":
            return True
        if node.op_type == "Constant":
            return is_arange(name)
        if node.op_type not in _INDEX_OPS or depth > 8:
            return False
        return any(from_positions(i, depth + 1) for i in node.input[:2] if i)

    rows = [
        tables[n.input[0]].dims[0]
        for n in graph.node
        if n.op_type == "Gather"
        and n.input[0] in tables
        and not any(a.name == "axis" and a.i != 0 for a in n.attribute)
        and from_positions(n.input[1], 0)
    ]
    return min(rows) if rows else None


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
