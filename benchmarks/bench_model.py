"""Whole models end to end: eager attention, HF SDPA, torch.compile, attnopt.optimize, and both.

    python benchmarks/bench_model.py                      # cuda, bf16, n = 1k, 4k, 8k
    python benchmarks/bench_model.py --device cpu --dtype fp32 --layers 2 --hidden 128 --seq 64

An 8-layer Llama-style model (hidden 2048, 16 heads, 4 kv heads) and an 8-layer GPT-2-style model
(hidden 2048, 16 heads), random weights from ``transformers`` configs (no hub access), batch 1.
For each model and sequence length it times one forward pass of: the eager-attention model
(``eager``), the same weights with ``attn_implementation="sdpa"`` (``sdpa``), ``torch.compile`` of
the eager model, ``attnopt.optimize`` of the eager model, and ``torch.compile`` of the optimized
model. Ratios are eager time / variant time; ``err`` is the relative RMS error of the logits
against the eager model. A variant that fails is reported with its error, not raised.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import attnopt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/tiny_hf.py builds the models
from tests import tiny_hf  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VARIANTS = ("eager", "sdpa", "compile(eager)", "attnopt", "compile(attnopt)")


@dataclass
class Row:
    model: str
    n: int
    variant: str
    ms: float | None
    vs_eager: float | None  # eager time / this time: above 1 is faster than eager
    vs_sdpa: float | None
    err: float | None
    note: str = ""


def build(name: str, layers: int, hidden: int, max_len: int) -> torch.nn.Module:
    """A randomly initialised eager-attention model of the given family."""
    sizes = dict(layers=layers, hidden=hidden, heads=16, positions=max_len, use_cache=False)
    if name == "gpt2":
        model = tiny_hf.model("gpt2", **sizes, vocab=50257, bos_token_id=0, eos_token_id=0)
    else:
        model = tiny_hf.model(
            "llama", **sizes, ffn=hidden * 11 // 4, vocab=32000, num_key_value_heads=4
        )
    return model.eval()


def timer(device: str, repeats: int) -> Callable[[Callable], float]:
    """``fn -> median ms`` after warm-up (which also absorbs torch.compile's first call)."""
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median")

    def cpu_median(fn: Callable) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cpu_median


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.float() - expected.float()).norm()
    return (diff / expected.float().norm().clamp_min(1e-12)).item()


def make_variant(name: str, eager: torch.nn.Module, made: dict, example: dict) -> Callable:
    """The module a variant runs; ``made`` holds those already built for this input."""
    if name == "eager":
        return eager
    if name == "sdpa":
        sdpa = copy.deepcopy(eager)
        sdpa.set_attn_implementation("sdpa")
        return sdpa
    if name == "compile(eager)":
        return torch.compile(eager)
    if name == "attnopt":
        return attnopt.optimize(eager, example)
    if "attnopt" not in made:
        raise RuntimeError("attnopt.optimize failed or was not run")
    return torch.compile(made["attnopt"])


def bench(name: str, eager: torch.nn.Module, n: int, variants, device: str, measure) -> list[Row]:
    """One row per variant for one model and sequence length."""
    ids = torch.randint(0, 1000, (1, n), device=device)
    example = {"input_ids": ids}
    made: dict[str, Callable] = {}
    timed: dict[str, tuple[float | None, float | None, str]] = {}
    with torch.no_grad():
        expected = eager(**example).logits
        for variant in variants:
            try:
                module = made[variant] = make_variant(variant, eager, made, example)
                err = rel_rms(module(**example).logits, expected)
                timed[variant] = (measure(lambda m=module: m(**example)), err, "")
            except Exception as error:  # a failing variant is a result, not a crash
                timed[variant] = (None, None, f"{type(error).__name__}: {error}"[:120])
            if device == "cuda":
                torch.cuda.empty_cache()
    base = {key: timed.get(key, (None,))[0] for key in ("eager", "sdpa")}
    rows = []
    for variant, (ms, err, note) in timed.items():
        ratios = [base[key] / ms if ms and base[key] else None for key in ("eager", "sdpa")]
        rows.append(Row(name, n, variant, ms, *ratios, err, note))
    return rows


def show(rows: list[Row], title: str) -> None:
    table = Table(title=title)
    for column in ("model", "n", "variant", "ms", "×eager", "×sdpa", "err"):
        table.add_column(column, justify="left" if column in ("model", "variant") else "right")
    fmt = {"ms": ".2f", "vs_eager": ".2f", "vs_sdpa": ".2f", "err": ".1e"}
    for r in rows:
        cells = ["-" if getattr(r, f) is None else format(getattr(r, f), s) for f, s in fmt.items()]
        if r.ms is None:
            cells[0] = r.note
        table.add_row(r.model, str(r.n), r.variant, *cells)
    Console(width=max(Console().width, 120)).print(table)  # no truncated columns in logs


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="bf16 on cuda")
    parser.add_argument("--models", nargs="+", choices=["llama", "gpt2"], default=["llama", "gpt2"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048, help="16 heads (Llama: 4 kv heads)")
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=10, help="timed runs on CPU")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    measure = timer(device, args.repeats)
    rows: list[Row] = []
    for name in args.models:
        torch.manual_seed(0)
        eager = build(name, args.layers, args.hidden, max(args.seq)).to(device, dtype)
        for n in args.seq:
            rows += bench(name, eager, n, args.variants, device, measure)
            torch.compiler.reset()
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    show(rows, f"{args.layers}-layer models, batch 1, {str(dtype)[6:]} on {where}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
