"""``torch.compile`` backend ``attnopt``: rewrite the attention sites of every graph Dynamo hands
over, then pass the graph to an inner backend (Inductor by default).

Each graph (a prefill, a decode step, a piece between graph breaks, a recompile) goes through the
same GraphView -> canonicalize -> detect -> plan -> splice pipeline as an exported graph. Node
shapes come from Dynamo's fake tensors (symbolic where Dynamo made a dim dynamic), so they hold
for every input the graph's guards accept.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from attnopt.errors import AttnoptError
from attnopt.frontends.fx.graph import graph_view
from attnopt.frontends.fx.rewrite import finish, splice
from attnopt.passes.plan import check_variants, plan
from attnopt.report import GraphReport, NearMissReport, Report, SiteReport
from attnopt.rewriter.canonicalize import canonicalize
from attnopt.rewriter.detect import detect
from attnopt.targets import resolve

INNER_BACKENDS = ("inductor", "aot_eager", "eager")

_SHARED_REPORT = Report(model="torch.compile", capture="dynamo", dynamic=True)


def compile_report() -> Report:
    """The graphs and sites of every ``torch.compile(..., backend="attnopt")`` call made without
    its own ``options={"attnopt_report": Report(...)}``, in this process."""
    return _SHARED_REPORT


def _location(where: str) -> str:
    """Dynamo's ``L['self'].model.layers.0.attn`` as ``model.layers.0.attn``."""
    return re.sub(r"^L\['[^']*'\]\.?", "", where) or where


def _size_hints(gm: fx.GraphModule) -> dict[str, int]:
    """Symbol -> example value, read off the fake tensors of the graph's inputs."""
    hints: dict[str, int] = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("example_value")
        sizes = val.shape if isinstance(val, torch.Tensor) else [val]
        for size in sizes:
            if isinstance(size, torch.SymInt) and size.node.hint is not None:
                hints[str(size.node.expr)] = int(size.node.hint)
    return hints


def _with_vals(gm: fx.GraphModule) -> list[fx.Node]:
    """Expose Dynamo's ``example_value`` as ``val`` (what the fx front end reads); returns the
    nodes changed so the graph is handed on as Dynamo made it."""
    added = []
    for node in gm.graph.nodes:
        if "val" not in node.meta and "example_value" in node.meta:
            node.meta["val"] = node.meta["example_value"]
            added.append(node)
    return added


def rewrite_graph(
    gm: fx.GraphModule,
    report: Report,
    variants: tuple[str, ...] = ("exact",),
    target: str = "auto",
) -> GraphReport:
    """Detect and rewrite the attention sites of one Dynamo graph in place."""
    added = _with_vals(gm)
    try:
        try:
            view = canonicalize(graph_view(gm, shapes_hold=True))
            found = detect(view)
        except Exception as err:  # noqa: BLE001 - a graph we cannot read still runs, unchanged
            report.notes.append(
                f"graph {len(report.graphs)} left as it is: detection failed: {err}"
            )
            return report.add_graph("other", [], [])
        hints = _size_hints(gm)
        resolved = resolve(target)
        sites = []
        for choice in plan(found.sites, variants, resolved):
            s = choice.site
            entry = SiteReport(
                _location(s.location),
                s.describe(),
                s.mask_kind,
                s.source,
                kernel_signature=s.signature(hints),
            )
            if choice.chosen is None:
                entry.status, entry.reason = "skipped", "; ".join(choice.reasons)
            else:
                splice(gm, view, s, choice.chosen.replacement(s))
                entry.variant, entry.status = choice.chosen.name, "rewritten"
                entry.kernel = "attnopt::attention"
            sites.append(entry)
        finish(gm)
    finally:
        for node in added:
            node.meta.pop("val", None)
    kind = GraphReport.kind_of([s.kernel_signature for s in sites])
    near = [NearMissReport(_location(m.location), m.rule) for m in found.near_misses]
    return report.add_graph(kind, sites, near)


def _inner(name: str, options: dict, mode: str | None) -> Callable:
    if name not in INNER_BACKENDS:
        raise AttnoptError(
            f"attnopt_inner={name!r} is not one of {', '.join(INNER_BACKENDS)}; pass it as "
            "torch.compile(model, backend='attnopt', options={'attnopt_inner': 'eager'})"
        )
    if name == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = {**(list_mode_options(mode) if mode else {}), **options}
        return lambda gm, inputs: compile_fx(gm, inputs, config_patches=patches or None)
    if options:
        raise AttnoptError(f"options {sorted(options)} apply only to attnopt_inner='inductor'")
    return torch._dynamo.lookup_backend(name)


def attnopt_backend(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    *,
    options: dict | None = None,
    mode: str | None = None,
) -> Callable:
    """The ``attnopt`` Dynamo backend. ``options``: ``attnopt_inner`` (``"inductor"``,
    ``"aot_eager"`` or ``"eager"``), ``attnopt_variants``, ``attnopt_target``,
    ``attnopt_report`` (a ``Report`` that collects each graph and its sites; default
    ``compile_report()``), ``attnopt_configure`` (called with each rewritten ``SiteReport``);
    the rest go to Inductor as config patches."""
    options = dict(options or {})
    inner = options.pop("attnopt_inner", "inductor")
    variants = tuple(options.pop("attnopt_variants", ("exact",)))
    target = options.pop("attnopt_target", "auto")
    report = options.pop("attnopt_report", None) or _SHARED_REPORT
    configure = options.pop("attnopt_configure", None)
    approximate = [p.name for p in check_variants(variants) if p.approximate]
    if approximate and inner != "eager":
        raise AttnoptError(
            f"approximate variants {approximate} splice site modules with their own weights, "
            "which only the eager inner backend runs: pass "
            "options={'attnopt_inner': 'eager', 'attnopt_variants': ...}"
        )
    compile_inner = _inner(inner, options, mode)
    graph = rewrite_graph(gm, report, variants, target)
    if configure is not None:  # e.g. install the tuned configs of this graph's sites
        for site in graph.sites:
            if site.status == "rewritten":
                configure(site)
    if inner == "eager":
        _call_directly(gm)
    return compile_inner(gm, example_inputs)


def _call_directly(gm: fx.GraphModule) -> None:
    """A graph run eagerly calls the op's body itself where it needs no autograd (the op's
    dispatch is nothing an eager graph needs otherwise: no tracing, no fake tensors)."""
    from attnopt.codegen.ops import attention_eager

    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.attnopt.attention.default):
        node.target = attention_eager
    gm.recompile()
