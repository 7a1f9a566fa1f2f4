"""Optimize a small GPT-2-style model (random weights, built from a config) and compare it with
the original: the site report, the output error and the speed of both, on this machine."""

from __future__ import annotations

import statistics
import time

import torch
from rich.console import Console
from transformers import GPT2Config, GPT2LMHeadModel

import attnopt


def median_ms(models: dict, inputs: dict, rounds: int = 15) -> dict[str, float]:
    """Median wall time (ms) of each model, measured in alternating turns after a warm-up, so
    both see the same machine state (thread pools, caches, other load)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(**inputs)
            model(**inputs)
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(**inputs)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    console = Console()
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=4,
        n_embd=256,
        n_head=8,
        n_positions=1024,
        vocab_size=1000,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
        use_cache=False,
    )
    model = GPT2LMHeadModel(config).eval()
    example = {"input_ids": torch.randint(0, 1000, (2, 128))}
    optimized = attnopt.optimize(model, example)
    optimized.attnopt_report.print(console)

    # A different batch size and sequence length than the example: the module is dynamic.
    other = {"input_ids": torch.randint(0, 1000, (3, 200))}
    with torch.no_grad():
        err = (optimized(**other).logits - model(**other).logits).abs().max().item()
    timings = median_ms({"original": model, "optimized": optimized}, other)
    original_ms, optimized_ms = timings["original"], timings["optimized"]
    console.print(
        f"batch 3 × seq 200: max |logits diff| = {err:.2e}; original {original_ms:.1f} ms, "
        f"optimized {optimized_ms:.1f} ms ({original_ms / optimized_ms:.2f}× speed)"
    )


if __name__ == "__main__":
    main()
