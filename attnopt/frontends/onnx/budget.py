"""The error budget on an ONNX model (``attnopt convert --variant linear --variant exact``).

The torch path's rules (``attnopt.budget``), measured in onnxruntime on the conversion's random
inputs: every undecided site is spliced with its current candidate and one run exposes the old
and new value of each; an approximate candidate is kept within the site budget, an exact one
within its dtype tolerance, and a rejected one gives way to the site's next allowed variant.
Then, while the model output is outside the model budget, the approximate site with the largest
``rel_l1`` backs off to its next exact variant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import helper

from attnopt.budget import Budget
from attnopt.errors import OnnxModelError
from attnopt.frontends.onnx import verify as ort_check
from attnopt.frontends.onnx.conv_basis import calibrate
from attnopt.frontends.onnx.graph import OnnxGraph
from attnopt.frontends.onnx.rewrite import NotExpressible, lower
from attnopt.frontends.onnx.splice import Splice, restore, splice
from attnopt.passes.base import Pass, default_knobs
from attnopt.passes.plan import applicable, site_knobs
from attnopt.report import SiteReport, VariantTrial
from attnopt.rewriter.site import AttentionSite
from attnopt.targets import TARGETS
from attnopt.validate import ErrorSums, tolerance_for, violations

#: How a trial whose variant has no ONNX lowering is recorded (and read back for the reason).
NO_ONNX_FORM = "no ONNX form: "


@dataclass
class _Plan:
    index: int
    site: AttentionSite
    report: SiteReport
    candidates: list[tuple[Pass, dict]]
    position: int = 0
    live: Splice | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    parts: list[dict] = field(default_factory=list)  # what an observing module chose (heads)


def _sums(a: np.ndarray, b: np.ndarray) -> ErrorSums:
    sums = ErrorSums()
    sums.add(torch.from_numpy(np.asarray(a)), torch.from_numpy(np.asarray(b)))
    return sums


def _run(work: onnx.ModelProto, extra: list[str], feeds: dict) -> dict[str, np.ndarray]:
    probed = onnx.ModelProto()
    probed.CopyFrom(work)
    outputs = {o.name for o in probed.graph.output}
    for name in extra:
        if name not in outputs:
            probed.graph.output.append(helper.make_empty_tensor_value_info(name))
    sess = ort_check.session(probed, "the rewritten model", fuse=False)
    return ort_check.run(sess, feeds, "the rewritten model")


def _splice(
    graph: OnnxGraph, work: onnx.ModelProto, p: _Plan, feeds: dict, budget: Budget
) -> VariantTrial | None:
    """Splice ``p``'s current candidate (a module that ``observes`` first watches the site's
    inputs in onnxruntime and fits the site budget); None, or the trial saying why not."""
    chosen, knobs = p.candidates[p.position]
    replacement = chosen.replacement(p.site, **knobs)
    p.parts = []
    if getattr(replacement.module, "observes", False):
        refusal, p.parts = calibrate(graph, work, p.site, replacement, feeds, budget.site)
        if refusal is not None:
            decision = refusal if refusal.startswith(NO_ONNX_FORM) else "rejected: " + refusal
            return VariantTrial(chosen.name, dict(knobs), {}, decision, p.parts)
    try:
        lowering = lower(graph, p.site, replacement, f"attnopt/site{p.index}/{chosen.name}")
    except NotExpressible as err:
        return VariantTrial(chosen.name, dict(knobs), {}, NO_ONNX_FORM + str(err), p.parts)
    p.live = splice(work, lowering)
    p.report.kernel, p.report.config = lowering.kernel, lowering.config
    return None


def _drop(work: onnx.ModelProto, p: _Plan) -> None:
    restore(work, p.live)
    p.live = None


def choose(
    graph: OnnxGraph,
    sites: list[AttentionSite],
    reports: list[SiteReport],
    work: onnx.ModelProto,
    variants: tuple[str, ...],
    knobs: dict | None,
    budget: Budget,
    feeds: dict,
    reference: dict[str, np.ndarray],
) -> tuple[list[tuple[SiteReport, Splice]], dict[str, float]]:
    """Each site's variant within ``budget`` (module docstring); returns the kept splices and the
    model output's metrics."""
    fixed = site_knobs(knobs, variants, [r.location for r in reports])
    plans = []
    for index, (site, report, mine) in enumerate(zip(sites, reports, fixed, strict=True)):
        passes, reasons = applicable(site, variants, TARGETS["cpu"])
        candidates = [(p, {**default_knobs(p), **mine.get(p.name, {})}) for p in passes]
        plans.append(_Plan(index, site, report, candidates))
        if not passes:
            report.status, report.reason = "skipped", "; ".join(reasons)
    pending = [p for p in plans if p.candidates]
    while pending:
        for p in pending:
            while p.position < len(p.candidates) and (
                refused := _splice(graph, work, p, feeds, budget)
            ):
                p.report.trials.append(refused)
                p.position += 1
        pending = [p for p in pending if p.live is not None]
        try:
            values = _run(work, [n for p in pending for n in (p.live.old, p.live.new)], feeds)
        except OnnxModelError as err:  # a rewrite onnxruntime rejects: restore all, say why
            for p in pending:
                _drop(work, p)
                p.report.status, p.report.reason = "restored", str(err)
            break
        still = []
        for p in pending:
            chosen, knobs_now = p.candidates[p.position]
            old, new = values[p.live.old], values[p.live.new]
            metrics = _sums(new, old).metrics()
            if chosen.approximate:
                broken = violations(metrics, budget.site_limits(chosen))
            else:
                limit = tolerance_for(torch.from_numpy(old.reshape(-1)[:0]).dtype, budget.exact)
                over = metrics["max_error"] > limit
                broken = [f"max error {metrics['max_error']:.2e} > {limit:.0e}"] if over else []
            decision = "kept" if not broken else "rejected: " + ", ".join(broken)
            trial = VariantTrial(chosen.name, dict(knobs_now), metrics, decision, p.parts)
            p.report.trials.append(trial)
            if not broken:
                p.metrics = metrics
                continue
            _drop(work, p)
            p.position += 1
            if p.position < len(p.candidates):
                still.append(p)
        pending = still
    model = _fit_model(graph, work, plans, budget, feeds, reference)
    kept = []
    for p in plans:
        unlowered = [
            (t.variant, t.decision.removeprefix(NO_ONNX_FORM))
            for t in p.report.trials
            if t.decision.startswith(NO_ONNX_FORM)
        ]
        why_not = "; ".join(f"{name}: {why}" for name, why in unlowered)
        if p.live is None:
            if len(unlowered) == len(p.candidates) > 0:
                p.report.status, p.report.reason = "skipped", NO_ONNX_FORM + why_not
            elif p.candidates and p.report.status != "restored":
                p.report.status, p.report.reason = (
                    "restored",
                    "no allowed variant within the budget",
                )
            continue
        chosen, _ = p.candidates[p.position]
        p.report.status, p.report.variant = "rewritten", chosen.name
        p.report.reason = why_not or p.report.reason
        p.report.max_error = p.metrics.get("max_error")
        kept.append((p.report, p.live))
    return kept, model


def _model_metrics(values: dict, reference: dict) -> dict[str, float]:
    sums = ErrorSums()
    for name, expected in reference.items():
        if np.issubdtype(expected.dtype, np.floating):
            sums.add(torch.from_numpy(values[name]), torch.from_numpy(expected))
    return sums.metrics()


def _fit_model(graph, work, plans: list[_Plan], budget: Budget, feeds, reference) -> dict:
    """Back off the worst approximate site until the model output fits the budget."""
    while True:
        live = [p for p in plans if p.live is not None]
        values = _run(work, [n for p in live for n in (p.live.old, p.live.new)], feeds)
        for p in live:
            p.metrics = _sums(values[p.live.new], values[p.live.old]).metrics()
            if not p.report.trials[-1].metrics:  # a fallback spliced in the last round
                p.report.trials[-1].metrics = p.metrics
        metrics = _model_metrics(values, reference)
        broken = violations(metrics, budget.model)
        approximate = [p for p in live if p.candidates[p.position][0].approximate]
        if not broken or not approximate:
            return metrics
        worst = max(approximate, key=lambda p: p.metrics["rel_l1"])
        reason = "model " + ", ".join(broken)
        worst.report.trials[-1].decision = f"backed off: {reason}"
        _drop(work, worst)
        rest = worst.candidates[worst.position + 1 :]
        fallback = next((c for c in rest if not c[0].approximate), None)
        if fallback is None:
            continue
        worst.position = worst.candidates.index(fallback)
        refused = _splice(graph, work, worst, feeds, budget)
        chosen, knobs = fallback
        kept = VariantTrial(chosen.name, dict(knobs), {}, f"kept after backing off ({reason})")
        worst.report.trials.append(refused or kept)
