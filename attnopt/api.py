"""``optimize`` and ``inspect`` for torch models: capture, detect, plan, rewrite, validate."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from attnopt.codegen.registry import Kernel, kernels_for, select_kernel
from attnopt.codegen.signature import KernelSignature
from attnopt.errors import AttnoptError, InputSignatureError, ShapeError, UnsupportedModelError
from attnopt.frontends.dynamo.backend import INNER_BACKENDS
from attnopt.frontends.dynamo.model import (
    buffer_versions,
    comparable,
    compile_model,
    structural_copy,
    uncompile,
    why_dynamo,
)
from attnopt.frontends.export.capture import (
    Capture,
    Inputs,
    capture,
    check_outputs,
    check_signature,
)
from attnopt.frontends.fx.graph import graph_view
from attnopt.frontends.fx.rewrite import SITE_PREFIX, Splice, finish, splice
from attnopt.passes.base import default_knobs
from attnopt.passes.plan import applicable, check_variants, plan, site_knobs
from attnopt.report import NearMissReport, Report, SiteReport
from attnopt.rewriter.canonicalize import canonicalize
from attnopt.rewriter.detect import Detection, detect
from attnopt.rewriter.graph import GraphView
from attnopt.targets import Target, resolve
from attnopt.validate import ErrorSums, compare_outputs, max_error, tolerance_for, violations

#: How ``optimize`` captures the model: ``auto`` picks export or Dynamo (see ``optimize``).
CAPTURES = ("auto", "export", "dynamo")


class OptimizedModule(nn.Module):
    """The rewritten graph behind the original model's call signature and state_dict keys."""

    def __init__(self, gm: fx.GraphModule, report: Report) -> None:
        super().__init__()
        self.graph_module = gm
        self.attnopt_report = report

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return self.graph_module(*args, **kwargs)
        try:
            return self.graph_module(*args, **kwargs)
        except ValueError as err:
            if not str(err).startswith("Trying to flatten user inputs"):
                raise
            raise InputSignatureError(
                "called with other arguments than the example's (the exported graph takes only "
                "those); optimize with capture='dynamo' to serve calls with other argument sets, "
                "such as a prefill without and decode steps with a cache"
            ) from None
        except AssertionError as err:
            if not str(err).startswith("Guard failed"):
                raise
            dims = self.attnopt_report.dynamic_dims
            raise ShapeError(
                f"input shape outside what the captured graph accepts ({err}); dynamic dims: "
                f"{dims or 'none'}. Optimize again with example inputs of this shape, or make "
                "the model exportable with dynamic shapes there."
            ) from None

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:
        """The original model's keys, so checkpoints load into either."""
        return self.graph_module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        """Also the original model's checkpoint, strictly: the approximate sites' own weights
        (``attnopt_site_N.*``) may be absent, and keep their values then."""
        result = self.graph_module.load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith(SITE_PREFIX)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: missing keys "
                f"{missing}, unexpected keys {result.unexpected_keys}"
            )
        return result._replace(missing_keys=missing)


def _detect(model: nn.Module, inputs: Inputs) -> tuple[Capture, GraphView, Detection]:
    captured = capture(model, inputs)
    view = canonicalize(graph_view(captured.gm, captured.shapes_hold))
    return captured, view, detect(view)


def _base_report(model: nn.Module, captured: Capture, found: Detection, target: str) -> Report:
    report = Report(
        model=type(model).__name__,
        capture=captured.method,
        dynamic=captured.dynamic,
        dynamic_dims=captured.dynamic_dims,
        target=target,
        notes=list(captured.notes),
    )
    report.sites = [
        SiteReport(
            s.location,
            s.describe(),
            s.mask_kind,
            s.source,
            kernel_signature=s.signature(captured.size_hints),
        )
        for s in found.sites
    ]
    report.near_misses = [NearMissReport(m.location, m.rule) for m in found.near_misses]
    return report


def inspect(model: nn.Module | str | os.PathLike, example_inputs: Any = None) -> Report:
    """Capture and detect only: the sites attnopt would rewrite, and the near misses.

    ``model`` may also be the path of an ``.onnx`` file (no example inputs needed)."""
    if isinstance(model, str | os.PathLike) and str(model).endswith(".onnx"):
        from attnopt.frontends.onnx.convert import inspect as inspect_onnx

        return inspect_onnx(model)
    _check_model(model)
    inputs = Inputs.of(example_inputs)
    captured, _, found = _detect(model, inputs)
    return _base_report(model, captured, found, "-")


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"model must be a torch.nn.Module (or the path of an .onnx file), not "
            f"{type(model).__name__}; wrap a function in an nn.Module whose forward calls it"
        )


def _reference(model: nn.Module, inputs: Inputs) -> Any:
    """The original model's output on the example inputs; a model that fails on its own
    example inputs is the user's to fix, so the failure is reported as such."""
    try:
        with torch.no_grad():
            return model(*inputs.args, **inputs.kwargs)
    except Exception as err:  # noqa: BLE001 - whatever the model raises, name it
        raise InputSignatureError(
            f"{type(model).__name__} raised {type(err).__name__} on the example inputs "
            f"({' '.join(str(err).split())[:300]}); give inputs the model runs on"
        ) from err


def optimize(
    model: nn.Module,
    example_inputs: Any,
    *,
    variants: tuple[str, ...] = ("exact",),
    target: str = "auto",
    tolerance: float | dict | None = None,
    calibration: Iterable | None = None,
    search: bool = False,
    search_trials: int = 30,
    knobs: dict | None = None,
    tune: bool = False,
    storage: str | None = None,
    trials: int = 40,
    capture: str = "auto",
    inner: str = "eager",
) -> nn.Module:
    """A module computing what ``model`` computes with its attention sites rewritten.

    Each site is checked against the original on ``example_inputs``; sites outside
    ``tolerance`` (default: per dtype, see ``attnopt.validate``) are restored and reported.
    With approximate ``variants`` (``linear``, ``gla``, ``hybrid``, ``quant``, ...) or a
    ``tolerance`` dict of metrics (``cos``, ``rel_l1``, ``rmse``, ``model_rel_l1``; without one,
    a pass may hold its sites to stricter defaults of its own), each site keeps the first
    variant within that error budget on the ``calibration`` batches (an iterable of example
    inputs; default the example), and the model output must fit too (``attnopt.budget``).
    ``search=True`` instead lets an Optuna study pick each site's variant and knobs for time and
    error (``search_trials`` plans; ``attnopt.search``); the report gives its Pareto front.
    ``knobs`` fixes knob values instead of the defaults (and out of the search): per variant,
    ``{"hybrid": {"window": 64}}``, or per site, ``{"blocks.0": {"hybrid": {"window": 32}}}``
    (a site is its report location or index; see ``attnopt.passes.plan.site_knobs``).
    Kernels launch with the best config stored for each site's signature in the tuning
    database ``storage`` (an Optuna storage URL; default: a SQLite file in the user cache);
    ``tune=True`` first tunes them (``trials`` per signature). The result has
    ``.attnopt_report``.

    ``capture="auto"`` exports the model when one exported graph can stand in for it, and goes
    through Dynamo otherwise (models that generate, carry caches, take changing Python ints or
    write buffers in place): the result is then the model's own class with its call compiled
    by the ``attnopt`` backend, and the rest of each graph run by ``inner`` (``"eager"``,
    ``"aot_eager"`` or ``"inductor"``). ``capture="export"`` or ``"dynamo"`` forces one.
    """
    start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(phase: str) -> None:
        timings[phase] = time.perf_counter() - start - sum(timings.values())

    _check_model(model)
    if capture not in CAPTURES:
        raise AttnoptError(f"capture={capture!r}; choose one of {', '.join(CAPTURES)}")
    if inner not in INNER_BACKENDS:
        raise AttnoptError(f"inner={inner!r}; choose one of {', '.join(INNER_BACKENDS)}")
    inputs = Inputs.of(example_inputs)
    resolved = resolve(target)
    check_signature(model, inputs)
    versions = buffer_versions(model)
    reference = _reference(model, inputs)
    lap("reference")
    why = why_dynamo(model, inputs, reference, versions) if capture == "auto" else None
    passes = check_variants(variants)
    budgeted = (
        search or bool(knobs) or isinstance(tolerance, dict) or any(p.approximate for p in passes)
    )
    if capture == "dynamo" or why is not None:
        if search or knobs or (budgeted and inner != "eager"):
            raise AttnoptError(
                "search and knobs are validated on one exported graph, and approximate variants "
                f"through Dynamo need inner='eager'; this model goes through Dynamo "
                f"({why or 'capture=dynamo'}): use variants=('exact',), inner='eager', or "
                "capture='export' on a call without caches (for a Hugging Face model: "
                "use_cache=False)"
            )
        report = Report(
            model=type(model).__name__,
            capture="dynamo",
            dynamic=True,
            target=resolved.name,
            notes=[f"captured with Dynamo: {why or 'capture=dynamo'}"],
        )
        optimized = structural_copy(model, versions)

        def configure(site_report: SiteReport) -> None:
            """Graphs compiled later (decode steps, recompiles) launch with the stored best
            config of their kernel and shape bucket, as the example's sites do."""
            try:
                _configure_kernel(
                    site_report, site_report.kernel_signature, resolved, False, storage, trials
                )
            except Exception as err:  # noqa: BLE001 - the op then runs its default config
                site_report.config = f"kernel default (config failed: {_reason(err)})"

        compile_model(optimized, report, inner, variants, resolved, configure)
        with torch.no_grad():
            result = optimized(*inputs.args, **inputs.kwargs)
        lap("capture+rewrite")
        for site_report in report.rewritten if tune else ():  # configure() installed the rest
            sig = site_report.kernel_signature
            _configure_kernel(site_report, sig, resolved, tune, storage, trials)
        lap("tune" if tune else "configs")
        if budgeted:
            _check_model_budget(optimized, model, report, inputs, calibration, tolerance)
        else:
            _validate_model(optimized, report, comparable(result), comparable(reference), tolerance)
        lap("validate")
        timings["total"] = time.perf_counter() - start
        report.seconds = timings
        optimized.attnopt_report = report
        return optimized
    check_outputs(reference)
    captured, view, found = _detect(model, inputs)
    lap("capture+detect")
    report = _base_report(model, captured, found, resolved.name)
    gm = captured.gm
    if budgeted:
        optimized = _optimize_budgeted(
            model,
            inputs,
            reference,
            (gm, view, found.sites, report),
            resolved,
            variants,
            tolerance,
            calibration,
            (search, search_trials, knobs),
            (tune, storage, trials),
        )
        lap("choose+validate")
        timings["total"] = time.perf_counter() - start
        report.seconds = timings
        return optimized
    splices: list[tuple[SiteReport, Splice]] = []
    for choice, site_report in zip(
        plan(found.sites, variants, resolved), report.sites, strict=True
    ):
        if choice.chosen is None:
            site_report.status, site_report.reason = "skipped", "; ".join(choice.reasons)
            continue
        try:
            spliced = splice(gm, view, choice.site, choice.chosen.replacement(choice.site))
        except Exception as err:  # noqa: BLE001 - one site's failure must not sink the model
            _give_up(site_report, "rewrite", err)
            continue
        site_report.variant = choice.chosen.name
        splices.append((site_report, spliced))
    gm.recompile()
    lap("rewrite")
    for site_report, _ in splices:
        try:
            _configure_kernel(
                site_report, site_report.kernel_signature, resolved, tune, storage, trials
            )
        except Exception as err:  # noqa: BLE001 - the op then runs its default config
            site_report.config = f"kernel default (config failed: {_reason(err)})"
    lap("tune" if tune else "configs")
    result, splices = _validate_sites(gm, view, inputs, splices, tolerance)
    optimized = OptimizedModule(gm, report)
    live = [(r, s) for r, s in splices if r.status == "rewritten"]
    if live:  # the whole model, before dead code goes, so any site can still be restored
        model_tol = _model_tolerance(reference, [r for r, _ in live], tolerance)
        try:
            if result is None or len(live) < len(splices):
                with torch.no_grad():
                    result = optimized(*inputs.args, **inputs.kwargs)
            report.output_error = compare_outputs(result, reference)
            why = f"model output error {report.output_error:.2e} above {model_tol:.0e}"
        except Exception as err:  # noqa: BLE001
            report.output_error, why = float("inf"), f"model run failed ({_reason(err)})"
        if report.output_error > model_tol:
            for site_report, spliced in live:
                spliced.restore()
                site_report.status, site_report.reason = "restored", why
            live = []
    finish(gm)
    if not live:
        with torch.no_grad():
            report.output_error = compare_outputs(
                optimized(*inputs.args, **inputs.kwargs), reference
            )
    lap("validate")
    timings["total"] = time.perf_counter() - start
    report.seconds = timings
    return optimized


def _validate_model(
    optimized: nn.Module, report: Report, result: Any, reference: Any, tolerance: float | None
) -> None:
    """Compare the Dynamo-compiled model's example output with the original's; if it is off,
    run the original ops again and say so."""
    report.output_error = compare_outputs(result, reference)
    live = report.rewritten
    model_tol = tolerance_for(_main_dtype(reference), tolerance) * max(1, len(live))
    if live and report.output_error > model_tol:
        uncompile(optimized)
        for site_report in live:
            site_report.status = "restored"
            site_report.reason = (
                f"model output error {report.output_error:.2e} above {model_tol:.0e}"
            )


def _check_model_budget(
    optimized: nn.Module,
    model: nn.Module,
    report: Report,
    inputs: Inputs,
    calibration: Iterable | None,
    tolerance: Any,
) -> None:
    """Approximate variants through Dynamo: no single graph to probe site by site, so the model
    output (caches left out) on the calibration batches must fit the model budget, or every
    site runs the original ops again. Each graph's sites were fitted on its first call."""
    from attnopt.budget import Budget, calibration_inputs

    budget = Budget.of(tolerance)
    sums = ErrorSums()
    with torch.no_grad():
        for batch in calibration_inputs(calibration, inputs):
            out = optimized(*batch.args, **batch.kwargs)
            sums.add_outputs(out, model(*batch.args, **batch.kwargs))
    report.model_metrics, report.budget = sums.metrics(), budget.as_dict()
    broken = violations(report.model_metrics, budget.model)
    if broken and report.rewritten:
        uncompile(optimized)
        for site_report in report.rewritten:
            site_report.status, site_report.reason = "restored", "model " + ", ".join(broken)


def _optimize_budgeted(
    model,
    inputs,
    reference,
    graph,
    target,
    variants,
    tolerance,
    calibration,
    searching,
    tuning,
) -> OptimizedModule:
    """Choose each site's variant within the error budget (or by search), then report."""
    from attnopt.budget import Budget, SitePlan, calibration_inputs, choose

    gm, view, sites, report = graph
    search, search_trials, knobs = searching
    fixed = site_knobs(knobs, variants, [s.location for s in report.sites])
    budget = Budget.of(tolerance)
    batches = calibration_inputs(calibration, inputs)
    with torch.no_grad():
        references = [model(*b.args, **b.kwargs) for b in batches]
    plans = []
    for site, site_report, mine in zip(sites, report.sites, fixed, strict=True):
        passes, reasons = applicable(site, variants, target)
        candidates = [(p, {**default_knobs(p), **mine.get(p.name, {})}) for p in passes]
        plans.append(SitePlan(site, site_report, candidates, fixed=mine))
        if not passes:
            site_report.status, site_report.reason = "skipped", "; ".join(reasons)

    def exact_limit(dtype: str | None) -> float:
        return tolerance_for(getattr(torch, dtype or "float32"), budget.exact)

    if search:
        from attnopt.search import search_plans

        report.model_metrics, report.pareto = search_plans(
            gm, view, plans, batches, references, budget, exact_limit, search_trials
        )
    else:
        report.model_metrics = choose(gm, view, plans, batches, references, budget, exact_limit)
    report.budget = budget.as_dict()
    for p in plans:
        if p.live is None:
            if p.candidates:
                p.report.status = "restored"
                p.report.reason = "no allowed variant within the budget"
            continue
        chosen, knobs = p.current
        p.report.status, p.report.variant = "rewritten", chosen.name
        p.report.max_error = p.metrics.get("max_error")
        if chosen.approximate:
            module = type(gm.get_submodule(p.live.op_call.target))
            p.report.kernel = f"{module.__module__}.{module.__name__}({chosen.name})"
            p.report.config = ", ".join(f"{k}={v}" for k, v in knobs.items())
        else:
            _configure_kernel(p.report, p.report.kernel_signature, target, *tuning)
    finish(gm)
    optimized = OptimizedModule(gm, report)
    with torch.no_grad():
        report.output_error = compare_outputs(optimized(*inputs.args, **inputs.kwargs), reference)
    return optimized


def _configure_kernel(
    site_report: SiteReport,
    sig: KernelSignature,
    target: Target,
    tune: bool,
    storage: str | None,
    trials: int,
) -> None:
    """Install the site's tuned (or default) launch config and say which in the report."""
    kernel = _kernel_at_example(sig, "cuda" if target.is_gpu else "cpu")
    site_report.kernel = f"attnopt::attention -> {kernel.name}"
    if kernel.name == "reference":
        site_report.config = "none (plain-torch reference)"
        return
    from attnopt.autotune.tuner import install_tuned, tune_kernel  # Optuna loads only if needed

    try:
        if tune:
            tune_kernel(target, sig, kernel=kernel.name, storage=storage, trials=trials)
        installed = install_tuned(target, sig, kernel=kernel.name, storage=storage)
    except AttnoptError as err:
        site_report.config = f"kernel default ({err})"
        return
    site_report.config = "; ".join(
        f"{name} {config} [{source}]" for name, config, source in installed
    )


def _kernel_at_example(sig: KernelSignature, device_type: str) -> Kernel:
    """The kernel the op picks for this site at the example's sizes (on a device this machine
    lacks, the target's first choice)."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return kernels_for("exact", device_type)[0]
    kv_heads = max(1, sig.heads // sig.kv_group)
    like = {"device": device_type, "dtype": getattr(torch, sig.dtype, torch.float32)}
    q = torch.empty(sig.batch, sig.heads, sig.n, sig.head_dim, **like)
    k = torch.empty(sig.batch, kv_heads, sig.m, sig.head_dim, **like)
    v = torch.empty(sig.batch, kv_heads, sig.m, sig.value_dim or sig.head_dim, **like)
    return select_kernel("exact", q, k, v, None, "causal" in sig.mask_kind, 0)


def _model_tolerance(reference: Any, live: list[SiteReport], tolerance: float | None) -> float:
    """Per-dtype tolerance of the model's output, or of the least precise rewritten site's dtype
    when that is looser (fp16 attention inside an fp32 model), once per rewritten site."""
    dtypes = [_main_dtype(reference)] + [
        getattr(torch, r.kernel_signature.dtype, torch.float32)
        for r in live
        if r.kernel_signature is not None
    ]
    return max(tolerance_for(d, tolerance) for d in dtypes) * len(live)


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def _give_up(site_report: SiteReport, stage: str, err: BaseException) -> None:
    site_report.status = "restored" if stage != "rewrite" else "skipped"
    site_report.reason = f"{stage} failed ({_reason(err)}); the original code is kept"


def _main_dtype(outputs: Any) -> torch.dtype:
    for leaf in pytree.tree_leaves(outputs):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf.dtype
    return torch.float32


_RECORDED: dict[int, torch.Tensor] = {}


def _record(key: int, value: torch.Tensor) -> None:
    _RECORDED[key] = value.detach()


def _validate_sites(
    gm: fx.GraphModule, view: GraphView, inputs: Inputs, splices: list, tolerance: float | None
) -> tuple[Any, list]:
    """Run the graph once with old and new site outputs both computed from the same inputs;
    restore every site whose replacement disagrees. If that run fails, each site is spliced
    and run alone, and those that fail are restored with the reason. Returns the run's model
    output (None when it has to be run again) and the splices, as they now stand."""
    if not splices:
        return None, splices
    try:
        return _validate_run(gm, inputs, splices, tolerance), splices
    except Exception:  # noqa: BLE001 - find the site(s) at fault below
        pass
    for _, spliced in splices:
        spliced.remove()
    passed = []
    for site_report, spliced in splices:
        alone = splice(gm, view, spliced.site, spliced.replacement)
        try:
            _validate_run(gm, inputs, [(site_report, alone)], tolerance)
        except Exception as err:  # noqa: BLE001
            _give_up(site_report, "validation run", err)
        alone.remove()
        if site_report.status == "rewritten":
            passed.append(site_report)
    splices = [
        (r, splice(gm, view, s.site, s.replacement) if r in passed else s) for r, s in splices
    ]
    gm.recompile()
    return None, splices


def _validate_run(
    gm: fx.GraphModule, inputs: Inputs, splices: list, tolerance: float | None
) -> Any:
    probes = []
    for index, (_, spliced) in enumerate(splices):
        for key, node in ((2 * index, spliced.old), (2 * index + 1, spliced.new)):
            with gm.graph.inserting_after(node):
                probes.append(gm.graph.call_function(_record, (key, node)))
    gm.recompile()
    _RECORDED.clear()
    try:
        with torch.no_grad():
            result = gm(*inputs.args, **inputs.kwargs)
        for index, (site_report, spliced) in enumerate(splices):
            old, new = _RECORDED[2 * index], _RECORDED[2 * index + 1]
            err = max_error(new, old)
            site_report.max_error = err
            limit = _model_tolerance(old, [site_report], tolerance)
            if err <= limit:
                site_report.status = "rewritten"
            else:
                spliced.restore()
                site_report.status = "restored"
                site_report.reason = f"error {err:.2e} above tolerance {limit:.0e}"
        return result
    finally:
        for probe in probes:
            gm.graph.erase_node(probe)
        _RECORDED.clear()
        gm.recompile()
