"""conv_basis in onnxruntime: one causal ALiBi site converted twice by ``attnopt convert``, with
``--variant exact`` (onnxruntime's fused attention) and ``--variant conv_basis`` (DFT
convolutions), timed on the CPU provider at several lengths in the same run, plus the accuracy
of onnxruntime's ``DFT`` against numpy's FFT at the lengths the lowering uses.

    python benchmarks/bench_onnx_conv_basis.py --n 1024 4096 16384 --threads 1 --heads 2

The site's heads are bias-only (q·k scaled to ~0), so every head takes the DFT branch. Both
graphs also build the model's ``(H, n, n)`` ALiBi bias (the same work in both, O(n²)): the
``model`` columns time the whole graph (median wall clock), the ``site`` columns only the nodes
the conversion inserted (onnxruntime's profiler, kernel time of the last run; an ``If`` counts
its branch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

from attnopt.frontends.onnx.convert import convert


class AlibiSite(nn.Module):
    """Causal attention of inputs q, k, v with an ALiBi bias computed from the length."""

    def __init__(self, heads: int, content: float) -> None:
        super().__init__()
        self.content = content
        slopes = [2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)]
        self.register_buffer("slopes", torch.tensor(slopes).view(heads, 1, 1))

    def forward(self, q, k, v):
        n = q.shape[2]
        scores = (q * self.content) @ (k * self.content).transpose(-2, -1) / math.sqrt(q.shape[-1])
        pos = torch.arange(n)
        scores = scores - self.slopes * (pos[:, None] - pos[None, :]).float()
        scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        return F.softmax(scores, dim=-1) @ v


def _session(path: Path, threads: int, profile: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if profile:
        options.enable_profiling, options.profile_file_prefix = True, profile
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _time(sess: ort.InferenceSession, feeds: dict, repeats: int) -> tuple[float, np.ndarray]:
    out = sess.run(None, feeds)[0]  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, out


def _site_ms(path: Path, feeds: dict, threads: int, prefix: str) -> float:
    """Kernel time (ms) of the top-level nodes the conversion inserted, in one profiled run."""
    model = onnx.load(str(path))
    mine = {n.name for n in model.graph.node if n.name.startswith("attnopt/")}
    sess = _session(path, threads, prefix)
    sess.run(None, feeds)
    sess.run(None, feeds)  # the first run pays allocation; only the last one is counted
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    last = runs[-1]["ts"]
    total = 0.0
    for event in events:
        name = event.get("name", "").removesuffix("_kernel_time")
        if event.get("cat") == "Node" and name in mine and event["ts"] >= last:
            total += event["dur"]
    return total / 1e3


def dft_accuracy(length: int, dtype: int) -> tuple[float, float]:
    """Max |ORT DFT − numpy FFT| / max |numpy FFT| of random complex signals of ``length``,
    and the ms onnxruntime takes for them (one thread)."""
    np_dtype = np.float64 if dtype == TensorProto.DOUBLE else np.float32
    value = lambda name: helper.make_tensor_value_info(name, dtype, None)  # noqa: E731
    size = helper.make_node(
        "Constant", [], ["L"], value=onnx.numpy_helper.from_array(np.array(length, np.int64))
    )
    axis = helper.make_node(
        "Constant", [], ["a"], value=onnx.numpy_helper.from_array(np.array(1, np.int64))
    )
    dft = helper.make_node("DFT", ["x", "L", "a"], ["y"])
    graph = helper.make_graph([size, axis, dft], "g", [value("x")], [value("y")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(length).standard_normal((2, length, 2)).astype(np_dtype)
    start = time.perf_counter()
    (y,) = sess.run(None, {"x": x})
    ms = (time.perf_counter() - start) * 1e3
    expected = np.fft.fft(x[..., 0].astype(np.float64) + 1j * x[..., 1], axis=1)
    return float(np.abs(y[..., 0] + 1j * y[..., 1] - expected).max() / np.abs(expected).max()), ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, {os.cpu_count()} cpus, uptime:", os.getloadavg())
    shape = (1, args.heads, 256, args.dim)
    inputs = {name: torch.randn(shape) for name in ("q", "k", "v")}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "site.onnx"
        dynamic = {name: {2: "seq"} for name in inputs}
        torch.onnx.export(
            AlibiSite(args.heads, 1e-3).eval(),
            tuple(inputs.values()),
            str(src),
            dynamo=False,
            opset_version=17,
            input_names=list(inputs),
            dynamic_axes=dynamic,
        )
        paths = {}
        for variant in ("exact", "conv_basis"):
            paths[variant] = Path(tmp) / f"{variant}.onnx"
            report = convert(src, paths[variant], variants=(variant,))
            (site,) = report.sites
            assert site.status == "rewritten", report.to_json()
            print(f"{variant}: {site.kernel} ({site.config})")
        sessions = {v: _session(p, args.threads) for v, p in paths.items()}
        print(f"heads={args.heads} d={args.dim} threads={args.threads} fp32, ms")
        head = f"{'n':>6} {'model exact':>12} {'model conv':>11} {'speed-up':>9}"
        print(f"{head} {'site exact':>11} {'site conv':>10} {'speed-up':>9} {'max err':>9}")
        for n in args.n:
            feeds = {name: np.random.default_rng(n).standard_normal(
                (1, args.heads, n, args.dim)).astype(np.float32) for name in inputs}  # fmt: skip
            exact_ms, exact = _time(sessions["exact"], feeds, args.repeats)
            conv_ms, conv = _time(sessions["conv_basis"], feeds, args.repeats)
            site = {v: _site_ms(p, feeds, args.threads, f"{tmp}/{v}{n}") for v, p in paths.items()}
            err = float(np.abs(conv - exact).max())
            print(
                f"{n:>6} {exact_ms:>12.1f} {conv_ms:>11.1f} {exact_ms / conv_ms:>8.2f}x "
                f"{site['exact']:>11.1f} {site['conv_basis']:>10.1f} "
                f"{site['exact'] / site['conv_basis']:>8.2f}x {err:>9.1e}"
            )
    print("onnxruntime DFT vs numpy FFT (max abs error / max |FFT|, ms for 2 signals):")
    for n in args.n:  # the lowering's power-of-two length, and 2n − 1 (odd: the slow path)
        for length in (1 << (2 * n - 1).bit_length(), 2 * n - 1):
            (f32, t32), (f64, t64) = (
                dft_accuracy(length, t) for t in (TensorProto.FLOAT, TensorProto.DOUBLE)
            )
            print(
                f"  L={length}: float32 {f32:.1e} ({t32:.1f} ms)  float64 {f64:.1e} ({t64:.1f} ms)"
            )


if __name__ == "__main__":
    main()
