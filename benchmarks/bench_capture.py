"""How long optimize() takes (capture, detect, rewrite, validate) on a 12-layer model.

    python benchmarks/bench_capture.py [--layers 12] [--model gpt2|llama] [--seq 128]

Prints the phases attnopt reports and the wall time of the whole call (goal: under 10 s on CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import attnopt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/tiny_hf.py builds the models
from tests import tiny_hf  # noqa: E402


def build(name: str, layers: int) -> torch.nn.Module:
    sizes = dict(layers=layers, hidden=768, heads=12, use_cache=False)
    if name == "gpt2":
        gpt2 = dict(vocab=50257, positions=1024, bos_token_id=0, eos_token_id=0)
        return tiny_hf.model("gpt2", **sizes, **gpt2).eval()
    llama = dict(ffn=2048, vocab=32000, positions=2048, num_key_value_heads=4)
    return tiny_hf.model("llama", **sizes, **llama).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--model", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build(args.model, args.layers)
    example = {"input_ids": torch.randint(0, 1000, (args.batch, args.seq))}
    start = time.perf_counter()
    optimized = attnopt.optimize(model, example)
    total = time.perf_counter() - start
    report = optimized.attnopt_report
    table = Table(
        title=f"optimize() on {args.layers}-layer {args.model}, batch {args.batch} × seq {args.seq}"
    )
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    for phase, seconds in report.seconds.items():
        table.add_row(phase, f"{seconds:.2f}")
    table.add_row("wall (whole call)", f"{total:.2f}")
    console = Console()
    console.print(table)
    console.print(
        f"sites rewritten: {len(report.rewritten)}/{len(report.sites)}; "
        f"model output error {report.output_error:.2e}"
    )


if __name__ == "__main__":
    main()
