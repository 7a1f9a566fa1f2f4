"""CPU time of quant's int8 projection layer (``Int8Linear``, LLM.int8() style) against the fp32
``nn.Linear`` it replaces, measured in the same run, with its error beside each speed.

    python benchmarks/bench_int8_linear.py [--sizes 256x64x192 1024x1024x1024 ...]
        [--outliers 0 0.01] [--repeats 20] [--threads 1]

Each size is ``tokens x in x out``. ``--outliers``: share of input feature columns given one
value ≥ 6 (kept in fp32 by the layer); 0 is pure INT8. Columns: the fp32 layer's time,
the int8 layer's and their ratio (fp32 / int8, > 1 is faster), the bare ``torch._int_mm`` on
the same operands (the layer's floor), and the int8 output's rel_l1 / cos against fp32. Times are
the best of ``--repeats`` interleaved runs. On a machine loaded from elsewhere, ``--threads 1``
keeps OpenMP's barriers from timing the other load (each multi-threaded op waits for its
slowest thread).
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from attnopt.codegen.eager.int8_linear import Int8Linear
from attnopt.targets import detect_cpu


def best_ms(fns: list, repeats: int) -> list[float]:
    """Each function's best time of ``repeats``, the functions run in turn (interleaved, so a
    load on the machine from elsewhere hits each alike; the best is the least disturbed)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return [1e3 * t for t in best]


def row(tokens: int, d_in: int, d_out: int, outliers: float, repeats: int) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    dense = torch.nn.Linear(d_in, d_out)
    x = torch.randn(tokens, d_in, generator=gen).clamp(-5.9, 5.9)
    count = round(outliers * d_in)
    if count:
        cols = torch.randperm(d_in, generator=gen)[:count]
        x[torch.randint(0, tokens, (count,), generator=gen), cols] = 8.0
    layer = Int8Linear(dense.weight, dense.bias)
    a = torch.randint(-127, 128, (tokens, d_in), dtype=torch.int8, generator=gen)
    with torch.no_grad():
        want, got = dense(x), layer(x)
        fp32, int8, bare = best_ms(
            [lambda: dense(x), lambda: layer(x), lambda: torch._int_mm(a, layer.w_int8.t())],
            repeats,
        )
    rel = float((got - want).abs().sum() / want.abs().sum())
    cos = float(
        torch.nn.functional.cosine_similarity(got.double().flatten(), want.double().flatten(), 0)
    )
    return [
        f"{tokens}x{d_in}x{d_out}", f"{outliers:g} ({count})", f"{fp32:.3f}", f"{int8:.3f}",
        f"{fp32 / int8:.2f}x", f"{bare:.3f}", f"{rel:.2e}", f"{cos:.6f}",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--sizes", nargs="+", default=["256x64x192", "512x1024x1024", "1024x2048x2048"]
    )
    parser.add_argument("--outliers", type=float, nargs="+", default=[0.0, 0.01])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = detect_cpu()
    title = (
        f"Int8Linear vs fp32 nn.Linear, {torch.get_num_threads()} threads, "
        f"int dot: {cpu.int_dot[0] if cpu.int_dot else 'none'}"
    )
    table = Table(title=title)
    for column in ("tokens x in x out", "outlier cols", "fp32 ms", "int8 ms", "fp32/int8",
                   "_int_mm ms", "rel_l1", "cos"):  # fmt: skip
        table.add_column(column)
    for size in args.sizes:
        tokens, d_in, d_out = (int(s) for s in size.split("x"))
        for share in args.outliers:
            table.add_row(*row(tokens, d_in, d_out, share, args.repeats))
    Console().print(table)


if __name__ == "__main__":
    main()
