"""Tensor attention: the fused kernel against the naive einsum, time and peak memory.

    python benchmarks/bench_tensor.py                          # CPU, n = 32 64 128, fp32
    python benchmarks/bench_tensor.py --n 64 128 256 --causal
    python benchmarks/bench_tensor.py --device cuda --n 256 512 1024 2048

``naive`` is ``codegen/reference/tensor.py`` (the ``(B, H, n, m, m)`` scores built), ``fused``
the kernel the dispatch picks for the device (``codegen/eager/tensor.py`` on CPU, the Triton
kernel on CUDA). Each (impl, n) runs in a process of its own on CPU, so its peak memory is the
growth of that process's peak resident set over its baseline after the inputs exist; on CUDA,
``torch.cuda.max_memory_allocated`` over the inputs. Time: median of ``--repeats`` runs after one
warm-up. The naive form is skipped where its scores alone would pass ``--naive-limit-gib``.
Work per call: ``B·H·n·m²·(2·D + 2·Dv)`` FLOPs (written out in ``flops``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from attnopt.codegen.reference.tensor import tensor_attention as naive
from attnopt.codegen.tensor_ops import tensor_forward


def flops(batch: int, heads: int, n: int, d: int) -> float:
    return float(batch) * heads * n * n * n * (2 * d + 2 * d)


def _inputs(args, n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, n, args.d)
    return [(torch.randn(shape, generator=gen) * 0.5).to(args.device) for _ in range(5)]


def _run(impl: str, args, inputs: list[torch.Tensor]) -> torch.Tensor:
    fn = naive if impl == "naive" else tensor_forward
    return fn(*inputs, scale=args.d**-0.5, causal=args.causal)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_one(impl: str, args, n: int) -> dict:
    """Peak memory above the inputs and median time of one impl at one n (in this process)."""
    torch.set_num_threads(args.threads)
    inputs = _inputs(args, n)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        out = _run(impl, args, inputs)
        _sync(args.device)
        if args.device == "cuda":
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            _run(impl, args, inputs)
            _sync(args.device)
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_bytes": max(peak, 0), "out": out.cpu()}


def _child(impl: str, args, n: int) -> dict:
    cmd = [sys.executable, __file__, "--one", impl, "--n", str(n), *_common(args)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _common(args) -> list[str]:
    flags = ["--batch", str(args.batch), "--heads", str(args.heads), "--d", str(args.d)]
    flags += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
    flags += ["--device", args.device] + (["--causal"] if args.causal else [])
    return flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--naive-limit-gib", type=float, default=2.0)
    parser.add_argument("--one", choices=("naive", "fused"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        row = measure_one(args.one, args, args.n[0])
        torch.save(row.pop("out"), f"/tmp/bench_tensor_{args.one}_{args.n[0]}.pt")
        print(json.dumps(row))
        return
    kind = "causal" if args.causal else "full"
    table = Table(
        title=f"tensor attention, {args.device}, fp32, B={args.batch} H={args.heads} "
        f"D={args.d} {kind}, {args.threads} threads"
    )
    for col in ("n", "naive ms", "fused ms", "fused/naive time", "naive MiB", "fused MiB"):
        table.add_column(col, justify="right")
    table.add_column("fused GFLOP/s", justify="right")
    table.add_column("max |fused − naive|", justify="right")
    for n in args.n:
        scores_gib = args.batch * args.heads * n**3 * 4 / 2**30
        rows = {"fused": _child("fused", args, n) if args.device == "cpu" else None}
        if args.device == "cuda":
            rows["fused"] = measure_one("fused", args, n)
        if scores_gib <= args.naive_limit_gib:
            rows["naive"] = (
                _child("naive", args, n) if args.device == "cpu" else measure_one("naive", args, n)
            )
        fused = rows["fused"]
        gflops = flops(args.batch, args.heads, n, args.d) / fused["seconds"] / 1e9
        if "naive" in rows:
            nv = rows["naive"]
            if args.device == "cpu":
                outs = [torch.load(f"/tmp/bench_tensor_{i}_{n}.pt") for i in ("fused", "naive")]
            else:
                outs = [fused["out"], nv["out"]]
            err = f"{(outs[0] - outs[1]).abs().max().item():.1e}"
            cells = [
                f"{nv['seconds'] * 1e3:.2f}",
                f"{fused['seconds'] * 1e3:.2f}",
                f"{fused['seconds'] / nv['seconds']:.2f}",
                f"{nv['peak_bytes'] / 2**20:.1f}",
            ]
        else:
            err = "-"
            skipped = f"skipped ({scores_gib:.1f} GiB scores)"
            cells = [skipped, f"{fused['seconds'] * 1e3:.2f}", "-", "-"]
        table.add_row(str(n), *cells, f"{fused['peak_bytes'] / 2**20:.1f}", f"{gflops:.2f}", err)
    Console().print(table)


if __name__ == "__main__":
    main()
