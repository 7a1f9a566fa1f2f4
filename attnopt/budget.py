"""The error budget: choose each site's variant on calibration batches (DESIGN.md §6, §10).

Each site tries its allowed variants in the user's order. All undecided sites are spliced with
their current candidate together and measured in one pass over the calibration batches (a probe
records the original and the replacement output of every site, computed from the same inputs);
an approximate candidate is kept only within the site budget, an exact one within its dtype
tolerance. Then the model output is checked: while it is outside the model budget, the
approximate site with the largest ``rel_l1`` backs off to the next exact variant.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from attnopt.errors import AttnoptError
from attnopt.frontends.export.capture import Inputs
from attnopt.frontends.fx.rewrite import Splice, splice
from attnopt.passes.base import Pass
from attnopt.report import SiteReport, VariantTrial
from attnopt.rewriter.graph import GraphView
from attnopt.rewriter.site import AttentionSite
from attnopt.validate import DEFAULT_BUDGET, SITE_METRICS, ErrorSums, violations


class BudgetError(AttnoptError):
    """The tolerance or calibration data given to ``optimize`` cannot be used."""


@dataclass(frozen=True)
class Budget:
    """Limits on each approximate site's output and on the model output; ``exact`` is the
    float tolerance exact variants keep (None: per dtype)."""

    site: dict[str, float]
    model: dict[str, float]
    exact: float | None = None
    named: bool = False  # the user named the metrics (a dict): no pass's own defaults apply

    @classmethod
    def of(cls, tolerance: float | dict | None) -> Budget:
        """A float (or None) bounds exact variants and leaves approximate ones the defaults of
        ALGORITHMS.md; a dict names metrics: ``cos``, ``rel_l1``, ``rmse`` per site and
        ``model_rel_l1`` for the whole model (default: the site ``rel_l1``)."""
        if tolerance is None or isinstance(tolerance, int | float):
            limits = dict(DEFAULT_BUDGET)
            exact = None if tolerance is None else float(tolerance)
        elif isinstance(tolerance, dict):
            unknown = set(tolerance) - {*SITE_METRICS, "model_rel_l1"}
            if unknown:
                raise BudgetError(
                    f"unknown tolerance metric(s) {sorted(unknown)}; use cos, rel_l1, rmse, "
                    "model_rel_l1"
                )
            limits, exact = {k: float(v) for k, v in tolerance.items()}, None
        else:
            raise BudgetError(f"tolerance must be a float or a dict of metrics, not {tolerance!r}")
        site = {k: v for k, v in limits.items() if k in SITE_METRICS}
        model = {k: v for k, v in site.items() if k == "cos"}
        if "model_rel_l1" in limits or "rel_l1" in limits:
            model["rel_l1"] = limits.get("model_rel_l1", limits.get("rel_l1"))
        return cls(site, model, exact, named=isinstance(tolerance, dict))

    def site_limits(self, chosen: Pass) -> dict[str, float]:
        """The limits an approximate pass is held to: the user's, else the stricter of the
        defaults and the pass's own ``budget`` (quant: ``cos ≥ 0.995``, ``rel_l1 ≤ 0.03``)."""
        own = getattr(chosen, "budget", None)
        if self.named or not own:
            return self.site
        limits = dict(self.site)
        for name, value in own.items():
            stricter = max if name == "cos" else min
            limits[name] = stricter(limits[name], value) if name in limits else value
        return limits

    def as_dict(self) -> dict[str, float]:
        return {**self.site, **{f"model_{k}": v for k, v in self.model.items()}}


def calibration_inputs(calibration: Iterable | None, example: Inputs) -> list[Inputs]:
    """The calibration batches as model inputs (a list, a DataLoader, any iterable of example
    inputs); the example inputs when none are given."""
    if calibration is None:
        return [example]
    batches = [Inputs.of(b) for b in calibration]
    if not batches:
        raise BudgetError("calibration is empty; give at least one batch of example inputs")
    return batches


@dataclass
class SitePlan:
    """One site's candidates (pass, knobs) in preference order and where it stands; ``fixed``
    holds the knob values the user set, ``{variant: {knob: value}}``, which search keeps."""

    site: AttentionSite
    report: SiteReport
    candidates: list[tuple[Pass, dict]]
    fixed: dict[str, dict] = field(default_factory=dict)
    position: int = 0
    live: Splice | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def current(self) -> tuple[Pass, dict]:
        return self.candidates[self.position]


_RECORDED: dict[int, list] = {}


def _record(key: int, value: torch.Tensor) -> None:
    _RECORDED.setdefault(key, []).append(value.detach())


def measure(
    gm: fx.GraphModule,
    probes: dict[int, Splice],
    batches: list[Inputs],
    references: list[Any],
) -> tuple[dict[int, ErrorSums], ErrorSums]:
    """Run every batch; per probed site, the replacement's error against the original output
    computed from the same inputs, and the model output's error against ``references``."""
    inserted = []
    for index, spliced in probes.items():
        for key, node in ((2 * index, spliced.old), (2 * index + 1, spliced.new)):
            with gm.graph.inserting_after(node):
                inserted.append(gm.graph.call_function(_record, (key, node)))
    gm.recompile()
    sites = {index: ErrorSums() for index in probes}
    model = ErrorSums()
    try:
        for batch, reference in zip(batches, references, strict=True):
            _RECORDED.clear()
            with torch.no_grad():
                out = gm(*batch.args, **batch.kwargs)
            model.add_outputs(out, reference)
            for index in probes:
                sites[index].add(_RECORDED[2 * index + 1][0], _RECORDED[2 * index][0])
    finally:
        for node in inserted:
            gm.graph.erase_node(node)
        _RECORDED.clear()
        gm.recompile()
    return sites, model


def choose(
    gm: fx.GraphModule,
    view: GraphView,
    plans: list[SitePlan],
    batches: list[Inputs],
    references: list[Any],
    budget: Budget,
    exact_limit,
) -> dict[str, float]:
    """Splice each site's first acceptable candidate (see the module docstring); returns the
    model metrics of the final choice. ``exact_limit(dtype)`` is an exact variant's tolerance."""
    pending = [p for p in plans if p.candidates]
    while pending:
        for p in pending:
            chosen, knobs = p.current
            p.live = splice(gm, view, p.site, chosen.replacement(p.site, **knobs))
        settled = _settle(gm, pending, batches, budget)
        sums, _ = measure(gm, {i: p.live for i, p in enumerate(pending)}, batches, references)
        still = []
        for i, p in enumerate(pending):
            chosen, knobs = p.current
            metrics = sums[i].metrics()
            refusal, parts = settled.get(i, (None, []))
            if refusal is not None:
                broken = [refusal]
            elif chosen.approximate:
                broken = violations(metrics, budget.site_limits(chosen))
            else:
                limit = exact_limit(p.site.dtype)
                over = metrics["max_error"] > limit
                broken = [f"max error {metrics['max_error']:.2e} > {limit:.0e}"] if over else []
            decision = "kept" if not broken else "rejected: " + ", ".join(broken)
            call = p.live.op_call
            note = (
                getattr(gm.get_submodule(call.target), "note", None)
                if call.op == "call_module"
                else None
            )
            if note is not None:  # what a replacement module decided on these batches
                decision += f" ({note()})"
            if p.live.note is not None:  # what the splice decided (quant's projections)
                decision += f" ({p.live.note})"
            trial = VariantTrial(chosen.name, dict(knobs), metrics, decision, parts)
            p.report.trials.append(trial)
            if not broken:
                p.metrics = metrics
                continue
            p.live.remove()
            p.live = None
            p.position += 1
            if p.position < len(p.candidates):
                still.append(p)
        pending = still
    return _fit_model(gm, view, plans, batches, references, budget)


def _settle(gm, plans: list[SitePlan], batches: list[Inputs], budget: Budget) -> dict:
    """Site modules that choose parts of themselves (``observes``) watch the calibration
    batches once, then fit the site budget: ``{plan index: (refusal or None, parts)}``."""
    watching = {
        i: p.live.replacement.module
        for i, p in enumerate(plans)
        if getattr(p.live.replacement.module, "observes", False)
    }
    if not watching:
        return {}
    for module in watching.values():
        module.watch(True)
    gm.recompile()
    try:
        with torch.no_grad():
            for batch in batches:
                gm(*batch.args, **batch.kwargs)
    except BaseException:
        for module in watching.values():
            module.watch(False)
        raise
    return {i: module.fit(budget.site) for i, module in watching.items()}


def _fit_model(gm, view, plans, batches, references, budget: Budget) -> dict[str, float]:
    """Back off the worst approximate site until the model output fits the budget."""
    while True:
        live = {i: p.live for i, p in enumerate(plans) if p.live is not None}
        sums, model = measure(gm, live, batches, references)
        for i, p in enumerate(plans):
            if i in sums:
                p.metrics = sums[i].metrics()
                if not p.report.trials[-1].metrics:  # a fallback spliced in the last round
                    p.report.trials[-1].metrics = p.metrics
        model_metrics = model.metrics()
        broken = violations(model_metrics, budget.model)
        approximate = [p for p in plans if p.live is not None and p.current[0].approximate]
        if not broken or not approximate:
            return model_metrics
        worst = max(approximate, key=lambda p: p.metrics["rel_l1"])
        reason = "model " + ", ".join(broken)
        worst.report.trials[-1].decision = f"backed off: {reason}"
        worst.live.remove()
        worst.live = None
        rest = worst.candidates[worst.position + 1 :]
        fallback = next((c for c in rest if not c[0].approximate), None)
        if fallback is not None:
            worst.position = worst.candidates.index(fallback)
            chosen, knobs = fallback
            worst.live = splice(gm, view, worst.site, chosen.replacement(worst.site, **knobs))
            worst.report.trials.append(
                VariantTrial(chosen.name, dict(knobs), {}, f"kept after backing off ({reason})")
            )
