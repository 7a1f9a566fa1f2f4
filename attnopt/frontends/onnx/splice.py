"""Splice lowered sites into an ONNX model (the ONNX front end's half of the rewrite).

A site's old nodes stay until validation has compared the old value with the new one, so a
site that fails is restored by pointing its users back at the old value; ``finish`` then drops
each kept site's old producer, gives the new value the old name (graph outputs keep theirs)
and prunes only what the rewrite left unused.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import onnx
from onnx import helper

from attnopt.frontends.onnx.rewrite import Lowering


@dataclass
class Splice:
    """A lowering inserted into a model: ``new`` feeds the nodes ``old`` fed."""

    lowering: Lowering
    old: str
    new: str


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [*attr.graphs, *([attr.g] if attr.HasField("g") else [])]:
                yield from _all_nodes(sub)


def _rename_inputs(model: onnx.ModelProto, old: str, new: str, skip: set[str]) -> None:
    """Point inputs named ``old`` at ``new``, except in nodes whose first output is in ``skip``
    (names, not ``id()``s: protobuf wrappers are made afresh on each access and ids recur)."""
    for node in _all_nodes(model.graph):
        if node.output and node.output[0] in skip:
            continue
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def splice(model: onnx.ModelProto, lowering: Lowering) -> Splice:
    """Insert the lowering before the site's producer and move the site's users onto it."""
    graph = model.graph
    old = lowering.site.output
    position = next(i for i, n in enumerate(graph.node) if old in n.output)
    for offset, node in enumerate(lowering.nodes):
        graph.node.insert(position + offset, node)
    for domain in lowering.domains:
        if all(o.domain != domain for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(domain, 1))
    inserted = {n.output[0] for n in lowering.nodes if n.output}
    _rename_inputs(model, old, lowering.output, inserted)
    for old_shape, nodes, new_shape in lowering.shapes:  # before the Shape node they replace
        at = next(i for i, n in enumerate(graph.node) if old_shape in n.output)
        for offset, node in enumerate(nodes):
            graph.node.insert(at + offset, node)
        _rename_inputs(model, old_shape, new_shape, set())
    return Splice(lowering, old, lowering.output)


def restore(model: onnx.ModelProto, spliced: Splice) -> None:
    """Undo a splice: the old value feeds its users again and the lowering's nodes go."""
    _rename_inputs(model, spliced.new, spliced.old, set())
    for old_shape, _, new_shape in spliced.lowering.shapes:
        _rename_inputs(model, new_shape, old_shape, set())
    shape_nodes = [n for _, nodes, _ in spliced.lowering.shapes for n in nodes]
    produced = {n.output[0] for n in [*spliced.lowering.nodes, *shape_nodes]}
    keep = [n for n in model.graph.node if not (n.output and n.output[0] in produced)]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def finish(model: onnx.ModelProto, spliced: list[Splice], unused_before: set[str]) -> None:
    """Drop each kept site's old producer, give its new value the old name, and prune the nodes
    and initializers that became unused (those in ``unused_before`` stay as they were)."""
    graph = model.graph
    olds = {s.old for s in spliced}
    keep = [n for n in graph.node if not olds & set(n.output)]
    del graph.node[:]
    graph.node.extend(keep)
    for s in spliced:
        for node in _all_nodes(graph):
            for i, name in enumerate(node.output):
                if name == s.new:
                    node.output[i] = s.old
        _rename_inputs(model, s.new, s.old, set())
    _prune(model, unused_before)


def unused(model: onnx.ModelProto) -> set[str]:
    """Nodes (by first output) and initializers nothing reads: pruning leaves them alone."""
    used = _used(model)
    nodes = {n.output[0] for n in model.graph.node if n.output and not used & set(n.output)}
    return nodes | {t.name for t in model.graph.initializer if t.name not in used}


def _used(model: onnx.ModelProto) -> set[str]:
    used = {o.name for o in model.graph.output}
    for node in _all_nodes(model.graph):
        used.update(node.input)
    return used


def _prune(model: onnx.ModelProto, unused_before: set[str]) -> None:
    graph = model.graph
    while True:
        used = _used(model)
        keep = [
            n
            for n in graph.node
            if used & set(n.output) or (n.output and n.output[0] in unused_before)
        ]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    used = _used(model)
    inits = [t for t in graph.initializer if t.name in used or t.name in unused_before]
    del graph.initializer[:]
    graph.initializer.extend(inits)
