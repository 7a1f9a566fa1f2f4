"""``optimize(search=True)``: an Optuna multi-objective study choosing each site's variant and
knobs (the passes' ``knobs``, declared as data) for model time and model error.

Each trial splices one plan, measures every site and the model output on the calibration
batches (``budget.measure``) and times the model on the first batch. A plan outside the budget
(any site, or the model) is infeasible: its violation goes to NSGA-II as a constraint. The
fastest feasible plan on the front is kept; the report lists the front.
"""

from __future__ import annotations

import statistics
import time

import torch

from attnopt.budget import Budget, SitePlan, measure
from attnopt.frontends.fx.rewrite import splice
from attnopt.report import VariantTrial


def _excess(metrics: dict[str, float], limits: dict[str, float]) -> float:
    """How far ``metrics`` are past ``limits`` (≤ 0 within)."""
    worst = -1.0
    for name, limit in limits.items():
        value = metrics[name]
        if value != value:
            return float("inf")
        worst = max(worst, limit - value if name == "cos" else value - limit)
    return worst


def _time_ms(gm, batch, repeats: int = 3) -> float:
    with torch.no_grad():
        gm(*batch.args, **batch.kwargs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            gm(*batch.args, **batch.kwargs)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _suggest(trial, index: int, p: SitePlan) -> tuple:
    names = [c[0].name for c in p.candidates]
    name = trial.suggest_categorical(f"site{index}", names)
    chosen = next(c[0] for c in p.candidates if c[0].name == name)
    fixed = p.fixed.get(name, {})
    knobs = {
        knob: fixed[knob]
        if knob in fixed
        else trial.suggest_categorical(f"site{index}.{name}.{knob}", list(choices))
        for knob, choices in chosen.knobs.items()
    }
    return chosen, knobs


def search_plans(
    gm, view, plans: list[SitePlan], batches, references, budget: Budget, exact_limit, trials: int
) -> tuple[dict[str, float], list[dict]]:
    """Run the study, splice the chosen plan; returns its model metrics and the Pareto front."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    active = [(i, p) for i, p in enumerate(plans) if p.candidates]

    sampler = optuna.samplers.NSGAIISampler(seed=0)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    for _ in range(trials):
        trial = study.ask()
        chosen = {i: _suggest(trial, i, p) for i, p in active}
        spliced = {i: splice(gm, view, p.site, c.replacement(p.site, **k)) for (i, p), (c, k) in
                   ((ip, chosen[ip[0]]) for ip in active)}  # fmt: skip
        sites, model = measure(gm, spliced, batches, references)
        excess = _excess(model.metrics(), budget.model)
        for i, (c, _) in chosen.items():
            m = sites[i].metrics()
            limit = (
                budget.site_limits(c)
                if c.approximate
                else {"max_error": exact_limit(plans[i].site.dtype)}
            )
            excess = max(excess, _excess(m, limit))
        ms = _time_ms(gm, batches[0])
        for s in spliced.values():
            s.remove()
        gm.recompile()
        plan = [f"{plans[i].report.location}: {c.name} {k}" for i, (c, k) in chosen.items()]
        trial.set_user_attr("excess", excess)
        trial.set_constraint("budget", excess)  # NSGA-II ranks infeasible plans after feasible
        trial.set_user_attr("plan", plan)
        study.tell(trial, [ms, model.metrics()["rel_l1"]])
    front = [t for t in study.best_trials if t.user_attrs["excess"] <= 0]
    pareto = [
        {"trial": t.number, "ms": t.values[0], "model_rel_l1": t.values[1],
         "plan": t.user_attrs["plan"]}
        for t in sorted(front, key=lambda t: t.values[0])
    ]  # fmt: skip
    best = min(front, key=lambda t: t.values[0]) if front else None
    for i, p in active:
        if best is None:  # nothing feasible: exact where allowed
            exact = next((c for c in p.candidates if not c[0].approximate), None)
            if exact is None:
                continue
            p.position = p.candidates.index(exact)
        else:
            name = best.params[f"site{i}"]
            chosen = next(c[0] for c in p.candidates if c[0].name == name)
            fixed = p.fixed.get(name, {})
            knobs = {k: fixed.get(k, best.params.get(f"site{i}.{name}.{k}")) for k in chosen.knobs}
            p.candidates.append((chosen, knobs))
            p.position = len(p.candidates) - 1
        chosen, knobs = p.current
        p.live = splice(gm, view, p.site, chosen.replacement(p.site, **knobs))
    live = {i: p.live for i, p in active if p.live is not None}
    sites, model = measure(gm, live, batches, references)
    for i in live:
        p = plans[i]
        p.metrics = sites[i].metrics()
        decision = "kept (search)" if best is not None else "kept (search found no feasible plan)"
        p.report.trials.append(
            VariantTrial(p.current[0].name, dict(p.current[1]), p.metrics, decision)
        )
    return model.metrics(), pareto
