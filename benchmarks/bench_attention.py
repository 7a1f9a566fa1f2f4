"""Exact-attention kernels against SDPA and eager attention: time, TFLOP/s, ratio to SDPA.

    python benchmarks/bench_attention.py                       # cuda: triton, bf16 shape grid
    python benchmarks/bench_attention.py --device cpu --backend tvm
    python benchmarks/bench_attention.py --device cpu --backend reference --n 128 --d 64

For each shape (batch, heads, n, head_dim, causal, kv_heads) one process times the kernel that
``--backend`` names in the registry for the device, ``F.scaled_dot_product_attention`` (its default
backend) and eager matmul-softmax-matmul. Median of timed runs after warm-up: ``do_bench`` on CUDA,
``torch.utils.benchmark`` on CPU. ``--json`` writes the rows, ``--plot`` draws TFLOP/s against n.

    python benchmarks/bench_attention.py --variant linear --device cpu --n 4096 16384

Approximate variants (``linear``, ``gla``, ``hybrid``) time the rewritten site's module (the
kernel it dispatches to for the device) against causal SDPA on the same random q, k, v, with
the measured error against SDPA's output beside each speed (cos and rel_l1).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from attnopt.codegen import ops  # noqa: F401  (registers the reference and compiled kernels)
from attnopt.codegen.registry import Kernel, kernels_for

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

    @property
    def flops(self) -> int:
        """Forward FLOPs: two matmuls of 2·n·m·d each per head; causal computes half."""
        full = 4 * self.batch * self.heads * self.n * self.n * self.head_dim
        return full // 2 if self.causal else full


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


def find_kernel(name: str | None, device: str) -> Kernel:
    """The registered exact kernel called ``name`` on ``device`` (the best one if no name)."""
    found = kernels_for("exact", device)
    if name is None:
        return found[0]
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


def bench_shape(shape: Shape, kernel: Kernel, dtype, device: str, measure) -> list[Row]:
    """Rows for the kernel, SDPA and eager on one shape; failures become notes, not crashes."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(shape.batch, shape.heads, shape.n, shape.head_dim, generator=gen, device=device)
    kv_shape = (shape.batch, shape.kv_heads, shape.n, shape.head_dim)
    k, v = (torch.randn(kv_shape, generator=gen, device=device) for _ in range(2))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = shape.head_dim**-0.5
    gqa = shape.kv_heads != shape.heads

    def sdpa():
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=shape.causal, scale=scale, enable_gqa=gqa
        )

    impls = {
        kernel.name: lambda: kernel.forward(q, k, v, None, scale=scale, causal=shape.causal)[0],
        "sdpa": sdpa,
        "eager": lambda: eager(q, k, v, shape.causal, scale),
    }
    reason = kernel.supports(q, k, v, None, shape.causal, 0) if kernel.supports else None
    expected = sdpa()
    timed: dict[str, tuple[float | None, float | None, str]] = {}
    for name, fn in impls.items():
        if name == kernel.name and reason is not None:
            timed[name] = (None, None, reason)
            continue
        try:
            err = rel_rms(fn(), expected)
            timed[name] = (measure(fn), err, "")
        except torch.OutOfMemoryError:
            timed[name] = (None, None, "out of memory")
        if device == "cuda":
            torch.cuda.empty_cache()
    sdpa_ms = timed["sdpa"][0]
    rows = []
    for name, (ms, err, note) in timed.items():
        tflops = shape.flops / (ms * 1e-3) / 1e12 if ms else None
        ratio = sdpa_ms / ms if ms and sdpa_ms else None
        fields = asdict(shape)
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
    for column in ("b", "h", "kv", "n", "d", "causal", "impl", "ms", "TFLOP/s", "×SDPA", "err"):
        table.add_column(column, justify="left" if column in ("impl", "causal") else "right")
    for r in rows:
        table.add_row(
            *map(str, (r.batch, r.heads, r.kv_heads, r.n, r.head_dim, r.causal, r.impl)),
            _fmt(r.ms, ".3f") if r.ms is not None else r.note,
            _fmt(r.tflops, ".2f"),
            _fmt(r.vs_sdpa, ".2f"),
            _fmt(r.rel_err, ".1e"),
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--variant", choices=["exact", "linear", "gla", "hybrid"], default="exact")
    parser.add_argument("--feature-map", choices=["elu", "relu", "hedgehog"], default="elu")
    parser.add_argument("--heads", type=int, default=4, help="heads (approximate variants)")
    parser.add_argument("--backend", default=None, help="registered kernel name (default: best)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None)
    parser.add_argument("--n", type=int, nargs="+", default=None, help="sequence lengths")
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
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    measure = timer(device, args.warmup, args.rep)
    if args.variant != "exact":
        bench_variant(args, device, dtype, measure)
        return
    kernel = find_kernel(args.backend, device)
    rows: list[Row] = []
    for shape in default_shapes(device, args.n, args.d, args.causal):
        rows += bench_shape(shape, kernel, dtype, device, measure)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    show(rows, f"exact attention on {name}, {str(dtype)[6:]}, kernel {kernel.name!r}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
