"""The report of one optimize()/inspect() run: sites, near misses, capture facts, as a table
on the terminal (rich) or JSON for machines."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from attnopt.codegen.signature import KernelSignature


@dataclass
class VariantTrial:
    """One variant (with its knobs) measured at a site on the calibration batches."""

    variant: str
    knobs: dict
    metrics: dict[str, float]  # cos, rel_l1, rmse, max_error
    decision: str  # "kept", "rejected: <why>" or "backed off: <why>"
    heads: list[dict] = field(default_factory=list)  # per-head figures (variants chosen by head)


@dataclass
class SiteReport:
    location: str
    signature: str
    mask: str
    source: str  # "matmul" (decomposed attention) or "sdpa" (an existing fused call)
    variant: str | None = None  # None: not rewritten
    status: str = "detected"  # detected | rewritten | restored | skipped
    max_error: float | None = None
    kernel: str | None = None
    config: str | None = None
    reason: str | None = None
    kernel_signature: KernelSignature | None = None  # at the example's sizes, for tuning
    graph: int | None = None  # index into Report.graphs when the front end hands several
    trials: list[VariantTrial] = field(default_factory=list)  # with an error budget


@dataclass
class NearMissReport:
    location: str
    rule: str


#: A graph whose sites all have at most this many queries, some reading more keys than queries
#: (a cache), is a decode step.
DECODE_MAX_QUERIES = 16


@dataclass
class GraphReport:
    """One graph a front end handed over (Dynamo: a prefill, a decode step, a piece between graph
    breaks, a recompile) and the sites rewritten in it."""

    index: int
    kind: str  # prefill | decode | other
    sites: list[SiteReport] = field(default_factory=list)

    @staticmethod
    def kind_of(signatures: list[KernelSignature | None]) -> str:
        """``decode``: few queries against a longer key range; ``prefill``: any other graph with
        attention; ``other``: none (signatures are at the graph's example sizes)."""
        known = [s for s in signatures if s is not None]
        if not known:
            return "other"
        if max(s.n for s in known) <= DECODE_MAX_QUERIES and any(s.m > s.n for s in known):
            return "decode"
        return "prefill"


@dataclass
class Report:
    model: str
    capture: str
    dynamic: bool
    dynamic_dims: dict[str, list[int]] = field(default_factory=dict)
    target: str = ""
    sites: list[SiteReport] = field(default_factory=list)
    near_misses: list[NearMissReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    output_error: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)  # e.g. before/after a conversion
    graphs: list[GraphReport] = field(default_factory=list)  # Dynamo: one per compiled graph
    budget: dict[str, float] = field(default_factory=dict)  # approximate variants' error budget
    model_metrics: dict[str, float] = field(default_factory=dict)  # on the calibration batches
    pareto: list[dict] = field(default_factory=list)  # search=True: plans on the front

    def add_graph(self, kind: str, sites: list[SiteReport], near_misses: list) -> GraphReport:
        """Record one more captured graph; its sites join ``sites`` tagged with its index."""
        graph = GraphReport(len(self.graphs), kind, sites)
        for site in sites:
            site.graph = graph.index
        self.graphs.append(graph)
        self.sites.extend(sites)
        self.near_misses.extend(near_misses)
        return graph

    def graphs_of(self, kind: str) -> list[GraphReport]:
        return [g for g in self.graphs if g.kind == kind]

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "rewritten"]

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(asdict(self), indent=indent, default=str)

    def table(self) -> Table:
        table = Table(title=f"attnopt: {self.model} ({self.capture}, target {self.target})")
        for column in ("site", "signature", "mask", "variant", "kernel", "status", "max err"):
            table.add_column(column, overflow="fold")
        for site in self.sites:
            err = "" if site.max_error is None else f"{site.max_error:.2e}"
            status = site.status if not site.reason else f"{site.status}: {site.reason}"
            cells = (site.location, site.signature, site.mask, site.variant or "-")
            table.add_row(*map(escape, (*cells, site.kernel or "-", status)), err)
        for miss in self.near_misses:
            table.add_row(
                escape(miss.location), "-", "-", "-", "-", escape(f"near miss: {miss.rule}"), ""
            )
        return table

    def trials_table(self) -> Table:
        table = Table(title="variants tried per site (calibration batches)")
        for column in ("site", "variant", "knobs", "cos", "rel_l1", "rmse", "decision"):
            table.add_column(column, overflow="fold")
        for site in self.sites:
            for trial in site.trials:
                m = trial.metrics
                knobs = ", ".join(f"{k}={v}" for k, v in trial.knobs.items())
                cells = (f"{m['cos']:.5f}", f"{m['rel_l1']:.3e}", f"{m['rmse']:.3e}")
                table.add_row(
                    *map(escape, (site.location, trial.variant, knobs, *cells)),
                    escape(trial.decision),
                )
        return table

    def pareto_table(self) -> Table:
        table = Table(title="search: Pareto front (time vs model error)")
        for column in ("trial", "ms", "model rel_l1", "plan"):
            table.add_column(column, overflow="fold")
        for point in self.pareto:
            table.add_row(
                str(point["trial"]),
                f"{point['ms']:.3f}",
                f"{point['model_rel_l1']:.3e}",
                escape("; ".join(point["plan"])),
            )
        return table

    def print(self, console: Console | None = None) -> None:
        console = console or Console()
        console.print(self.table())
        dims = ", ".join(f"{k}{v}" for k, v in self.dynamic_dims.items()) or "none"
        console.print(f"dynamic dims: {dims}")
        for graph in self.graphs:
            where = ", ".join(s.location for s in graph.sites) or "no attention"
            done = sum(s.status == "rewritten" for s in graph.sites)
            console.print(f"graph {graph.index} ({graph.kind}): {done} site(s) rewritten: {where}")
        for note in self.notes:
            console.print(f"note: {note}")
        if any(site.trials for site in self.sites):
            console.print(self.trials_table())
        if self.model_metrics:
            parts = ", ".join(f"{k} {v:.4g}" for k, v in self.model_metrics.items())
            console.print(f"model output on calibration batches: {parts} (budget {self.budget})")
        if self.pareto:
            console.print(self.pareto_table())
        if self.output_error is not None:
            console.print(f"model output max error vs original: {self.output_error:.3e}")
        if self.latency_ms:
            parts = ", ".join(f"{k} {v:.2f} ms" for k, v in self.latency_ms.items())
            console.print(f"latency: {parts}")
        if self.seconds:
            parts = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
            console.print(f"time: {parts}")

    def __rich__(self) -> Table:
        return self.table()
