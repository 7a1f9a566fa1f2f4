"""ONNX conversion on the test models: sites found and rewritten, onnxruntime CPU latency before
and after (same process, same inputs), against onnxruntime's own transformers optimizer.

    python benchmarks/bench_onnx.py [--size tiny|base] [--seq 512] [--exporter dynamo|torchscript]
    python benchmarks/bench_onnx.py --optimum bench-out/optimum [--contexts 512 2048]

``tiny`` are the test suite's architectures (``tests/tiny_hf.py``) at 2 layers, hidden 64,
4 heads, ``base`` the same at hidden 768, 12 heads (4 kv heads for Llama). Every model is
exported with the chosen exporter at opset 18, batch 1, sequence ``--seq`` (ViT: the image
size giving about that many patches), converted by ``attnopt.frontends.onnx.convert.convert``
and optimized by ``onnxruntime.transformers.optimizer.optimize_model``; all three graphs are
timed with the same inputs in the same run, taking turns (median over ``--seconds``).

``--optimum DIR`` times decoders exported with a KV cache by Hugging Face optimum (made by
``.venv-export/bin/python tests/fixtures/export_optimum.py DIR --bench``, see
``.ci/export_optimum``): batch 1, prefill latency (the whole context, no past) and decode
tokens/s (one new token after the context), for the export, attnopt's conversion and, where its
fusions know the model type, onnxruntime's transformers optimizer (what
``optimum-cli onnxruntime optimize -O2`` runs).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from rich.console import Console
from rich.table import Table

from attnopt.frontends.onnx import inputs as onnx_inputs
from attnopt.frontends.onnx import verify as onnx_verify
from attnopt.frontends.onnx.convert import convert

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/tiny_hf.py builds the models
from tests import tiny_hf  # noqa: E402

FUSED = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention"}
#: optimum config model types onnxruntime's optimizer fuses: its type, heads and hidden keys
ORT_OPTIMUM_TYPES = {"gpt2": ("gpt2", "n_head", "n_embd")}
ORT_TYPES = {"gpt2": "gpt2", "bert": "bert", "llama_gqa": "gpt2", "t5": "t5", "vit": "vit"}


#: benchmark model -> its architecture in tests/tiny_hf.py and settings beyond the sizes
MODELS = {
    "gpt2": ("gpt2", dict(use_cache=False, bos_token_id=0, eos_token_id=0)),
    "bert": ("bert", {}),
    "llama_gqa": ("llama", dict(use_cache=False)),
    "t5": ("t5", dict(use_cache=False, decoder_start_token_id=0)),
    "vit": ("vit", dict(image_size=176, patch_size=8)),
}


def build(name: str, size: str) -> torch.nn.Module:
    """``name`` at ``size``: 2 layers, vocabulary 1000, positions up to 1024, random weights."""
    hidden, heads, kv, ffn = (64, 4, 2, 128) if size == "tiny" else (768, 12, 4, 3072)
    arch, extra = MODELS[name]
    if arch == "llama":
        extra = dict(extra, num_key_value_heads=kv)
    sizes = dict(hidden=hidden, heads=heads, ffn=ffn, vocab=1000, positions=1024)
    return tiny_hf.model(arch, **sizes, **extra)


class Positional(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args):
        out = self.model(**dict(zip(self.names, args, strict=True)))
        return tuple(v for v in out.values() if isinstance(v, torch.Tensor))


def export(name: str, model, seq: int, path: Path, dynamo: bool) -> None:
    ids = torch.randint(0, 1000, (1, seq))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    if name == "t5":
        inputs = {"input_ids": ids, "decoder_input_ids": ids}
        dynamic = {"input_ids": {0: "batch", 1: "seq"}, "decoder_input_ids": {0: "batch", 1: "d"}}
    if name == "vit":
        inputs = {"pixel_values": torch.randn(1, 3, 176, 176)}
        dynamic = {"pixel_values": {0: "batch"}}
    names = list(inputs)
    wrapped = Positional(model.eval(), names)
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        if dynamo:
            torch.onnx.export(
                wrapped,
                tuple(inputs.values()),
                str(path),
                dynamo=True,
                opset_version=18,
                input_names=names,
                dynamic_shapes=(tuple(dynamic[n] for n in names),),
            )
        else:
            torch.onnx.export(
                wrapped, tuple(inputs.values()), str(path), dynamo=False, opset_version=18,
                input_names=names, dynamic_axes=dynamic,
            )  # fmt: skip


def ort_optimized(path: Path, out: Path, model_type: str, heads: int, hidden: int) -> int:
    """onnxruntime's transformers optimizer on the same export; its fused attention op count."""
    from onnxruntime.transformers.optimizer import optimize_model

    with contextlib.redirect_stdout(io.StringIO()):
        optimized = optimize_model(str(path), model_type, num_heads=heads, hidden_size=hidden)
    optimized.save_model_to_file(str(out))
    return sum(n.op_type in FUSED for n in onnx.load(str(out)).graph.node)


def session_fused(path: Path) -> int:
    """Attention ops in the graph onnxruntime runs for ``path`` after its own session-time
    optimizations (it fuses some spellings by itself): what "before" really runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(path.with_suffix(".session.onnx"))
    ort.InferenceSession(str(path), options, providers=onnx_verify.PROVIDERS)
    graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    return sum(n.op_type in FUSED for n in graph.node)


def optimum_main(root: Path, contexts: list[int], seconds: float) -> None:
    table = Table(
        title=f"optimum exports with KV cache, batch 1, onnxruntime CPU: prefill latency and "
        f"decode tokens/s at context {', '.join(map(str, contexts))} (ratio vs the export)"
    )
    table.add_column("model")
    table.add_column("graph")
    table.add_column("fused ops")
    for ctx in contexts:
        table.add_column(f"prefill {ctx} ms")
        table.add_column(f"decode @{ctx} tok/s")
    work = Path(tempfile.mkdtemp(prefix="bench_onnx_optimum_"))
    paths = sorted(root.glob("*/model.onnx"))
    if not paths:
        raise SystemExit(f"no optimum exports under {root}: see .ci/export_optimum")
    for path in paths:
        name = path.parent.name
        config = json.loads((path.parent / "config.json").read_text())
        graphs: dict[str, Path | None] = {"export": path}
        notes = {"export": str(session_fused(path))}
        converted = work / f"{name}.attnopt.onnx"
        report = convert(path, converted)
        graphs["attnopt"], notes["attnopt"] = converted, str(len(report.rewritten))
        ort_type = ORT_OPTIMUM_TYPES.get(config["model_type"])
        ort_path = work / f"{name}.ortopt.onnx"
        if ort_type is None:
            graphs["ort optimizer"], notes["ort optimizer"] = None, "model type not supported"
        else:
            kind, heads, hidden = ort_type
            fused = ort_optimized(path, ort_path, kind, config[heads], config[hidden])
            graphs["ort optimizer"], notes["ort optimizer"] = ort_path, str(fused)
        sessions = {k: onnx_verify.session(g, k) for k, g in graphs.items() if g is not None}
        model = onnx.load(str(path), load_external_data=False)
        cells: dict[str, list[str]] = {k: [] for k in graphs}
        for ctx in contexts:
            for past, seq in ((0, ctx), (ctx, 1)):
                dims = {"batch_size": 1, "sequence_length": seq, "past_sequence_length": past}
                feeds = onnx_inputs.random_feeds(model, dims)
                times = onnx_verify.latency_ms(sessions, feeds, seconds)
                base = times["export"]
                for key in graphs:
                    if key not in times:
                        cells[key].append("-")
                    elif past == 0:
                        cells[key].append(f"{times[key]:.1f} (×{base / times[key]:.2f})")
                    else:
                        cells[key].append(f"{1e3 / times[key]:.0f} (×{base / times[key]:.2f})")
        for key in graphs:
            table.add_row(name, key, notes[key], *cells[key])
        Console().print(f"{name}: done")
    Console(width=200).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimum", type=Path, help="time optimum exports under this folder")
    parser.add_argument("--contexts", type=int, nargs="*", default=[512, 2048])
    parser.add_argument("--size", choices=["tiny", "base"], default="tiny")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo")
    parser.add_argument("--seconds", type=float, default=10.0, help="timing budget per model")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    if args.optimum is not None:
        optimum_main(args.optimum, args.contexts, args.seconds)
        return
    torch.manual_seed(0)
    table = Table(
        title=f"attnopt convert vs onnxruntime optimizer: {args.size} models, "
        f"{args.exporter} export, batch 1, seq {args.seq}, onnxruntime CPU"
    )
    for column in (
        "model", "sites", "rewritten", "kernel", "max err", "ort fuses itself", "before ms",
        "attnopt ms",
        "ratio", "ort-opt fused", "ort-opt ms", "ratio",
    ):  # fmt: skip
        table.add_column(column)
    work = Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    for name in args.models:
        model = build(name, args.size)
        config, path = model.config, work / f"{name}.onnx"
        export(name, model, args.seq, path, args.exporter == "dynamo")
        dims = {"batch": 1, "seq": args.seq, "d": args.seq}
        have = onnx_inputs.input_dims(onnx.load(str(path), load_external_data=False))
        report = convert(path, work / f"{name}.attnopt.onnx", dims={k: dims[k] for k in have})
        heads = getattr(config, "num_attention_heads", None) or config.num_heads
        hidden = getattr(config, "hidden_size", None) or config.d_model
        ort_path = work / f"{name}.ortopt.onnx"
        try:
            fused = str(ort_optimized(path, ort_path, ORT_TYPES[name], heads, hidden))
        except Exception as err:  # its fusions are model-type specific
            fused, ort_path = f"failed: {type(err).__name__}", None
        model = onnx.load(str(path), load_external_data=False)
        feeds = onnx_inputs.random_feeds(model, {k: dims[k] for k in have})
        graphs = {"before": path, "attnopt": work / f"{name}.attnopt.onnx", "ort": ort_path}
        sessions = {k: onnx_verify.session(g, k) for k, g in graphs.items() if g is not None}
        times = onnx_verify.latency_ms(sessions, feeds, args.seconds)
        kernels = ", ".join(sorted({s.kernel.split(".")[-1] for s in report.rewritten}))
        errors = [s.max_error for s in report.sites if s.max_error is not None]
        before = times["before"]
        table.add_row(
            name,
            str(len(report.sites)),
            str(len(report.rewritten)),
            kernels or "-",
            f"{max([*errors, report.output_error or 0.0]):.1e}",
            str(session_fused(path)),
            f"{before:.2f}",
            f"{times['attnopt']:.2f}",
            f"×{before / times['attnopt']:.2f}",
            fused,
            f"{times['ort']:.2f}" if "ort" in times else "-",
            f"×{before / times['ort']:.2f}" if "ort" in times else "-",
        )
        Console().print(f"{name}: done")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
