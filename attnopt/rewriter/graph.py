"""GraphView: one graph type for every front end, so detection is written once.

Each node carries a canonical op name (``matmul``, ``transpose``, ``mul``, ``add``, ``where``,
``softmax``, ``cast``, ...), its operands (node ids or Python constants, in order), attributes
(permutation, axis, ...), the output shape (ints or sympy expressions for symbolic sizes) and
dtype where known, and ``handle``: the front end's own node. Front ends may expand one of their
nodes into several view nodes (an ``einsum`` becomes transposes and a matmul); such nodes share
the handle, and only the node marked ``real`` stands for the front-end node's value.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import networkx as nx


@dataclass(frozen=True)
class Const:
    """A constant operand (a Python number, None, a dtype, a list of sizes, ...)."""

    value: Any


Operand = str | Const


class GraphView:
    """A ``networkx.DiGraph`` of canonical ops with the helpers detection needs."""

    def __init__(self, shapes_hold_for_all_inputs: bool) -> None:
        self.g = nx.DiGraph()
        #: True when recorded shapes are facts for every input the graph accepts (symbolic or
        #: captured static); False when they were only observed on the example inputs.
        self.shapes_hold = shapes_hold_for_all_inputs
        self._fresh = itertools.count()

    def add(
        self,
        node_id: str,
        op: str,
        operands: list[Operand],
        *,
        attrs: dict | None = None,
        shape: tuple | None = None,
        dtype: str | None = None,
        handle: Any = None,
        real: bool = True,
        location: str = "",
    ) -> str:
        """Add a node; edges run from each operand to it (edge label ``index``: position)."""
        self.g.add_node(
            node_id,
            op=op,
            operands=list(operands),
            attrs=dict(attrs or {}),
            shape=shape,
            dtype=dtype,
            handle=handle,
            real=real,
            location=location,
        )
        for index, operand in enumerate(operands):
            if isinstance(operand, str):
                self.g.add_edge(operand, node_id, index=index)
        return node_id

    def fresh_id(self, base: str) -> str:
        return f"{base}#{next(self._fresh)}"

    def replace(self, node_id: str, op: str, operands: list[Operand], **attrs: Any) -> None:
        """Give a node a new canonical meaning (canonicalization), keeping its users."""
        for pred in list(self.g.predecessors(node_id)):
            self.g.remove_edge(pred, node_id)
        data = self.g.nodes[node_id]
        data["op"] = op
        data["operands"] = list(operands)
        data["attrs"] = dict(attrs)
        for index, operand in enumerate(operands):
            if isinstance(operand, str):
                self.g.add_edge(operand, node_id, index=index)

    # -- reading ---------------------------------------------------------------------------
    def op(self, n: str) -> str:
        return self.g.nodes[n]["op"]

    def operands(self, n: str) -> list[Operand]:
        return self.g.nodes[n]["operands"]

    def attrs(self, n: str) -> dict:
        return self.g.nodes[n]["attrs"]

    def shape(self, n: Operand) -> tuple | None:
        return None if isinstance(n, Const) else self.g.nodes[n]["shape"]

    def dtype(self, n: Operand) -> str | None:
        return None if isinstance(n, Const) else self.g.nodes[n]["dtype"]

    def handle(self, n: str) -> Any:
        return self.g.nodes[n]["handle"]

    def is_real(self, n: str) -> bool:
        return self.g.nodes[n]["real"]

    def location(self, n: str) -> str:
        """Where the node comes from in the user's model (a module path), for reports."""
        return self.g.nodes[n]["location"]

    def users(self, n: str) -> list[str]:
        return list(self.g.successors(n))

    def nodes(self, op: str | None = None) -> list[str]:
        """Nodes in insertion (program) order, optionally only those with canonical ``op``."""
        return [n for n, d in self.g.nodes(data=True) if op is None or d["op"] == op]

    def rank(self, n: Operand) -> int | None:
        shape = self.shape(n)
        return None if shape is None else len(shape)

    def same_size(self, a: Any, b: Any) -> bool:
        """Whether two sizes are provably equal for every input the graph accepts."""
        if not self.shapes_hold or a is None or b is None:
            return False
        return bool(a - b == 0)
