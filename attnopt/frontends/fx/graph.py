"""The torch.fx front end: an exported or traced GraphModule seen as a GraphView.

Handles both ATen graphs from ``torch.export`` and torch-level graphs from
``torch.fx.symbolic_trace``: each fx node is named by a source op (``matmul``, ``transpose``,
``softmax``, ...) and a converter per source op reads its arguments into canonical operands.
Nodes whose op is not attention-relevant become ``opaque`` (detection never walks through them).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from attnopt.rewriter.einsum import einsum_as_matmul
from attnopt.rewriter.graph import Const, GraphView

_FUNCTION_NAMES: dict[Any, str] = {
    operator.matmul: "matmul",
    operator.mul: "mul",
    operator.truediv: "div",
    operator.add: "add",
    operator.sub: "sub",
    operator.getitem: "getitem",
    operator.invert: "bitwise_not",
    operator.and_: "bitwise_and",
    operator.eq: "eq",
    operator.ne: "ne",
    operator.ge: "ge",
    operator.gt: "gt",
    operator.le: "le",
    operator.lt: "lt",
    F.softmax: "softmax",
    F.dropout: "dropout",
    F.scaled_dot_product_attention: "scaled_dot_product_attention",
}
_MODULE_NAMES: dict[type, str] = {nn.Softmax: "softmax", nn.Dropout: "dropout"}
_TRANSPARENT = {"contiguous", "clone", "detach", "alias", "lift_fresh_copy", "detach_"}
_VIEWS = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "view_as"}
_COMPARES = {"eq", "ne", "ge", "gt", "le", "lt"}
_FACTORIES = {"ones": 1, "zeros": 0, "ones_like": 1, "zeros_like": 0, "new_ones": 1, "new_zeros": 0}


def source_op(node: fx.Node, gm: fx.GraphModule) -> str:
    """The op name of an fx node, the same for an ATen overload and its torch-level spelling."""
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
            return target.name().split("::")[-1].split(".")[0]
        if target in _FUNCTION_NAMES:
            return _FUNCTION_NAMES[target]
        return getattr(target, "__name__", str(target))
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return _MODULE_NAMES.get(type(module), type(module).__name__)
    return node.op


def _size(value: Any) -> Any:
    """An int, a sympy expression for a symbolic size, or None."""
    if isinstance(value, fx.Node):
        value = value.meta.get("val")
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        return int(expr) if expr.is_number else expr
    if isinstance(value, int | float | bool) or value is None:
        return value
    return None


def _shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(_size(s) for s in val.shape)
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return tuple(int(s) for s in meta.shape)
    return None


def _dtype(node: fx.Node) -> str | None:
    val = node.meta.get("val")
    dtype = getattr(val, "dtype", None) or getattr(node.meta.get("tensor_meta"), "dtype", None)
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _location(node: fx.Node) -> str:
    """The module path the node was traced in (``transformer.h.0.attn``), else its name."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values() if path and not path.startswith("_")]
    if paths:
        return paths[-1]
    return node.name


class _Builder:
    """Converts one fx graph, node by node, into a GraphView."""

    def __init__(self, gm: fx.GraphModule, shapes_hold: bool) -> None:
        self.gm = gm
        self.view = GraphView(shapes_hold)
        self.state = module_state(gm)

    # -- helpers used by converters ----------------------------------------------------------
    def arg(self, node: fx.Node, index: int, name: str, default: Any = None) -> Any:
        if index < len(node.args):
            return node.args[index]
        return node.kwargs.get(name, default)

    def operand(self, value: Any) -> str | Const:
        """A view operand: fx nodes by name, view ids (str) as they are, anything else constant."""
        if isinstance(value, fx.Node):
            return value.name
        return value if isinstance(value, str) else Const(value)

    def module_of(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None

    def rank(self, value: Any) -> int | None:
        return len(_shape(value)) if isinstance(value, fx.Node) and _shape(value) else None

    def emit(self, node: fx.Node, op: str, operands: list, **attrs: Any) -> None:
        self.view.add(
            node.name,
            op,
            [self.operand(o) for o in operands],
            attrs=attrs,
            shape=_shape(node),
            dtype=_dtype(node),
            handle=node,
            location=_location(node),
        )

    def virtual(self, node: fx.Node, op: str, operands: list, shape=None, **attrs: Any) -> str:
        """A view node that is part of ``node`` but not its final value."""
        return self.view.add(
            self.view.fresh_id(node.name),
            op,
            [self.operand(o) for o in operands],
            attrs=attrs,
            shape=shape,
            dtype=_dtype(node),
            handle=node,
            real=False,
            location=_location(node),
        )

    # -- the walk ------------------------------------------------------------------------------
    def build(self) -> GraphView:
        for node in self.gm.graph.nodes:
            name = source_op(node, self.gm)
            converter = _CONVERTERS.get(name)
            if node.op == "placeholder" and node in self.state:
                self.emit(node, "param", [], value=_lifted(node))
            elif node.op == "placeholder":
                self.emit(node, "input", [])
            elif node.op == "get_attr":
                self.emit(node, "param", [], value=getattr_path(self.gm, str(node.target)))
            elif node.op == "output":
                self.emit(node, "output", list(node.all_input_nodes))
            elif converter is not None:
                converter(self, node)
            else:
                self.emit(node, "opaque", list(node.all_input_nodes), name=name)
        return self.view


def _lifted(node: fx.Node) -> Any:
    """The tensor behind a Dynamo placeholder; None elsewhere."""
    arg = node.meta.get("grapharg")
    return getattr(arg, "example", None) if arg is not None else None


def module_state(gm: fx.GraphModule) -> set[fx.Node]:
    """Dynamo placeholders that hold a module's own tensors (parameters, buffers, tensor
    attributes such as peft's ``prompt_tokens``), reached through the module rather than passed
    to ``forward``, and not written in place by the graph (a cache kept on the module is): a
    prefix computed from them alone is input-independent."""
    state = set()
    for node in gm.graph.find_nodes(op="placeholder"):
        source = getattr(node.meta.get("grapharg"), "source", None)
        chain = []
        while source is not None:
            chain.append(type(source).__name__)
            source = getattr(source, "base", None)
        if any("NNModule" in name or "ParamBuffer" in name for name in chain):
            state.add(node)
    for node in gm.graph.nodes:
        if _in_place(node):
            cur = node.args[0] if node.args else None
            while isinstance(cur, fx.Node):
                state.discard(cur)
                cur = cur.args[0] if cur.args else None
    return state


def _in_place(node: fx.Node) -> bool:
    if node.op not in ("call_method", "call_function"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name == "setitem" or (name.endswith("_") and not name.endswith("__"))


def getattr_path(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part)
    return module


# -- converters: one per source op, registered by name ---------------------------------------
_CONVERTERS: dict[str, Callable[[_Builder, fx.Node], None]] = {}


def _converts(*names: str):
    def register(fn):
        for name in names:
            _CONVERTERS[name] = fn
        return fn

    return register


@_converts("matmul", "bmm", "mm")
def _matmul(b: _Builder, node: fx.Node) -> None:
    b.emit(node, "matmul", [node.args[0], node.args[1]])


@_converts("baddbmm")
def _baddbmm(b: _Builder, node: fx.Node) -> None:
    """``beta·input + alpha·(b1 @ b2)``: a matmul, a scale and an additive mask."""
    inp, b1, b2 = node.args[:3]
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    shape = _shape(node)
    product = b.virtual(node, "matmul", [b1, b2], shape=shape)
    scaled = b.virtual(node, "mul", [product, alpha], shape=shape) if alpha != 1 else product
    if beta == 0:
        b.emit(node, "mul", [scaled, 1.0])
        return
    term = b.virtual(node, "mul", [inp, beta], shape=_shape(inp)) if beta != 1 else inp
    b.emit(node, "add", [scaled, term])


@_converts("einsum")
def _einsum(b: _Builder, node: fx.Node) -> None:
    """Two-operand einsums with one contracted and one free index per side become matmuls."""
    equation = node.args[0].replace(" ", "")
    operands = node.args[1] if isinstance(node.args[1], list | tuple) else node.args[1:]
    plan = einsum_as_matmul(equation) if len(operands) == 2 else None
    if plan is None:  # the equation stays for detectors of other forms (tensor attention)
        b.emit(node, "opaque", list(operands), name="einsum", equation=equation)
        return
    perm_a, perm_b, perm_out = plan
    left = _maybe_permute(b, node, operands[0], perm_a)
    right = _maybe_permute(b, node, operands[1], perm_b)
    if perm_out is None:
        b.emit(node, "matmul", [left, right])
        return
    inv = [perm_out.index(i) for i in range(len(perm_out))]
    out_shape = _shape(node)
    mm_shape = tuple(out_shape[i] for i in inv) if out_shape else None
    product = b.virtual(node, "matmul", [left, right], shape=mm_shape)
    b.emit(node, "transpose", [product], perm=tuple(perm_out))


def _maybe_permute(b: _Builder, node: fx.Node, value: fx.Node, perm: tuple | None):
    if perm is None:
        return value
    shape = _shape(value)
    permuted = tuple(shape[i] for i in perm) if shape else None
    return b.virtual(node, "transpose", [value], shape=permuted, perm=tuple(perm))


@_converts("transpose", "swapaxes", "t", "permute", "mT")
def _transpose(b: _Builder, node: fx.Node) -> None:
    name = source_op(node, b.gm)
    rank = b.rank(node.args[0]) or b.rank(node)
    if rank is None:
        b.emit(node, "opaque", list(node.all_input_nodes), name=name)
        return
    perm = list(range(rank))
    if name == "permute":
        dims = (
            node.args[1]
            if len(node.args) == 2 and isinstance(node.args[1], list | tuple)
            else node.args[1:]
        )
        perm = [d % rank for d in dims]
    elif name in ("t", "mT") or (len(node.args) < 3 and name != "permute"):
        perm[-2], perm[-1] = perm[-1], perm[-2]
    else:
        d0, d1 = node.args[1] % rank, node.args[2] % rank
        perm[d0], perm[d1] = perm[d1], perm[d0]
    b.emit(node, "transpose", [node.args[0]], perm=tuple(perm))


@_converts("getattr")
def _getattr(b: _Builder, node: fx.Node) -> None:
    """Dynamo records tensor properties as ``getattr(x, "mT")``: the transposing ones count."""
    rank = b.rank(node.args[0])
    if node.args[1] != "mT" or rank is None or rank < 2:
        b.emit(node, "opaque", list(node.all_input_nodes), name="getattr")
        return
    perm = list(range(rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    b.emit(node, "transpose", [node.args[0]], perm=tuple(perm))


@_converts("mul", "div", "true_divide", "mul_", "div_")
def _mul(b: _Builder, node: fx.Node) -> None:
    """In-place ``mul_``/``div_`` (and ``add_``, ``masked_fill_``) read as their out-of-place
    op: later uses name the in-place node, and a site's region proves no one else reads the
    mutated value."""
    x, y = node.args[0], node.args[1]
    if source_op(node, b.gm) in ("mul", "mul_"):
        b.emit(node, "mul", [x, y])
    elif isinstance(y, int | float) and y != 0:
        b.emit(node, "mul", [x, 1.0 / y])
    else:
        b.emit(node, "div", [x, y])


@_converts("add", "sub", "add_", "sub_")
def _add(b: _Builder, node: fx.Node) -> None:
    alpha = node.kwargs.get("alpha", 1)
    name = source_op(node, b.gm).rstrip("_")
    if alpha != 1:
        b.emit(node, "opaque", list(node.all_input_nodes), name=name)
    else:
        # a Python-int operand Dynamo made symbolic (a cache length): its value, for positions
        scalars = {
            i: _size(a)
            for i, a in enumerate(node.args[:2])
            if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.SymInt)
        }
        b.emit(node, name, [node.args[0], node.args[1]], scalars=scalars)


@_converts("softmax", "_softmax", "Softmax", "_safe_softmax", "log_softmax", "_log_softmax")
def _softmax(b: _Builder, node: fx.Node) -> None:
    """``softmax`` and ``_safe_softmax`` (SDPA's decomposition: rows that are all -inf give 0,
    which the op's kernels give too) are ``softmax``; ``log_softmax`` is kept as itself for
    canonicalization to fold ``log_softmax(x).exp()``."""
    module = b.module_of(node)
    name = source_op(node, b.gm)
    x = node.args[0]
    axis = module.dim if module is not None else b.arg(node, 1, "dim")
    dtype = None if module is not None else node.kwargs.get("dtype")
    if len(node.args) > 2 and isinstance(node.args[2], torch.dtype):
        dtype = node.args[2]
    rank = b.rank(x)
    op = "log_softmax" if "log_softmax" in name else "softmax"
    if axis is None or rank is None:
        b.emit(node, "opaque", list(node.all_input_nodes), name=op)
        return
    source: Any = x
    if dtype is not None:
        source = b.virtual(node, "cast", [x], shape=_shape(x), dtype=str(dtype))
    b.emit(node, op, [source], axis=axis % rank)


@_converts("to", "_to_copy", "type_as", "float", "half", "bfloat16", "double", "type")
def _cast(b: _Builder, node: fx.Node) -> None:
    dtype = node.kwargs.get("dtype")
    for a in node.args[1:]:
        if isinstance(a, torch.dtype):
            dtype = a
    name = source_op(node, b.gm)
    fixed = {
        "float": torch.float32,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "double": torch.float64,
    }
    dtype = fixed.get(name, dtype)
    if name == "type_as" or (
        dtype is None
        and name in ("to", "_to_copy")
        and node.kwargs.get("device") is None
        and len(node.args) > 1
        and isinstance(node.args[1], fx.Node)
    ):
        b.emit(node, "cast", [node.args[0]], to=_dtype(node))
        return
    if dtype is None:
        b.emit(node, "identity", [node.args[0]])
        return
    b.emit(node, "cast", [node.args[0]], to=str(dtype).removeprefix("torch."))


@_converts(*_TRANSPARENT)
def _identity(b: _Builder, node: fx.Node) -> None:
    b.emit(node, "identity", [node.args[0]])


@_converts("dropout", "Dropout", "native_dropout", "feature_dropout")
def _dropout(b: _Builder, node: fx.Node) -> None:
    module = b.module_of(node)
    if module is not None:
        p, train = module.p, module.training
    else:
        p = b.arg(node, 1, "p", 0.5)
        train = b.arg(node, 2, "train", b.arg(node, 2, "training", True))
    if isinstance(train, fx.Node) or (isinstance(p, fx.Node) and train):
        b.emit(node, "opaque", list(node.all_input_nodes), name="dropout")
        return
    # Dynamo may pass p as a graph input; out of training its value does not matter
    b.emit(node, "dropout", [node.args[0]], p=float(p) if train else 0.0, train=bool(train))


@_converts("masked_fill", "masked_fill_")
def _masked_fill(b: _Builder, node: fx.Node) -> None:
    """``masked_fill_`` too: detection proves the filled tensor has no other reader."""
    x, cond, value = node.args[0], node.args[1], node.args[2]
    b.emit(node, "where", [cond, value, x])


@_converts("where")
def _where(b: _Builder, node: fx.Node) -> None:
    if len(node.args) == 3:
        b.emit(node, "where", list(node.args))
    else:
        b.emit(node, "opaque", list(node.all_input_nodes), name="where")


@_converts("scalar_tensor")
def _scalar_tensor(b: _Builder, node: fx.Node) -> None:
    b.emit(node, "constant", [], value=node.args[0])


@_converts("full", "new_full", "full_like")
def _full(b: _Builder, node: fx.Node) -> None:
    name = source_op(node, b.gm)
    value = (
        node.args[2]
        if name == "new_full"
        else node.args[1]
        if len(node.args) > 1
        else node.kwargs.get("fill_value")
    )
    _emit_filled(b, node, value)


@_converts(*_FACTORIES)
def _factory(b: _Builder, node: fx.Node) -> None:
    _emit_filled(b, node, _FACTORIES[source_op(node, b.gm)])


def _emit_filled(b: _Builder, node: fx.Node, value: Any) -> None:
    shape = _shape(node)
    if shape is not None and all(s == 1 for s in shape):
        b.emit(node, "constant", [], value=value)
    else:
        b.emit(node, "full", [], value=value)


@_converts("arange")
def _arange(b: _Builder, node: fx.Node) -> None:
    args = [_size(a) for a in node.args]
    start, end, step = (0, args[0], 1) if len(args) == 1 else (args + [1])[:3]
    if step is None:
        step = 1
    b.emit(node, "arange", list(node.all_input_nodes), start=start, end=end, step=step)


@_converts("tril", "triu")
def _triangle(b: _Builder, node: fx.Node) -> None:
    diagonal = b.arg(node, 1, "diagonal", 0)
    b.emit(node, source_op(node, b.gm), [node.args[0]], diagonal=_size(diagonal))


@_converts(*_COMPARES)
def _compare(b: _Builder, node: fx.Node) -> None:
    b.emit(node, "compare", [node.args[0], node.args[1]], cmp=source_op(node, b.gm))


@_converts("bitwise_not", "logical_not")
def _not(b: _Builder, node: fx.Node) -> None:
    b.emit(node, "not", [node.args[0]])


@_converts("bitwise_and", "logical_and", "mul_bool")
def _and(b: _Builder, node: fx.Node) -> None:
    b.emit(node, "and", [node.args[0], node.args[1]])


@_converts("unsqueeze")
def _unsqueeze(b: _Builder, node: fx.Node) -> None:
    rank = b.rank(node)
    dim = b.arg(node, 1, "dim")
    b.emit(node, "unsqueeze", [node.args[0]], dim=dim % rank if rank else dim)


@_converts("slice")
def _slice(b: _Builder, node: fx.Node) -> None:
    dim = b.arg(node, 1, "dim", 0)
    start, end = _size(b.arg(node, 2, "start")), _size(b.arg(node, 3, "end"))
    step = b.arg(node, 4, "step", 1)
    rank = b.rank(node)
    b.emit(
        node,
        "slice",
        [node.args[0]],
        dim=dim % rank if rank else dim,
        start=start,
        end=end,
        step=step,
    )


@_converts(*_VIEWS)
def _reshape(b: _Builder, node: fx.Node) -> None:
    """Operands: the input, then the target sizes when the call spells them out."""
    sizes = node.args[1] if len(node.args) == 2 else node.args[1:]
    name = source_op(node, b.gm)
    if name in ("view", "reshape", "_unsafe_view") and isinstance(sizes, list | tuple) and sizes:
        b.emit(node, "reshape", [node.args[0], *sizes])
    else:
        b.emit(node, "reshape", [node.args[0]])


@_converts("expand", "expand_as")
def _expand(b: _Builder, node: fx.Node) -> None:
    """``expand_as(x, other)`` keeps ``other`` as a second operand: it is read for its shape
    only, which detection needs to know when ``other`` is the scores."""
    operands = [node.args[0]] + ([node.args[1]] if source_op(node, b.gm) == "expand_as" else [])
    b.emit(node, "expand", operands)


@_converts("cat", "concat", "concatenate")
def _cat(b: _Builder, node: fx.Node) -> None:
    """A concatenation of tensors along one axis (a prefix joined to the keys, for one)."""
    parts, dim, rank = b.arg(node, 0, "tensors"), b.arg(node, 1, "dim"), b.rank(node)
    nodes = isinstance(parts, list | tuple) and all(isinstance(p, fx.Node) for p in parts)
    if not nodes or rank is None:
        b.emit(node, "opaque", list(node.all_input_nodes), name="cat")
        return
    b.emit(node, "concat", list(parts), axis=(dim or 0) % rank)


@_converts("repeat_interleave")
def _repeat_interleave(b: _Builder, node: fx.Node) -> None:
    repeats = b.arg(node, 1, "repeats")
    dim = b.arg(node, 2, "dim")
    rank = b.rank(node)
    if not isinstance(repeats, int) or dim is None or rank is None:
        b.emit(node, "opaque", list(node.all_input_nodes), name="repeat_interleave")
        return
    b.emit(node, "repeat_interleave", [node.args[0]], repeats=repeats, dim=dim % rank)


@_converts("exp")
def _exp(b: _Builder, node: fx.Node) -> None:
    b.emit(node, "exp", [node.args[0]])


@_converts("amax", "max", "sum")
def _reduce(b: _Builder, node: fx.Node) -> None:
    name = source_op(node, b.gm)
    dim = b.arg(node, 1, "dim")
    keepdim = b.arg(node, 2, "keepdim", False)
    if isinstance(dim, list | tuple) and len(dim) == 1:
        dim = dim[0]
    rank = b.rank(node.args[0])
    if not isinstance(dim, int) or rank is None:
        b.emit(node, "opaque", list(node.all_input_nodes), name=name)
        return
    op = "sum" if name == "sum" else "amax"
    b.emit(
        node,
        op,
        [node.args[0]],
        axis=dim % rank,
        keepdim=bool(keepdim),
        returns_tuple=name == "max",
    )


@_converts("getitem")
def _getitem(b: _Builder, node: fx.Node) -> None:
    source = node.args[0]
    if isinstance(source, fx.Node) and source_op(source, b.gm) == "wrap_with_autocast":
        # export keeps a torch.autocast block as a sub-graph: opaque, named so the near miss
        # says where the attention went
        b.emit(node, "opaque", [source], name="a torch.autocast block (a captured sub-graph)")
        return
    nones = _unit_dims_index(node.args[1])
    if len(nones) == 1:  # x[:, :, None] (HF's repeat_kv under Dynamo): an unsqueeze
        b.emit(node, "unsqueeze", [node.args[0]], dim=nones[0])
        return
    if nones:  # x[None, None, :, None] (HF's mask positions): unit dims added, a reshape
        b.emit(node, "reshape", [node.args[0]])
        return
    b.emit(
        node,
        "getitem",
        [node.args[0]],
        index=node.args[1] if not isinstance(node.args[1], fx.Node) else None,
    )


def _unit_dims_index(index: Any) -> list[int]:
    """The dims ``x[index]`` inserts when the index is only full slices and ``None``s."""
    if not isinstance(index, tuple) or any(i is not None and i != slice(None) for i in index):
        return []
    return [dim for dim, i in enumerate(index) if i is None]


@_converts("scaled_dot_product_attention")
def _sdpa(b: _Builder, node: fx.Node) -> None:
    q, k, v = node.args[:3]
    mask = b.arg(node, 3, "attn_mask")
    b.emit(
        node,
        "sdpa",
        [q, k, v, mask],
        dropout_p=float(b.arg(node, 4, "dropout_p", 0.0)),
        is_causal=bool(b.arg(node, 5, "is_causal", False)),
        scale=b.arg(node, 6, "scale"),
        enable_gqa=bool(b.arg(node, 7, "enable_gqa", False)),
    )


def graph_view(gm: fx.GraphModule, shapes_hold: bool) -> GraphView:
    """The GraphView of ``gm``; ``shapes_hold`` says whether node shapes hold for all inputs."""
    return _Builder(gm, shapes_hold).build()
