"""Exact-attention kernels against SDPA and eager attention: time, TFLOP/s, ratio to SDPA.

    python benchmarks/bench_attention.py                       # cuda: triton, bf16 shape grid
    python benchmarks/bench_attention.py --device cpu --backend tvm
    python benchmarks/bench_attention.py --device cpu --backend reference --n 128 --d 64
    python benchmarks/bench_attention.py --decode --device cpu --threads 1   # decode grid

``--decode`` times 1 to 16 queries (``--queries``) against a cache (``--cache`` lengths): the
decode kernel (``tvm_decode`` on CPU, ``triton_decode`` on CUDA, even where the dispatch would
pick another, which the note then says), ``attnopt`` (the ``attnopt::attention`` op with its
dispatch; the note names the kernel it picked) and SDPA (bottom-right causal as a bool mask
when n > 1). ``--rounds 3`` takes the best of three turns per impl on a shared machine.

    python benchmarks/bench_attention.py --device cpu --backend tvm --cpu-target avx2 --always

``--cpu-target avx2`` builds the TVM kernels for AVX2 on any newer CPU (``ATTNOPT_CPU_TARGET``);
to hold torch (SDPA, eager) to AVX2 as well, start the process with ``ATEN_CPU_CAPABILITY=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2``; the title names both. ``--always`` times
the kernel where its ``supports`` declines for size (to check a dispatch threshold like the TVM
kernel's ``MIN_WORK``); a broken contract still becomes a note. ``--with-projection`` runs the
(n, h·d) × (h·d, h·d) output projection a model runs after attention before every timed call, so
each time includes the hand-off between torch's thread pool and the kernel's (the times and
ratios are of projection + attention; the note gives the projection alone, "proj").

For each shape (batch, heads, n, head_dim, causal, kv_heads) one process times the kernel that
``--backend`` names in the registry for the device, ``F.scaled_dot_product_attention`` (its default
backend) and eager matmul-softmax-matmul. Median of timed runs after warm-up: ``do_bench`` on CUDA,
``torch.utils.benchmark`` on CPU. ``--json`` writes the rows, ``--plot`` draws TFLOP/s against n.

    python benchmarks/bench_attention.py --variant linear --device cpu --n 4096 16384

    python benchmarks/bench_attention.py --variant quant --device cpu --n 1024 4096 16384

``quant`` times the kernel its dispatch picks (``--bits``, ``--pv``) against SDPA and the best
exact kernel (``--backend``) at each n and d (``--d``, default 64 128; causal unless
``--no-causal``), with cos and rel_l1 against SDPA beside each speed.
Approximate variants (``linear``, ``gla``, ``hybrid``) time the rewritten site's module (the
kernel it dispatches to for the device) against causal SDPA on the same random q, k, v, with
the measured error against SDPA's output beside each speed (cos and rel_l1).

    python benchmarks/bench_attention.py --variant conv_basis --device cpu --threads 1 --k 1 4

``conv_basis`` times its site module (every head conv-basis, basis recovered on each call)
against causal SDPA on q, k whose scores have exactly ``k`` segments (``--k``): rotary-style
``q_i = [cos ω i, sin ω i]``, ``k_j = a_t(j)·[cos ω j, sin ω j]`` with one amplitude per key
segment, so ``q_i·k_j`` depends on ``i − j`` and the segment alone. The k column is the count
the module recovered; SDPA is timed once per n.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from attnopt.codegen import ops  # noqa: F401  (registers the reference and compiled kernels)
from attnopt.codegen.reference.exact import structural_keep
from attnopt.codegen.registry import Kernel, kernels_for, select_kernel
from attnopt.errors import KernelError
from attnopt.targets import CPU_LEVELS, CPU_TARGET_ENV, detect_cpu

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENS = 16384  # batch × n held fixed on CUDA, as FlashAttention's benchmarks do
HIDDEN = 2048  # heads × head_dim on CUDA


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    n: int
    head_dim: int
    causal: bool
    kv_heads: int
    m: int | None = None  # keys (the cache when decoding); None: n

    @property
    def keys(self) -> int:
        return self.m or self.n

    @property
    def flops(self) -> int:
        """Forward FLOPs: two matmuls of 2·n·m·d each per head; causal computes half (n = m)."""
        full = 4 * self.batch * self.heads * self.n * self.keys * self.head_dim
        return full // 2 if self.causal and self.m is None else full


@dataclass
class Row:
    batch: int
    heads: int
    kv_heads: int
    n: int
    head_dim: int
    causal: bool
    dtype: str
    impl: str
    ms: float | None
    tflops: float | None
    vs_sdpa: float | None  # SDPA time / this time: above 1 is faster than SDPA
    rel_err: float | None  # relative RMS error against SDPA's output
    note: str = ""
    m: int | None = None


def default_shapes(device: str, ns: list[int] | None, ds: list[int] | None, causal) -> list[Shape]:
    """The grid of the README: long sequences on CUDA, a CPU-sized grid otherwise."""
    gpu = device == "cuda"
    ns = ns or ([1024, 4096, 16384, 65536] if gpu else [256, 1024, 4096])
    ds = ds or [64, 128]
    flags = [False, True] if causal is None else [causal]
    shapes = []
    for d in ds:
        for is_causal in flags:
            for n in ns:
                batch, heads = (max(1, TOKENS // n), HIDDEN // d) if gpu else (1, 8)
                shapes.append(Shape(batch, heads, n, d, is_causal, heads))
    gqa_n = 4096 if gpu else ns[-1]
    shapes.append(Shape(1, 32 if gpu else 8, gqa_n, 128, True, 8 if gpu else 2))  # Llama-style
    return shapes


def decode_shapes(device: str, caches: list[int] | None, queries: list[int], ds) -> list[Shape]:
    """Decode calls: the issue's GPU goal (batch 1, GQA 8:1, 4k-32k) on CUDA; on CPU batch 1-4,
    8-32 heads on 1-8 kv heads, caches 512-8k."""
    gpu = device == "cuda"
    caches = caches or ([4096, 8192, 16384, 32768] if gpu else [512, 2048, 8192])
    heads = [(1, 32, 4), (4, 32, 4)] if gpu else [(1, 32, 8), (4, 8, 8), (1, 16, 1)]
    return [
        Shape(batch, h, n, d, True, kv, m)
        for d in ds or ([128] if gpu else [64, 128])
        for batch, h, kv in heads
        for n in queries
        for m in caches
    ]


def find_kernel(name: str | None, device: str) -> Kernel:
    """The registered exact kernel called ``name`` on ``device`` (if no name, the best one that
    is not a decode kernel: those serve 1 to 16 queries only, and ``--decode`` names them)."""
    found = kernels_for("exact", device)
    if name is None:
        return next(k for k in found if not k.name.endswith("_decode"))
    for kernel in found:
        if kernel.name == name:
            return kernel
    names = ", ".join(k.name for k in found)
    raise SystemExit(f"no exact kernel named {name!r} for {device}; registered: {names}")


def eager(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    """Matmul-softmax-matmul as a model would write it (K/V repeated for GQA)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        n, m = scores.shape[-2:]
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).triu(m - n + 1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def timer(device: str, warmup: int, rep: int):
    """``fn -> median ms`` for the device."""
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    from torch.utils.benchmark import Timer

    def cpu_median(fn) -> float:
        for _ in range(2):
            fn()
        measured = Timer(
            "fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
        ).blocked_autorange(min_run_time=rep / 1e3)
        return measured.median * 1e3

    return cpu_median


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.float() - expected.float()).norm()
    return (diff / expected.float().norm().clamp_min(1e-12)).item()


def bench_shape(
    shape: Shape,
    kernel: Kernel,
    dtype,
    device: str,
    measure,
    decode: bool = False,
    rounds: int = 1,
    always: bool = False,
    projection: bool = False,
) -> list[Row]:
    """Rows for the kernel, SDPA and eager on one shape; failures become notes, not crashes.
    ``decode``: the kernel is timed even where the dispatch declines it, and the op is added.
    Each impl's time is the best of ``rounds`` medians, taken in turns. ``always``: time the
    kernel even where ``supports`` declines; ``projection``: precede each call by a model's
    output projection (see the module doc)."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(shape.batch, shape.heads, shape.n, shape.head_dim, generator=gen, device=device)
    kv_shape = (shape.batch, shape.kv_heads, shape.keys, shape.head_dim)
    k, v = (torch.randn(kv_shape, generator=gen, device=device) for _ in range(2))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = shape.head_dim**-0.5
    gqa = shape.kv_heads != shape.heads
    group = shape.heads // shape.kv_heads
    causal_mask = None  # SDPA's is_causal is top-left: bottom-right with n < m needs a mask
    if shape.causal and 1 < shape.n != shape.keys:
        causal_mask = structural_keep(shape.n, shape.keys, True, 0, q.device)

    def sdpa():
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=causal_mask,
            is_causal=shape.causal and shape.n == shape.keys,
            scale=scale,
            enable_gqa=gqa,
        )

    impls = {
        kernel.name: lambda: kernel.forward(q, k, v, None, scale=scale, causal=shape.causal)[0],
        "sdpa": sdpa,
        "eager": lambda: eager(q, k, v, shape.causal, scale),
    }
    if decode:  # eager repeats K/V per query head: far behind, and slow to time at 8k
        del impls["eager"]
        op = torch.ops.attnopt.attention
        impls["attnopt"] = lambda: op(q, k, v, None, scale, shape.causal, 0, float("-inf"), group)
    reason = kernel.supports(q, k, v, None, shape.causal, 0) if kernel.supports else None
    expected = sdpa()
    context = ""
    if projection:
        width = shape.heads * shape.head_dim
        x = torch.randn(shape.batch * shape.n, width, device=device, dtype=dtype)
        weight = torch.randn(width, width, device=device, dtype=dtype) / width**0.5

        def with_projection(fn):
            return lambda: (x @ weight, fn())[1]

        impls = {name: with_projection(fn) for name, fn in impls.items()}
        context = f"proj {measure(lambda: x @ weight):.2f} ms"
    timed: dict[str, tuple[float | None, float | None, str]] = {}
    for name, fn in impls.items():
        if name == kernel.name and reason is not None and not (decode or always):
            timed[name] = (None, None, reason)
            continue
        declined = f"dispatch declines: {reason}" if name == kernel.name and reason else ""
        if name == "attnopt":
            declined = select_kernel("exact", q, k, v, None, shape.causal, 0).name
        note = "; ".join(filter(None, (declined, context)))
        try:
            timed[name] = (None, rel_rms(fn(), expected), note)
        except torch.OutOfMemoryError:
            timed[name] = (None, None, "out of memory")
        except KernelError as error:
            timed[name] = (None, None, str(error))
        if device == "cuda":
            torch.cuda.empty_cache()
    # alternating rounds, best of each: load from other processes hits every impl alike
    runnable = [name for name, (_, err, _) in timed.items() if err is not None]
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name in runnable:
            best[name] = min(best.get(name, float("inf")), measure(impls[name]))
    timed = {name: (best.get(name), err, note) for name, (_, err, note) in timed.items()}
    sdpa_ms = timed["sdpa"][0]
    rows = []
    for name, (ms, err, note) in timed.items():
        tflops = shape.flops / (ms * 1e-3) / 1e12 if ms else None
        ratio = sdpa_ms / ms if ms and sdpa_ms else None
        fields = {f: getattr(shape, f) for f in ("batch", "heads", "n", "head_dim")}
        fields |= dict(causal=shape.causal, kv_heads=shape.kv_heads, m=shape.keys)
        rows.append(
            Row(
                **fields,
                dtype=str(dtype)[6:],
                impl=name,
                ms=ms,
                tflops=tflops,
                vs_sdpa=ratio,
                rel_err=err,
                note=note,
            )
        )
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def show(rows: list[Row], title: str) -> None:
    table = Table(title=title)
    columns = ("b", "h", "kv", "n", "m", "d", "scores", "causal", "impl", "ms", "TFLOP/s", "×SDPA")
    for column in (*columns, "err", "note"):
        table.add_column(
            column, justify="left" if column in ("impl", "causal", "note") else "right"
        )
    for r in rows:
        scores = r.batch * r.heads * r.n * r.m  # what the CPU dispatch thresholds count
        table.add_row(
            *map(
                str,
                (r.batch, r.heads, r.kv_heads, r.n, r.m, r.head_dim, scores, r.causal, r.impl),
            ),
            _fmt(r.ms, ".3f"),
            _fmt(r.tflops, ".2f"),
            _fmt(r.vs_sdpa, ".2f"),
            _fmt(r.rel_err, ".1e"),
            r.note,
        )
    Console(width=max(Console().width, 120)).print(table)  # no truncated columns in logs


def plot(rows: list[Row], path: Path) -> None:
    """TFLOP/s against n, one panel per (head dim, causal), one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.head_dim, r.causal) for r in rows if r.heads == r.kv_heads})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (d, causal) in zip(axes[0], panels, strict=True):
        for impl in dict.fromkeys(r.impl for r in rows):
            points = [
                (r.n, r.tflops)
                for r in rows
                if (r.head_dim, r.causal, r.impl) == (d, causal, impl)
                and r.heads == r.kv_heads
                and r.tflops is not None
            ]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=impl)
        ax.set(xscale="log", xlabel="n", ylabel="TFLOP/s", title=f"d={d}, causal={causal}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def _cpu_isa() -> str:
    bits = detect_cpu().vector_bits
    return next((level for level, (_, width) in CPU_LEVELS.items() if width == bits), f"{bits}-bit")


def bench_variant(args, device: str, dtype, measure) -> None:
    """Time an approximate variant's site module against causal SDPA, error beside each speed."""
    from attnopt.passes.linear import LinearSite

    table = Table(title=f"{args.variant} vs SDPA (causal) on {device}, {str(dtype)[6:]}")
    for column in ("n", "heads", "d", "feature map", "ms", "SDPA ms", "× SDPA", "cos", "rel_l1"):
        table.add_column(column)
    heads, d = args.heads, (args.d or [64])[0]
    attrs = {"scale": d**-0.5, "causal": True, "window": 0, "fill": float("-inf"), "kv_group": 1}
    knobs = {"feature_map": args.feature_map, "feature_dim": 0, "chunk": 64, "window": 64}
    site = LinearSite(args.variant, attrs, heads, d, knobs).to(device)
    for n in args.n or [4096, 16384]:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, heads, n, d, generator=gen).to(device, dtype) for _ in range(3))
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out = site(q, k, v, None)
            ms = measure(lambda q=q, k=k, v=v: site(q, k, v, None))
            sdpa_ms = measure(
                lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
            )
        a, b = out.double().flatten(), ref.double().flatten()
        cos = F.cosine_similarity(a, b, dim=0).item()
        rel_l1 = ((a - b).abs().sum() / b.abs().sum()).item()
        cells = (
            n,
            heads,
            d,
            args.feature_map,
            f"{ms:.2f}",
            f"{sdpa_ms:.2f}",
            f"{sdpa_ms / ms:.2f}",
        )
        table.add_row(*map(str, cells), f"{cos:.4f}", f"{rel_l1:.3e}")
        Console().print(table)  # after each n, so a long run shows progress


def bench_quant(args, device: str, dtype, measure) -> None:
    """``quant`` (the kernel its dispatch picks) against SDPA and the best exact kernel on the
    same random q, k, v; cos and rel_l1 against SDPA's output beside each speed."""
    from attnopt.codegen.quant_ops import quant_forward
    from attnopt.codegen.registry import kernels_for as registered

    exact = find_kernel(args.backend, device)
    quant = next(iter(registered("quant", device)))
    causal = True if args.causal is None else args.causal
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({_cpu_name()})"
    title = f"quant {args.bits}-bit, P·V {args.pv} ({quant.name}) on {where}, {str(dtype)[6:]}"
    table = Table(title=f"{title}, causal={causal}, heads {args.heads}")
    columns = ("n", "d", "quant ms", "SDPA ms", f"{exact.name} ms", "× SDPA", "× exact")
    for column in (*columns, "cos", "rel_l1"):
        table.add_column(column)
    default_n = [1024, 4096, 16384] if device == "cpu" else [1024, 4096, 16384, 65536]
    for n in args.n or default_n:
        for d in args.d or [64, 128]:
            gen = torch.Generator().manual_seed(0)
            q, k, v = (
                torch.randn(1, args.heads, n, d, generator=gen).to(device, dtype) for _ in range(3)
            )
            flags = {"scale": d**-0.5, "causal": causal, "window": 0, "fill": float("-inf")}

            def run_quant(q=q, k=k, v=v, flags=flags):
                return quant_forward(q, k, v, None, bits=args.bits, pv=args.pv, **flags)

            def run_sdpa(q=q, k=k, v=v):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            def run_exact(q=q, k=k, v=v, flags=flags):
                return exact.forward(q, k, v, None, **flags)

            with torch.no_grad():
                ref, out = run_sdpa(), run_quant()
                times = {"quant": [], "sdpa": [], "exact": []}
                for _ in range(args.rounds):  # in turns: load on a shared machine hits all alike
                    for name, fn in (
                        ("quant", run_quant),
                        ("sdpa", run_sdpa),
                        ("exact", run_exact),
                    ):
                        times[name].append(measure(fn))
            ms = {name: min(values) for name, values in times.items()}
            a, b = out.double().flatten(), ref.double().flatten()
            cos = F.cosine_similarity(a, b, dim=0).item()
            rel_l1 = ((a - b).abs().sum() / b.abs().sum()).item()
            cells = [n, d, *(f"{ms[x]:.2f}" for x in ("quant", "sdpa", "exact"))]
            cells += [f"{ms['sdpa'] / ms['quant']:.2f}", f"{ms['exact'] / ms['quant']:.2f}"]
            table.add_row(*map(str, cells), f"{cos:.5f}", f"{rel_l1:.2e}")
            Console().print(table)  # after each shape, so a long run shows progress


def _cpu_name() -> str:
    dot = detect_cpu().int_dot
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{torch.get_num_threads()} threads, torch {isa}, int8 dot {dot[0] if dot else 'none'}"


def segmented_qkv(heads: int, n: int, d: int, segments: int, gen: torch.Generator):
    """q, k, v whose causal scores have exactly ``segments`` conv-basis segments per head."""
    omega = torch.rand(heads, 1, d // 2, generator=gen) * 0.05
    angles = torch.arange(n).float()[None, :, None] * omega
    rotary = torch.cat([angles.cos(), angles.sin()], -1)  # (heads, n, d): |scale·q·k| ≤ 4·a
    starts = torch.linspace(0, n, segments + 1)[:-1].long()
    amplitude = 1 + torch.rand(heads, segments, generator=gen)
    which = torch.bucketize(torch.arange(n), starts, right=True) - 1
    k = rotary * amplitude[:, which, None]
    return rotary[None], k[None], torch.randn(1, heads, n, d, generator=gen)


def bench_conv_basis(args, device: str, dtype, measure) -> None:
    """conv_basis site module vs causal SDPA on scores with k segments, error beside speed."""
    from attnopt.passes.conv_basis import ConvBasisSite

    table = Table(title=f"conv_basis vs SDPA (causal) on {device}, {str(dtype)[6:]}")
    for column in ("n", "heads", "d", "k", "ms", "SDPA ms", "× SDPA", "cos", "rel_l1"):
        table.add_column(column)
    heads, d = args.heads, (args.d or [64])[0]
    attrs = {"scale": d**-0.5, "causal": True, "window": 0, "fill": float("-inf"), "kv_group": 1}
    for n in args.n or [4096, 16384, 65536]:
        sdpa_ms = None
        for segments in args.k:
            gen = torch.Generator().manual_seed(segments)
            q, k, v = (t.to(device, dtype) for t in segmented_qkv(heads, n, d, segments, gen))
            site = ConvBasisSite(attrs, heads, tau=1e-3, k_max=max(16, segments)).to(device)
            with torch.no_grad():
                ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                out = site(q, k, v, None)
                recovered = site._conv(q, k, v, None, site.conv_heads, site.bias_heads)[1]
                ms = measure(lambda q=q, k=k, v=v, site=site: site(q, k, v, None))
                if sdpa_ms is None:
                    sdpa_ms = measure(
                        lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                            q, k, v, is_causal=True
                        )
                    )
            a, b = out.double().flatten(), ref.double().flatten()
            cos = F.cosine_similarity(a, b, dim=0).item()
            rel_l1 = ((a - b).abs().sum() / b.abs().sum()).item()
            ks = sorted(set(recovered.flatten().tolist()))
            cells = (n, heads, d, ",".join(map(str, ks)), f"{ms:.2f}", f"{sdpa_ms:.2f}")
            table.add_row(*map(str, cells), f"{sdpa_ms / ms:.2f}", f"{cos:.5f}", f"{rel_l1:.2e}")
            Console().print(table)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument(
        "--variant",
        choices=["exact", "linear", "gla", "hybrid", "quant", "conv_basis"],
        default="exact",
    )
    parser.add_argument("--bits", type=int, choices=[8, 4], default=8, help="quant: Q/K bits")
    parser.add_argument(
        "--pv", choices=["fp16", "bf16", "fp8", "int8"], default="fp16", help="quant P·V"
    )
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 16], help="conv_basis segments")
    parser.add_argument("--feature-map", choices=["elu", "relu", "hedgehog"], default="elu")
    parser.add_argument("--heads", type=int, default=4, help="heads (approximate variants)")
    parser.add_argument("--backend", default=None, help="registered kernel name (default: best)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None)
    parser.add_argument("--n", type=int, nargs="+", default=None, help="sequence lengths")
    parser.add_argument("--decode", action="store_true", help="decode calls against a cache")
    parser.add_argument("--queries", type=int, nargs="+", default=[1], help="decode queries")
    parser.add_argument("--cache", type=int, nargs="+", default=None, help="decode cache lengths")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch and TVM)")
    parser.add_argument("--rounds", type=int, default=1, help="timings per impl, in turns; best")
    parser.add_argument(
        "--cpu-target",
        choices=["native", *CPU_LEVELS],
        default=None,
        help=f"ISA level the TVM CPU kernels are built for (sets {CPU_TARGET_ENV})",
    )
    parser.add_argument(
        "--always", action="store_true", help="time the kernel where its supports() declines"
    )
    parser.add_argument(
        "--with-projection",
        action="store_true",
        help="time each call after a model's output projection (thread-pool hand-off included)",
    )
    parser.add_argument("--d", type=int, nargs="+", default=None, help="head dims")
    causal = parser.add_mutually_exclusive_group()
    causal.add_argument("--causal", dest="causal", action="store_true", default=None)
    causal.add_argument("--no-causal", dest="causal", action="store_false")
    parser.add_argument("--warmup", type=int, default=25, help="warm-up ms (cuda)")
    parser.add_argument("--rep", type=int, default=100, help="timed ms per measurement")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of TFLOP/s against n")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        sys.exit("--plot needs matplotlib, which is not installed: pip install matplotlib")
    if args.cpu_target:
        os.environ[CPU_TARGET_ENV] = args.cpu_target
    if args.threads:  # before TVM's pool starts: it follows torch's setting
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    measure = timer(device, args.warmup, args.rep)
    if args.variant in ("quant", "conv_basis"):
        bench = bench_quant if args.variant == "quant" else bench_conv_basis
        bench(args, device, dtype, measure)
        return
    if args.variant != "exact":
        bench_variant(args, device, dtype, measure)
        return
    decode_name = {"cpu": "tvm_decode", "cuda": "triton_decode"}[device]
    kernel = find_kernel(args.backend or (decode_name if args.decode else None), device)
    if args.decode:
        shapes = decode_shapes(device, args.cache, args.queries, args.d)
    else:
        shapes = default_shapes(device, args.n, args.d, args.causal)
    rows: list[Row] = []
    for shape in shapes:
        rows += bench_shape(
            shape,
            kernel,
            dtype,
            device,
            measure,
            args.decode,
            args.rounds,
            args.always,
            args.with_projection,
        )
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        isa = torch.backends.cpu.get_cpu_capability()
        name = f"CPU ({torch.get_num_threads()} threads, torch {isa}, TVM {_cpu_isa()})"
    what = "decode attention" if args.decode else "exact attention"
    show(rows, f"{what} on {name}, {str(dtype)[6:]}, kernel {kernel.name!r}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
