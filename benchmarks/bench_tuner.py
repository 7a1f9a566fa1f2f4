"""How well the tuner works: exhaustive grid vs TPE, and tuned vs default config vs SDPA.

    python benchmarks/bench_tuner.py                      # Triton exact kernel on the GPU
    python benchmarks/bench_tuner.py --device cpu --kernel tvm
    python benchmarks/bench_tuner.py --shapes b=1,h=16,n=4096,d=128,dtype=bf16,causal=1

For each shape: the grid sampler measures every valid config (the true best, up to noise);
TPE runs ``--tpe-trials`` trials for each of ``--seeds`` seeds, and we count how many trials it
needed before its best config came within 3 % of the grid's best. Both are judged by the grid's
own timing of each config, so noise between runs does not decide the count. Finally the grid's
best config, the kernel's default config and ``torch.nn.functional.scaled_dot_product_attention``
are timed back to back. Every study lives in a throwaway SQLite file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch
import torch.nn.functional as F
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from attnopt.autotune.cli import parse_signature
from attnopt.autotune.kernels import Inputs, inputs, passes, runner
from attnopt.autotune.measure import measure
from attnopt.autotune.strategy import Strategy
from attnopt.autotune.tuner import tune
from attnopt.errors import AttnoptError
from attnopt.targets import resolve

SHAPES = {
    "cuda": (
        "b=4,h=16,n=1024,d=64,dtype=fp16",
        "b=1,h=32,n=4096,d=128,dtype=bf16,causal=1",
        "b=2,h=32,n=2048,d=128,dtype=bf16,causal=1,kv_heads=8",
    ),
    "cpu": ("b=1,h=8,n=512,d=64,dtype=fp32", "b=1,h=8,n=1024,d=64,dtype=fp32,causal=1"),
}
WITHIN = 1.03


def _key(config: dict) -> tuple:
    return tuple(sorted(config.items()))


def _grid_timings(url: str, study: str) -> dict[tuple, float]:
    trials = optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)
    return {_key(t.params): t.value for t in trials if t.state == TrialState.COMPLETE}


def _trials_to_reach(url: str, study: str, grid: dict[tuple, float], goal: float) -> int | None:
    """How many measured TPE trials passed before one's config was within ``goal`` (grid ms)."""
    trials = optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)
    measured = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
    for count, trial in enumerate(sorted(measured, key=lambda t: t.number), start=1):
        if grid.get(_key(trial.params), float("inf")) <= goal:
            return count
    return None


def _sdpa(given: Inputs):
    q, k, v, mask = given.args
    if given.flags["window"]:
        return None  # SDPA has no sliding window without a materialised mask
    return lambda: F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=given.flags["causal"] and mask is None,
        scale=given.flags["scale"],
        enable_gqa=q.shape[1] != k.shape[1],
    )


def bench_shape(shape: str, args: argparse.Namespace, tmp: Path) -> dict:
    sig = parse_signature(shape)
    target = resolve("auto" if args.device == "cuda" else "cpu")
    kernel = passes(args.kernel)[0]
    build = runner(kernel, sig, target)
    valid = Strategy(kernel.space, target, sig).valid
    url = f"sqlite:///{tmp / (shape.replace(',', '_') + '.db')}"

    start = time.perf_counter()
    grid = tune(
        kernel.space,
        build,
        target,
        sig,
        trials=len(valid) + 1,
        storage=url,
        sampler="grid",
        budget_ms=args.budget_ms,
    )
    grid_s = time.perf_counter() - start
    timings = _grid_timings(url, grid.study)
    needed = []
    for seed in range(args.seeds):
        tpe_url = url.replace(".db", f"-tpe{seed}.db")
        tpe = tune(
            kernel.space,
            build,
            target,
            sig,
            trials=args.tpe_trials,
            storage=tpe_url,
            sampler="tpe",
            seed=seed,
            budget_ms=args.budget_ms,
        )
        needed.append(_trials_to_reach(tpe_url, tpe.study, timings, WITHIN * grid.ms))

    final_ms = args.budget_ms * 4
    default = kernel.space.default(target, sig)
    tuned_ms = None if grid.config is None else measure(build, grid.config, target, final_ms).ms
    default_ms = measure(build, default, target, final_ms)
    sdpa = _sdpa(inputs(sig, target))
    sdpa_ms = None if sdpa is None else measure(lambda _: sdpa, {}, target, final_ms).ms
    return {
        "shape": shape,
        "kernel": kernel.space.kernel,
        "valid_configs": len(valid),
        "grid_failed": grid.failed,
        "grid_seconds": round(grid_s, 1),
        "grid_best_ms": grid.ms,
        "grid_best_config": grid.config,
        "tpe_trials": args.tpe_trials,
        "tpe_trials_to_3pct": needed,
        "tuned_ms": tuned_ms,
        "default_config": default,
        "default_ms": default_ms.ms,
        "default_error": default_ms.error,
        "sdpa_ms": sdpa_ms,
    }


def _fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.4f}"


def _ratio(other: float | None, tuned: float | None) -> str:
    return "-" if other is None or not tuned else f"{other / tuned:.2f}x"


def _table(rows: list[dict], device: str) -> Table:
    table = Table(title=f"tuner benchmark on {device}: grid vs TPE, tuned vs default vs SDPA")
    columns = (
        "shape",
        "valid",
        "grid best ms",
        "TPE trials to 3%",
        "tuned ms",
        "default ms",
        "SDPA ms",
        "default/tuned",
        "SDPA/tuned",
    )
    for column in columns:
        table.add_column(column)
    for r in rows:
        needed = [
            str(n) if n is not None else f">{r['tpe_trials']}" for n in r["tpe_trials_to_3pct"]
        ]
        found = [n for n in r["tpe_trials_to_3pct"] if n is not None]
        median = f" (median {statistics.median(found):g})" if len(found) == len(needed) else ""
        tuned = r["tuned_ms"]
        table.add_row(
            r["shape"],
            str(r["valid_configs"]),
            _fmt(r["grid_best_ms"]),
            ", ".join(needed) + median,
            _fmt(tuned),
            _fmt(r["default_ms"]),
            _fmt(r["sdpa_ms"]),
            _ratio(r["default_ms"], tuned),
            _ratio(r["sdpa_ms"], tuned),
        )
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--kernel", help="triton, tvm or a module path (default: by device)")
    parser.add_argument("--shapes", nargs="+", help="signatures, as attnopt tune takes them")
    parser.add_argument("--tpe-trials", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget-ms", type=float, default=50.0, help="timing per config")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.kernel = args.kernel or ("triton" if args.device == "cuda" else "tvm")
    console = Console()
    if args.device == "cuda" and not torch.cuda.is_available():
        console.print(
            "bench_tuner: no CUDA device here; the Triton benchmark needs a GPU "
            "(run it on one, or use --device cpu --kernel tvm)"
        )
        return 2
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for shape in args.shapes or SHAPES[args.device]:
                rows.append(bench_shape(shape, args, Path(tmp)))
                console.print(_table(rows[-1:], args.device))
    except AttnoptError as error:
        console.print(f"bench_tuner: {error}")
        return 2
    console.print(_table(rows, args.device))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
