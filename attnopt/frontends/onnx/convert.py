"""``inspect`` and ``convert`` for ONNX files: load, detect, plan, lower, splice, verify, report.

Verification mirrors the torch path: one onnxruntime run computes every site's old and new
value from the same inputs (both exposed as extra graph outputs), a site whose replacement
disagrees is restored, and the converted model is then compared with the original as a whole.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import onnx
from onnx import helper

from attnopt.budget import Budget
from attnopt.errors import AttnoptError, OnnxModelError
from attnopt.frontends.onnx import budget as onnx_budget
from attnopt.frontends.onnx import conv_basis as _conv_basis  # noqa: F401 (registers its lowering)
from attnopt.frontends.onnx import inputs as onnx_inputs
from attnopt.frontends.onnx import linear as _linear  # noqa: F401 (registers its lowering)
from attnopt.frontends.onnx import verify as ort_check
from attnopt.frontends.onnx.graph import OnnxGraph, analyse
from attnopt.frontends.onnx.model import Loaded, load, save
from attnopt.frontends.onnx.model import check as check_model
from attnopt.frontends.onnx.rewrite import NotExpressible, lower
from attnopt.frontends.onnx.splice import Splice, finish, restore, splice
from attnopt.frontends.onnx.splice import unused as unused_values
from attnopt.passes.plan import applicable, check_variants, plan
from attnopt.report import NearMissReport, Report, SiteReport
from attnopt.rewriter.canonicalize import canonicalize
from attnopt.rewriter.detect import Detection, detect
from attnopt.targets import TARGETS

Progress = Callable[[str], None]


def _detect(path: str | Path) -> tuple[Loaded, OnnxGraph, Detection]:
    loaded = load(path)
    graph = analyse(loaded.model)
    canonicalize(graph.view)
    return loaded, graph, detect(graph.view)


def _base_report(loaded: Loaded, graph: OnnxGraph, found: Detection) -> Report:
    model = loaded.model
    producer = " ".join(p for p in (model.producer_name, model.producer_version) if p)
    report = Report(
        model=loaded.path.name,
        capture=f"onnx opset {graph.opset}" + (f", {producer}" if producer else ""),
        dynamic=bool(onnx_inputs.input_dims(model)),
        dynamic_dims={name: [] for name in onnx_inputs.input_dims(model)},
        target=f"onnxruntime {ort_check.PROVIDERS[0]}",
        notes=[f"shapes from {graph.shapes.method}"],
    )
    if graph.fused:
        ops = ", ".join(f"{count}× {op}" for op, count in graph.fused.items())
        report.notes.append(f"attention already fused in the model: {ops}")
    report.sites = [
        SiteReport(s.location, s.describe(), s.mask_kind, s.source, kernel_signature=s.signature())
        for s in found.sites
    ]
    report.near_misses = [NearMissReport(m.location, m.rule) for m in found.near_misses]
    return report


def inspect(path: str | Path) -> Report:
    """Detect only: the sites, the fused op each would become (or why none can), near misses."""
    loaded, graph, found = _detect(path)
    report = _base_report(loaded, graph, found)
    for index, (choice, site_report) in enumerate(
        zip(plan(found.sites, ("exact",), TARGETS["cpu"]), report.sites, strict=True)
    ):
        if choice.chosen is None:
            site_report.reason = "; ".join(choice.reasons)
            continue
        try:
            lowering = lower(
                graph, choice.site, choice.chosen.replacement(choice.site), f"s{index}"
            )
            site_report.kernel, site_report.config = lowering.kernel, lowering.config
        except NotExpressible as err:
            site_report.reason = f"no fused op: {err}"
    return report


def convert(
    path_in: str | Path,
    path_out: str | Path,
    *,
    variants: tuple[str, ...] = ("exact",),
    check: bool = True,
    dims: dict[str, int] | None = None,
    tolerance: float | dict | None = None,
    knobs: dict | None = None,
    latency: bool = False,
    progress: Progress | None = None,
) -> Report:
    """Write ``path_in`` with its attention sites replaced by fused ops to ``path_out``.

    With ``check``, every site is verified in onnxruntime on random inputs (base dynamic sizes
    from ``dims``, see ``attnopt.frontends.onnx.inputs``) and restored if it disagrees beyond
    ``tolerance`` (default: per dtype); ``latency`` also times both models in the same process.
    With approximate ``variants`` (``linear``, ``conv_basis``) or a ``tolerance`` dict, each
    site keeps the first variant within that error budget, checked in onnxruntime at the site
    and for the model (``frontends/onnx/budget.py``); ``knobs`` fixes knob values as in
    ``attnopt.optimize``.
    """
    passes = check_variants(variants)
    budgeted = bool(knobs) or isinstance(tolerance, dict) or any(p.approximate for p in passes)
    if budgeted and not check:
        raise AttnoptError(
            "approximate variants, error budgets and knobs are checked in onnxruntime; "
            "convert with the check on"
        )
    if Path(path_out).resolve() == Path(path_in).resolve():
        raise OnnxModelError(f"{path_out}: write the result to another file than the input")
    step = progress or (lambda message: None)
    clock = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = time.perf_counter() - clock - sum(timings.values())

    step("loading and detecting")
    loaded, graph, found = _detect(path_in)
    report = _base_report(loaded, graph, found)
    original = loaded.model
    lap("load+detect")
    feeds = reference = None
    if check:
        step("running the original model in onnxruntime")
        bounds = onnx_inputs.limits(original, loaded.path)
        resolved = onnx_inputs.resolve_dims(original, dims, bounds)
        report.dynamic_dims = {name: [size] for name, size in resolved.items()}
        report.notes.append(onnx_inputs.describe(resolved, bounds))
        feeds = onnx_inputs.random_feeds(original, resolved, bounds=bounds)
        before = ort_check.session(loaded.path, "the original model", fuse=False)
        reference = ort_check.run(before, feeds, "the original model")
        lap("reference run")
    step("rewriting")
    work = onnx.ModelProto()
    work.CopyFrom(original)
    unused_before = unused_values(original)
    if budgeted:
        budget = Budget.of(tolerance)
        report.budget = budget.as_dict()
        splices, report.model_metrics = onnx_budget.choose(
            graph, found.sites, report.sites, work, variants, knobs, budget, feeds, reference
        )
    else:
        splices = _splice_sites(graph, found, report, work, variants)
        if feeds is not None and splices:
            step("verifying each site in onnxruntime")
            _verify_sites(work, splices, feeds, tolerance)
    if splices and feeds is None:
        for site_report, _ in splices:
            site_report.status = "rewritten"
        report.notes.append("sites not verified (check disabled)")
    live = [r for r, _ in splices if r.status == "rewritten"]
    finish(work, [s for r, s in splices if r.status == "rewritten"], unused_before)
    check_model(work, "the converted model")
    save(work, path_out, loaded.external)
    lap("rewrite+verify")
    if feeds is not None:
        step("comparing the converted model with the original")
        after = ort_check.session(Path(path_out), "the converted model")
        got = ort_check.run(after, feeds, "the converted model")
        report.output_error = ort_check.compare(got, reference)
        # an error budget has judged the model already (its model metrics)
        tolerances = [ort_check.tolerance(v, tolerance) for v in reference.values()]
        model_tol = float("inf") if budgeted else max(tolerances) * max(1, len(live))
        if live and report.output_error > model_tol:
            for site_report in live:
                site_report.status = "restored"
                site_report.reason = (
                    f"model output error {report.output_error:.2e} above {model_tol:.0e}"
                )
            save(original, path_out, loaded.external)
            after = ort_check.session(Path(path_out), "the restored model")
            got = ort_check.run(after, feeds, "the restored model")
            report.output_error = ort_check.compare(got, reference)
        lap("model check")
        if latency:
            step("timing both models in onnxruntime")
            stock = ort_check.session(loaded.path, "the original model")
            report.latency_ms = ort_check.latency_ms({"before": stock, "after": after}, feeds)
            lap("timing")
    timings["total"] = time.perf_counter() - clock
    report.seconds = timings
    return report


def _splice_sites(
    graph: OnnxGraph, found: Detection, report: Report, work: onnx.ModelProto, variants: tuple
) -> list[tuple[SiteReport, Splice]]:
    splices = []
    choices = plan(found.sites, variants, TARGETS["cpu"])
    for index, (choice, site_report) in enumerate(zip(choices, report.sites, strict=True)):
        if choice.chosen is None:
            site_report.status, site_report.reason = "skipped", "; ".join(choice.reasons)
            continue
        site_report.variant = choice.chosen.name
        # the first allowed variant with an ONNX lowering; the ones before it say why not
        passes, _ = applicable(choice.site, variants, TARGETS["cpu"])
        missed, lowering = [], None
        for chosen in passes:
            try:
                lowering = lower(
                    graph, choice.site, chosen.replacement(choice.site), f"attnopt/site{index}"
                )
            except NotExpressible as err:
                missed.append((chosen.name, str(err)))
                continue
            site_report.variant = chosen.name
            break
        if lowering is None:
            why = missed[0][1] if len(missed) == 1 else "; ".join(f"{n}: {e}" for n, e in missed)
            site_report.status, site_report.reason = "skipped", f"no fused op: {why}"
            continue
        if missed:
            site_report.reason = "; ".join(f"{name}: {err}" for name, err in missed)
        site_report.kernel, site_report.config = lowering.kernel, lowering.config
        splices.append((site_report, splice(work, lowering)))
    return splices


def _verify_sites(
    work: onnx.ModelProto,
    splices: list[tuple[SiteReport, Splice]],
    feeds: dict,
    user_tolerance: float | None,
) -> None:
    """One run computing every site's old and new value; restore the sites that disagree."""
    probed = onnx.ModelProto()
    probed.CopyFrom(work)
    outputs = {o.name for o in probed.graph.output}
    for _, spliced in splices:
        for name in (spliced.old, spliced.new):
            if name not in outputs:
                probed.graph.output.append(helper.make_empty_tensor_value_info(name))
    try:
        sess = ort_check.session(probed, "the rewritten model", fuse=False)
        values = ort_check.run(sess, feeds, "the rewritten model")
    except OnnxModelError as err:  # a rewrite onnxruntime rejects: restore all, say why
        for site_report, spliced in splices:
            restore(work, spliced)
            site_report.status, site_report.reason = "restored", f"{err}"
        return
    for site_report, spliced in splices:
        old, new = values[spliced.old], values[spliced.new]
        site_report.max_error = ort_check.max_error(new, old)
        limit = ort_check.tolerance(old, user_tolerance)
        if site_report.max_error <= limit:
            site_report.status = "rewritten"
        else:
            restore(work, spliced)
            site_report.status = "restored"
            site_report.reason = f"error {site_report.max_error:.2e} above tolerance {limit:.0e}"
