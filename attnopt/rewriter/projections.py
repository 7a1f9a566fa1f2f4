"""The linear layers around a site: those whose outputs are viewed into q, k, v, and the one
that consumes the attention output (quant's ``quant_projections``, ALGORITHMS.md §6).

Read from the GraphView, not from module names: from each of q, k, v, walk back through ops
that only move or combine the projected values (views, splits, casts, and the elementwise ops
of a rotary embedding) to the linear layers they reach; from the site's output, forward through
views to a linear layer that reads it and nothing else. A linear layer is ``linear`` (ATen or
functional) with a weight parameter, or a matmul by a 2-D parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnopt.rewriter.graph import GraphView
from attnopt.rewriter.site import AttentionSite

#: canonical ops a projected value passes through on its way to q, k or v
_THROUGH = {
    "reshape", "transpose", "getitem", "slice", "cast", "identity", "unsqueeze", "expand",
    "concat", "mul", "add", "sub",
}  # fmt: skip
#: front-end ops left opaque that only split or move values
_OPAQUE_THROUGH = {
    "split", "split_with_sizes", "chunk", "unbind", "narrow", "select", "neg", "unflatten",
    "contiguous", "clone",
}  # fmt: skip
_OUTPUT_THROUGH = {"reshape", "transpose", "cast", "identity"}
_WALK_LIMIT = 64  # nodes visited per operand: a walk that far has left the attention block


@dataclass(frozen=True)
class Projection:
    """A linear layer ``node = input @ weight.T + bias`` found in the graph (view node ids)."""

    node: str
    input: str
    weight: torch.Tensor  # (out, in)
    bias: torch.Tensor | None


@dataclass(frozen=True)
class Projections:
    """The site's input projections (``q``/``k``/``v`` → projection; a fused qkv layer is one
    projection under all three) and its output projection, or why there is none."""

    inputs: dict[str, Projection]
    output: Projection | None
    no_output: str | None = None


def _param(view: GraphView, n: object) -> torch.Tensor | None:
    if isinstance(n, str) and view.op(n) == "param":
        value = view.attrs(n).get("value")
        return value if isinstance(value, torch.Tensor) else None
    return None


def as_linear(view: GraphView, n: str) -> Projection | None:
    """``n`` as a linear layer of a weight parameter, or None."""
    op, operands = view.op(n), view.operands(n)
    if not view.is_real(n) or not operands or not isinstance(operands[0], str):
        return None
    if op == "opaque" and view.attrs(n).get("name") == "linear" and len(operands) in (2, 3):
        weight = _param(view, operands[1])
        bias = _param(view, operands[2]) if len(operands) == 3 else None
        if weight is None or weight.dim() != 2 or (len(operands) == 3 and bias is None):
            return None
        return Projection(n, operands[0], weight, bias)
    if op == "matmul" and len(operands) == 2:
        right = operands[1]
        weight = _param(view, right)
        if weight is not None and weight.dim() == 2:  # x @ W, W (in, out)
            return Projection(n, operands[0], weight.t(), None)
        if isinstance(right, str) and view.op(right) == "transpose":
            weight = _param(view, view.operands(right)[0])
            if weight is not None and weight.dim() == 2:  # x @ W.T, W (out, in)
                return Projection(n, operands[0], weight, None)
    return None


def _passes(view: GraphView, n: str) -> bool:
    op = view.op(n)
    return op in _THROUGH or (op == "opaque" and view.attrs(n).get("name") in _OPAQUE_THROUGH)


def _input_projection(view: GraphView, source: str) -> Projection | str:
    """The one linear layer ``source`` is projected by, or why none."""
    found: dict[str, Projection] = {}
    stops: list[str] = []
    seen, todo = set(), [source]
    while todo and len(seen) < _WALK_LIMIT:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        linear = as_linear(view, n)
        if linear is not None:
            found[n] = linear
        elif _passes(view, n):
            todo.extend(o for o in view.operands(n) if isinstance(o, str))
        elif view.op(n) not in ("param", "constant"):
            stops.append(view.attrs(n).get("name", view.op(n)))
    if len(found) == 1:
        return next(iter(found.values()))
    if found:
        return f"it sums {len(found)} linear layers ({', '.join(sorted(found))})"
    return "it is not computed by a linear layer" + (
        f" (it comes from {', '.join(sorted(set(stops)))})" if stops else ""
    )


def _output_projection(view: GraphView, output: str) -> Projection | str:
    """The linear layer that alone consumes the attention output (through views), or why none."""
    n = output
    for _ in range(_WALK_LIMIT):
        users = view.users(n)
        if len(users) != 1:
            return f"the attention output has {len(users)} readers, not one linear layer"
        (user,) = users
        linear = as_linear(view, user)
        if linear is not None and linear.input == n:
            return linear
        if view.op(user) not in _OUTPUT_THROUGH:
            name = view.attrs(user).get("name", view.op(user))
            return f"the attention output feeds {name}, not a linear layer"
        n = user
    return "no linear layer near the attention output"


def find_projections(view: GraphView, site: AttentionSite) -> Projections | str:
    """The site's projections, or why they cannot be replaced (then none is)."""
    if site.kind != "standard":
        return f"{site.kind} attention"
    inputs = {}
    for name, operand in (("q", site.q), ("k", site.k), ("v", site.v)):
        found = _input_projection(view, operand.source)
        if isinstance(found, str):
            return f"{name}: {found}"
        inputs[name] = found
    output = _output_projection(view, site.output)
    if isinstance(output, str):
        return Projections(inputs, None, output)
    return Projections(inputs, output)
