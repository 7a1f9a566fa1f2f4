"""The quality fixture (tests/fixtures/tiny_lm.py) with each linear-family variant: held-out
perplexity, site error and tokens/s, before and after ``attnopt.calibrate``.

    python benchmarks/bench_quality.py [--steps 100] [--variants linear gla hybrid]
        [--model-rel-l1 0.02 0.3]

Every site is forced to the variant (no exact fallback, a budget nothing fails) so the table
shows the variant's own quality (default knobs: hedgehog feature map, window 64); ``exact`` is
the original model. Held-out text: fractions.py.

A second table lets the error budget choose: every site may take ``hybrid``, ``gla``,
``linear`` or ``exact`` (in that order) under ``rel_l1 ≤ 0.5, cos ≥ 0.8`` per site and each
``--model-rel-l1`` level for the logits; it gives each plan's perplexity and tokens/s.

    python benchmarks/bench_quality.py --conv-basis [--budgets 0.01 0.05 0.2] [--long 8192]

``--conv-basis`` runs the ALiBi twin of the fixture (``tiny_lm_alibi.pt``) with variants
``("conv_basis", "exact")`` at each site budget (``rel_l1``, also the model budget): the heads
conv-basis takes (k and error per head), the held-out perplexity, and the time of one forward
pass at each ``--long`` context against the original model.

    python benchmarks/bench_quality.py --quant

``--quant`` runs ``("quant", "exact")`` under quant's default budget (cos ≥ 0.995, rel_l1 ≤
0.03 per site) with and without ``quant_projections``: each site's measured cos / rel_l1 (with
projections, measured at the output projection's output), the logits' rel_l1 and the held-out
perplexity change.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fixture lives under tests/
import attnopt  # noqa: E402
from attnopt.calibrate import site_errors  # noqa: E402
from tests.fixtures.tiny_lm import (  # noqa: E402
    HELD_OUT_FILES,
    TRAIN_FILES,
    batches,
    load,
    perplexity,
    text_bytes,
)

ANYTHING = {"cos": -1.0, "rel_l1": 1e9}  # keep the variant whatever its error


def tokens_per_s(model, tokens: torch.Tensor, repeats: int = 5) -> float:
    with torch.no_grad():
        model(tokens)
        start = time.perf_counter()
        for _ in range(repeats):
            model(tokens)
    return repeats * tokens.numel() / (time.perf_counter() - start)


def mean_rel_l1(errors: dict) -> float:
    return sum(e["rel_l1"] for e in errors.values()) / len(errors)


def forward_s(model, n: int) -> float:
    tokens = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        start = time.perf_counter()
        model(tokens)
    return time.perf_counter() - start


def conv_basis_table(budgets: list[float], long: list[int]) -> None:
    """Share of heads conv-basis takes on the ALiBi fixture per budget, ppl, long-context time."""
    train, held = text_bytes(TRAIN_FILES), text_bytes(HELD_OUT_FILES)
    cal = [(b,) for b in batches(train, 2, 128, 4, seed=7)]
    model = load(alibi=True)
    base = {n: forward_s(model, n) for n in long}
    table = Table(title="conv_basis on the ALiBi fixture (byte LM, 2 layers, 4 heads, d=64)")
    for column in ("budget rel_l1", "conv heads", "ppl", *(f"s @{n} (exact)" for n in long)):
        table.add_column(column)
    table.add_row(
        "exact", "0/8", f"{perplexity(model, held):.3f}", *(f"{t:.2f}" for t in base.values())
    )
    for budget in budgets:
        opt = attnopt.optimize(
            model,
            cal[0],
            variants=("conv_basis", "exact"),
            tolerance={"rel_l1": budget},
            calibration=cal,
        )
        for site in opt.attnopt_report.sites:
            Console().print(f"budget {budget}: {site.location} -> {site.variant}")
            for r in site.trials[0].heads:
                Console().print(f"  head {r['head']} k={r['k']} rel_l1={r['rel_l1']:.3e} "
                                f"{r['variant']} {r.get('reason', '')}")  # fmt: skip
        taken = sum(
            r["variant"] == "conv_basis"
            for site in opt.attnopt_report.sites
            if site.variant == "conv_basis"
            for r in site.trials[0].heads
        )
        times = (f"{forward_s(opt, n):.2f} ({base[n]:.2f})" for n in long)
        table.add_row(f"{budget:g}", f"{taken}/8", f"{perplexity(opt, held):.3f}", *times)
    Console().print(table)


def quant_table() -> None:
    """quant with and without int8 projections on the fixture, within quant's default budget."""
    train, held = text_bytes(TRAIN_FILES), text_bytes(HELD_OUT_FILES)
    cal = [(b,) for b in batches(train, 2, 128, 4, seed=7)]
    model = load()
    base = perplexity(model, held)
    table = Table(title=f"quant on the quality fixture (held-out ppl exact {base:.4f})")
    for column in ("quant_projections", "site", "decision", "cos", "rel_l1", "rmse",
                   "logits rel_l1 (cal)", "ppl", "Δppl"):  # fmt: skip
        table.add_column(column)
    for projections in (False, True):
        opt = attnopt.optimize(
            model,
            cal[0],
            variants=("quant", "exact"),
            calibration=cal,
            knobs={"quant": {"quant_projections": projections}},
        )
        report, ppl = opt.attnopt_report, perplexity(opt, held)
        for site in report.sites:
            trial = site.trials[0]
            m = trial.metrics
            table.add_row(
                str(projections), site.location, trial.decision, f"{m['cos']:.6f}",
                f"{m['rel_l1']:.2e}", f"{m['rmse']:.2e}", f"{report.model_metrics['rel_l1']:.2e}",
                f"{ppl:.4f}", f"{ppl - base:+.4f}",
            )  # fmt: skip
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100, help="calibration steps")
    parser.add_argument("--variants", nargs="+", default=["linear", "gla", "hybrid"])
    parser.add_argument(
        "--model-rel-l1", nargs="+", type=float, default=[0.02, 0.3], help="model budget levels"
    )

    parser.add_argument("--conv-basis", action="store_true", help="the ALiBi conv_basis table")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    parser.add_argument("--long", type=int, nargs="*", default=[8192], help="contexts to time")
    parser.add_argument("--quant", action="store_true", help="quant with/without projections")
    args = parser.parse_args()
    if args.quant:
        quant_table()
        return
    if args.conv_basis:
        conv_basis_table(args.budgets, args.long)
        return
    train, held = text_bytes(TRAIN_FILES), text_bytes(HELD_OUT_FILES)
    cal = [(b,) for b in batches(train, 4, 128, 8, seed=7)]
    evaluate = [(b,) for b in batches(held, 2, 128, 8, seed=9)]
    timing = batches(held, 1, 128, 8, seed=11)[0]
    model = load()
    table = Table(title="quality fixture (byte LM, 2 layers, d=64) on held-out fractions.py")
    for column in ("variant", "ppl", "site rel_l1", "tokens/s", f"ppl after {args.steps} steps",
                   "site rel_l1 after", "transfer loss first→last"):  # fmt: skip
        table.add_column(column)
    exact = (f"{perplexity(model, held):.3f}", "0", f"{tokens_per_s(model, timing):.0f}")
    table.add_row("exact", *exact, "-", "-", "-")
    for variant in args.variants:
        opt = attnopt.optimize(
            model, cal[0], variants=(variant,), tolerance=ANYTHING, calibration=cal
        )
        before = site_errors(opt, evaluate)
        ppl = perplexity(opt, held)
        speed = tokens_per_s(opt, timing)
        losses = attnopt.calibrate(opt, cal, steps=args.steps)
        after = site_errors(opt, evaluate)
        table.add_row(
            variant,
            f"{ppl:.3f}",
            f"{mean_rel_l1(before):.3e}",
            f"{speed:.0f}",
            f"{perplexity(opt, held):.3f}",
            f"{mean_rel_l1(after):.3e}",
            f"{losses[0]:.2e}→{losses[-1]:.2e}",
        )
        Console().print(table)  # after each variant, so a long run shows progress
    budget_plans(model, cal, held, timing, args.model_rel_l1)


def budget_plans(model, cal, held, timing, levels: list[float]) -> None:
    """The plans the budget chooses at each model-level tolerance, and their quality."""
    table = Table(title="plans the error budget chooses (site rel_l1 ≤ 0.5, cos ≥ 0.8)")
    for column in ("model_rel_l1 ≤", "plan", "model rel_l1 (cal)", "ppl", "tokens/s"):
        table.add_column(column)
    for level in levels:
        tolerance = {"rel_l1": 0.5, "cos": 0.8, "model_rel_l1": level}
        opt = attnopt.optimize(
            model,
            cal[0],
            variants=("hybrid", "gla", "linear", "exact"),
            tolerance=tolerance,
            calibration=cal,
        )
        report = opt.attnopt_report
        plan = ", ".join(f"{s.location}: {s.variant}" for s in report.sites)
        table.add_row(
            f"{level:g}",
            plan,
            f"{report.model_metrics['rel_l1']:.3e}",
            f"{perplexity(opt, held):.3f}",
            f"{tokens_per_s(opt, timing):.0f}",
        )
        Console().print(table)


if __name__ == "__main__":
    main()
