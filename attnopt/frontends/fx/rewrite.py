"""Splice replacements into an fx graph (the torch front end's half of the rewrite).

A site's output node keeps existing until validation has compared it with its replacement, so a
site that fails is restored by pointing its users back at it; dead code goes only at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

import attnopt.codegen.ops  # noqa: F401  (defines torch.ops.attnopt.attention)
from attnopt.passes.base import Replacement
from attnopt.rewriter.canonicalize import TracedOperand
from attnopt.rewriter.graph import Const, GraphView
from attnopt.rewriter.projections import Projection, Projections, find_projections
from attnopt.rewriter.site import AttentionSite

aten = torch.ops.aten


@dataclass
class Splice:
    """A site spliced into the graph: ``new`` now feeds the users ``old`` had."""

    site: AttentionSite
    old: fx.Node
    new: fx.Node
    op_call: fx.Node
    replacement: Replacement
    created: list[fx.Node]  # every node the splice inserted, in graph order
    note: str | None = None  # what the splice decided (which projections it replaced, or why not)

    def restore(self) -> None:
        self.new.replace_all_uses_with(self.old)

    def remove(self) -> None:
        """Restore the site and erase what the splice inserted, so none of it runs (a discarded
        candidate must not keep running while the next one is measured)."""
        self.restore()
        for node in reversed(self.created):
            node.graph.erase_node(node)
        self.created = []


def _resolve_op(name: str) -> Any:
    namespace, op = name.split("::")
    return getattr(getattr(torch.ops, namespace), op).default


def _value(
    graph: fx.Graph, view: GraphView, operand: TracedOperand, remap: dict | None = None
) -> fx.Node:
    node = view.handle(operand.source)
    node = (remap or {}).get(node, node)
    if operand.perm is not None:
        node = graph.call_function(aten.permute.default, (node, list(operand.perm)))
    return node


def _sizes(view: GraphView, reshape: str) -> list:
    """The target sizes a reshape node spelled out, as fx arguments."""
    return [o.value if isinstance(o, Const) else view.handle(o) for o in view.operands(reshape)[1:]]


def _cast(graph: fx.Graph, node: fx.Node, have: str | None, want: str | None) -> fx.Node:
    """``node`` (of dtype ``have``) in the site's compute dtype ``want``, when both are known:
    mixed-precision sites (an fp16 mask or V beside fp32 scores) run in one dtype."""
    if have is None or want is None or have in (want, "bool"):
        return node
    return graph.call_function(aten.to.dtype, (node, getattr(torch, want)))


def _mask(graph: fx.Graph, view: GraphView, site: AttentionSite) -> fx.Node | None:
    """One mask tensor: additive terms summed (keep masks folded in as -inf), or one bool mask."""
    additive, keep = None, None
    for term in site.masks:
        value = _value(graph, view, term.operand)
        if term.relayout is not None:
            there, back = (_sizes(view, r) for r in term.relayout)
            value = graph.call_function(aten.expand.default, (value, there))
            value = graph.call_function(aten.reshape.default, (value, back))
        if term.kind == "additive":
            value = _cast(graph, value, view.dtype(term.operand.source), site.dtype)
            if term.multiplier != 1.0:
                value = graph.call_function(aten.mul.Tensor, (value, term.multiplier))
            additive = (
                value
                if additive is None
                else graph.call_function(aten.add.Tensor, (additive, value))
            )
        else:
            if term.kind == "drop":
                value = graph.call_function(aten.logical_not.default, (value,))
            keep = (
                value
                if keep is None
                else graph.call_function(aten.logical_and.default, (keep, value))
            )
    if keep is not None and additive is not None:
        # only reached with fill == -inf (detection refuses other mixes)
        blocked = graph.call_function(aten.where.Scalar, (keep, 0.0, -math.inf))
        return graph.call_function(aten.add.Tensor, (additive, blocked))
    return additive if additive is not None else keep


def splice(
    gm: fx.GraphModule, view: GraphView, site: AttentionSite, replacement: Replacement
) -> Splice:
    """Insert the replacement before the site's output and move the output's users onto it
    (with ``replacement.linear``, the users of the output projection, see ``_project_output``)."""
    graph = gm.graph
    old = view.handle(site.output)
    before = set(graph.nodes)
    found = find_projections(view, site) if replacement.linear is not None else None
    remap: dict[fx.Node, fx.Node] = {}
    with graph.inserting_before(old):
        if isinstance(found, Projections):
            remap = _project_inputs(gm, view, site, found, replacement.linear)
        q = _value(graph, view, site.q, remap)
        k = _value(graph, view, site.k, remap)
        v = _value(graph, view, site.v, remap)
        k = _cast(graph, k, view.dtype(site.k.source), site.dtype)
        v = _cast(graph, v, view.dtype(site.v.source), site.dtype)
        mask = _mask(graph, view, site)
        # a tensor-attention site's second key and value sets follow the standard operands
        pairs = [
            _cast(graph, _value(graph, view, t), view.dtype(t.source), site.dtype)
            for t in (site.k2, site.v2)
            if t is not None
        ]
        attrs = replacement.attrs
        if replacement.module is not None:
            name = _free_name(gm)
            gm.add_submodule(name, replacement.module)
            call = graph.call_module(name, (q, k, v, mask, *pairs))
        else:
            call = graph.call_function(
                _resolve_op(replacement.op),
                (
                    q,
                    k,
                    v,
                    mask,
                    attrs["scale"],
                    attrs["causal"],
                    attrs["window"],
                    attrs["fill"],
                    attrs["kv_group"],
                ),
            )
        new = call
        if site.output_perm is not None:
            new = graph.call_function(aten.permute.default, (new, list(site.output_perm)))
        if site.output_dtype is not None and site.output_dtype != site.dtype:
            new = graph.call_function(aten.to.dtype, (new, getattr(torch, site.output_dtype)))
        note = None
        if isinstance(found, Projections):
            note = _projections_note(found)
            if found.output is not None:
                old, new = _project_output(gm, view, old, new, found.output, replacement.linear)
        elif found is not None:
            note = f"projections kept: {found}"
    old.replace_all_uses_with(new)
    created = [n for n in graph.nodes if n not in before]
    return Splice(site, old, new, call, replacement, created, note)


def _linear_call(gm: fx.GraphModule, view: GraphView, proj: Projection, make) -> fx.Node:
    name = _free_name(gm)
    gm.add_submodule(name, make(proj.weight, proj.bias))
    return gm.graph.call_module(name, (view.handle(proj.input),))


def _copy_between(graph: fx.Graph, remap: dict, targets: list[fx.Node]) -> None:
    """Copy the nodes on every path from ``remap``'s keys to ``targets`` (views, splits, a
    rotary embedding), reading the keys' replacements; ``remap`` gains the copies. The
    originals stay, so the site's original output is still computed from the exact values."""
    below, todo = set(), list(remap)
    while todo:
        for user in todo.pop().users:
            if user not in below:
                below.add(user)
                todo.append(user)
    above, todo = set(), list(targets)
    while todo:
        node = todo.pop()
        if node not in above:
            above.add(node)
            todo.extend(node.all_input_nodes)
    for node in list(graph.nodes):
        if node in below and node in above and node not in remap:
            remap[node] = graph.node_copy(node, lambda a: remap.get(a, a))


def _project_inputs(gm, view, site, found: Projections, make) -> dict:
    """The q/k/v projections as ``make``'s layers and the values between them and the site
    copied onto them: ``{original node: replacement}``."""
    remap = {}
    for proj in found.inputs.values():
        if view.handle(proj.node) not in remap:
            remap[view.handle(proj.node)] = _linear_call(gm, view, proj, make)
    sources = [view.handle(o.source) for o in (site.q, site.k, site.v)]
    _copy_between(gm.graph, remap, sources)
    return remap


def _project_output(gm, view, old: fx.Node, new: fx.Node, proj: Projection, make):
    """The output projection as ``make``'s layer reading ``new``: ``(the original projection's
    node, its replacement)``, which the site is measured and spliced at instead. Inserted before
    the original projection: the views between may read sizes computed after the site."""
    remap, there = {old: new}, view.handle(proj.node)
    with gm.graph.inserting_before(there):
        _copy_between(gm.graph, remap, [view.handle(proj.input)])
        name = _free_name(gm)
        gm.add_submodule(name, make(proj.weight, proj.bias))
        return there, gm.graph.call_module(name, (remap[view.handle(proj.input)],))


def _projections_note(found: Projections) -> str:
    by_node: dict[str, list[str]] = {}
    for name, proj in found.inputs.items():
        by_node.setdefault(proj.node, []).append(name)
    parts = [f"{node} ({'/'.join(names)})" for node, names in by_node.items()]
    if found.output is not None:
        parts.append(f"{found.output.node} (out)")
    note = "projections replaced: " + ", ".join(parts)
    return note if found.no_output is None else f"{note}; out kept: {found.no_output}"


def _is_impure(node: fx.Node) -> bool:
    """Seeded-random ops (SDPA, dropout) count as pure here: a replaced site's dead original
    must go, and its randomness is not observable once nothing reads it. So does an in-place
    op (``masked_fill_``) on a fresh tensor nothing else reads: its mutation is invisible. An
    in-place write to a graph input, a buffer or a view (a KV cache's ``index_copy_``) stays,
    even when the attention that read its result has been replaced."""
    mutated = _mutated_operand(node)
    if mutated is not None:
        fresh = isinstance(mutated, fx.Node) and mutated.op in ("call_function", "call_method")
        fresh = fresh and _target_name(mutated) not in _VIEWS
        return not (fresh and list(mutated.users) == [node])
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        return False
    return node.is_impure()


_VIEWS = {
    "view", "reshape", "slice", "select", "getitem", "transpose", "permute", "expand", "narrow",
    "unsqueeze", "squeeze", "as_strided", "t", "flatten", "unflatten", "split", "chunk", "alias",
    "view_as", "expand_as", "diagonal", "unfold", "contiguous", "detach", "type_as", "to",
}  # fmt: skip


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name.strip("_")


def _mutated_operand(node: fx.Node) -> object | None:
    """The tensor an in-place op writes (its first argument), or None for other nodes."""
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        mutable = node.target._schema.is_mutable
    elif node.op in ("call_function", "call_method"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        mutable = name.endswith("_") and not name.startswith("_")
    else:
        return None
    return (node.args[0] if node.args else None) if mutable else None


SITE_PREFIX = "attnopt_site_"  # submodules holding approximate sites' weights


def _free_name(gm: fx.GraphModule) -> str:
    index = 0
    while hasattr(gm, f"{SITE_PREFIX}{index}"):
        index += 1
    return f"{SITE_PREFIX}{index}"


def finish(gm: fx.GraphModule) -> None:
    """Drop what the spliced sites left dead (site modules included) and regenerate the code."""
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name, _ in list(gm.named_children()):
        if name.startswith(SITE_PREFIX) and name not in called:
            delattr(gm, name)
    gm.graph.lint()
    gm.recompile()
