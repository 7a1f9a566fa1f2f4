"""How long optimize() takes (capture, detect, rewrite, validate) on a 12-layer model.

    python benchmarks/bench_capture.py [--layers 12] [--model gpt2|llama] [--seq 128]

Prints the phases attnopt reports and the wall time of the whole call (goal: under 10 s on CPU).
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import attnopt


def build(name: str, layers: int) -> torch.nn.Module:
    if name == "gpt2":
        config = GPT2Config(
            n_layer=layers,
            n_embd=768,
            n_head=12,
            vocab_size=50257,
            bos_token_id=0,
            eos_token_id=0,
            use_cache=False,
            attn_implementation="eager",
        )
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=768,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=2048,
        vocab_size=32000,
        use_cache=False,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


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
