"""Tensor attention: the fused kernel against the naive einsum, time and peak memory.

    python benchmarks/bench_tensor.py                          # CPU, n = 64 … 1024, fp32
    python benchmarks/bench_tensor.py --n 64 128 256 --causal --threads 2
    python benchmarks/bench_tensor.py --n 128 256 --poly 2     # + the polynomial form, its error
    python benchmarks/bench_tensor.py --n 256 512 1024 --causal --window 64
    python benchmarks/bench_tensor.py --n 128 256 512 --causal --backward   # training step
    python benchmarks/bench_tensor.py --device cuda --n 256 512 1024 2048

``naive`` is ``codegen/reference/tensor.py`` (the ``(B, H, n, m, m)`` scores built), ``fused``
the kernel the dispatch picks for the device (``codegen/eager/tensor.py`` on CPU, the Triton
kernel on CUDA), ``poly`` the polynomial approximation of degree ``--poly``. Each (impl, n) runs
in a process of its own on CPU, so its peak memory is the growth of that process's peak
resident set over its baseline after the inputs exist; on CUDA, ``torch.cuda.max_memory_allocated``
over the inputs. Time: median of ``--repeats`` runs after one warm-up. The naive form is skipped
where its scores alone would pass ``--naive-limit-gib`` (the table says how much it would need).
Work per call: ``B·H·n·m²·(2·D + 2·Dv)`` FLOPs, fewer when causal or windowed (``flops``).
The title gives the load average before and after (the CPU may be shared) and
``OMP_WAIT_POLICY``: with more runnable threads than cores, libgomp's default spinning wait
makes every multi-threaded torch op wait for a time slice, which the naive form's few large ops
and the fused form's worker threads (one intra-op thread each) mostly avoid.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from attnopt.codegen.reference.exact import structural_keep
from attnopt.codegen.reference.tensor import polynomial_tensor_attention
from attnopt.codegen.reference.tensor import tensor_attention as naive
from attnopt.codegen.tensor_ops import tensor_forward


def flops(batch: int, heads: int, n: int, d: int, causal: bool = False, window: int = 0) -> float:
    """Pairs visited (``Σ_i c_i²`` for ``c_i`` keys kept for query ``i``) times ``2·D + 2·Dv``."""
    kept = structural_keep(n, n, causal, window, torch.device("cpu")).sum(dim=1).double()
    return float(batch) * heads * kept.square().sum().item() * (2 * d + 2 * d)


def _inputs(args, n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, n, args.d)
    made = [(torch.randn(shape, generator=gen) * 0.5).to(args.device) for _ in range(5)]
    return [t.requires_grad_(args.backward) for t in made]


def _run(impl: str, args, inputs: list[torch.Tensor]) -> torch.Tensor:
    kw = {"scale": args.d**-0.5, "causal": args.causal, "window": args.window}
    if impl == "poly":
        out = polynomial_tensor_attention(*inputs, degree=args.poly, **kw)
    else:
        out = (naive if impl == "naive" else tensor_forward)(*inputs, **kw)
    if args.backward:
        out.square().sum().backward()
    return out.detach()


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
    with torch.set_grad_enabled(args.backward):
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


def _measure(impl: str, args, n: int) -> dict:
    """On CPU in a child process (its own peak resident set), on CUDA here."""
    if args.device == "cuda":
        return measure_one(impl, args, n)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        cmd = [sys.executable, __file__, "--one", impl, "--out", out, "--n", str(n)]
        done = subprocess.run([*cmd, *_common(args)], capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["out"] = torch.load(out)
    return row


def _common(args) -> list[str]:
    flags = ["--batch", str(args.batch), "--heads", str(args.heads), "--d", str(args.d)]
    flags += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
    flags += ["--device", args.device, "--poly", str(args.poly)]
    flags += ["--window", str(args.window)] + (["--causal"] if args.causal else [])
    return flags + (["--backward"] if args.backward else [])


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _ms(row: dict) -> str:
    return f"{row['seconds'] * 1e3:.1f}"


def _mib(row: dict) -> str:
    return f"{row['peak_bytes'] / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--window", type=int, default=0, help="windowed pairs (with --causal)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--naive-limit-gib", type=float, default=2.0)
    parser.add_argument("--poly", type=int, default=0, help="also the polynomial of this degree")
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--one", choices=("naive", "fused", "poly"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        row = measure_one(args.one, args, args.n[0])
        torch.save(row.pop("out"), args.out)
        print(json.dumps(row))
        return
    load_before = _load()
    results = []
    for n in args.n:
        scores_gib = args.batch * args.heads * n**3 * 4 / 2**30
        rows = {"fused": _measure("fused", args, n)}
        if scores_gib <= args.naive_limit_gib:
            rows["naive"] = _measure("naive", args, n)
        if args.poly:
            rows["poly"] = _measure("poly", args, n)
        results.append((n, scores_gib, rows))
    kind = ("causal" if args.causal else "full") + (f" window {args.window}" if args.window else "")
    kind += ", forward + backward" if args.backward else ""
    table = Table(
        title=f"tensor attention, {args.device}, fp32, B={args.batch} H={args.heads} "
        f"D={args.d} {kind}, {args.threads} thread(s), load {load_before} -> {_load()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    cols = ["n", "naive ms", "fused ms", "naive/fused time", "naive MiB", "fused MiB"]
    cols += ["naive/fused memory", "fused GFLOP/s", "max |fused − naive|"]
    if args.poly:
        cols += [f"poly{args.poly} ms", "fused/poly time", "poly MiB", "poly rel. error"]
    for col in cols:
        table.add_column(col, justify="right")
    for n, scores_gib, rows in results:
        fused = rows["fused"]
        gflops = (
            flops(args.batch, args.heads, n, args.d, args.causal, args.window)
            / fused["seconds"]
            / 1e9
        )
        if "naive" in rows:
            nv = rows["naive"]
            cells = [_ms(nv), _ms(fused), f"{nv['seconds'] / fused['seconds']:.2f}", _mib(nv)]
            cells += [_mib(fused), f"{nv['peak_bytes'] / max(fused['peak_bytes'], 1):.1f}"]
            err = f"{(fused['out'] - nv['out']).abs().max().item():.1e}"
        else:
            skipped = f"skipped: scores alone {scores_gib:.1f} GiB"
            cells = [skipped, _ms(fused), "-", "-", _mib(fused), "-"]
            err = "-"
        cells += ["-" if args.backward else f"{gflops:.2f}", err]  # forward FLOPs only
        if args.poly:
            poly = rows["poly"]
            rel = (poly["out"] - fused["out"]).norm() / fused["out"].norm()
            cells += [_ms(poly), f"{fused['seconds'] / poly['seconds']:.2f}", _mib(poly)]
            cells.append(f"{rel.item():.1e}")
        table.add_row(str(n), *cells)
    Console(width=250).print(table)


if __name__ == "__main__":
    main()
