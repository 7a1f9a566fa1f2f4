"""LLM generation with a KV cache: prefill time and decode tokens/s at several context lengths.

    python benchmarks/bench_generate.py                           # n = 512, 2k, 8k
    python benchmarks/bench_generate.py --ctx 512 2048 --layers 2 --hidden 256 --new 16

A Llama-style model (``--heads`` query heads, ``--kv-heads`` key/value heads), random weights
from a ``transformers`` config (no hub access), batch ``--batch``, default ``use_cache=True``.
Variants, all in one run on the same weights: the eager-attention model (``eager``),
``attn_implementation="sdpa"`` (``sdpa``), ``torch.compile`` of the eager model with Inductor
(``compile``), ``attnopt.optimize`` of the eager model (``attnopt``: its Dynamo path, attention
rewritten, the rest eager) and the same with Inductor for the rest (``attnopt+compile``).

Prefill: the median time of one forward pass over the ``n``-token prompt. Decode: ``--new``
greedy single-token steps against that prompt's KV cache (the calls ``generate()`` makes);
tokens/s = batch · new / their time. Ratios are against ``sdpa`` and ``eager`` measured in the
same run, the variants timed in alternating turns (``--repeats`` of them, medians) so that load
on the machine hits all alike; ``same tokens`` says whether ``generate()`` gave the eager model's
tokens. Untimed calls first absorb compilation.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import attnopt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/tiny_hf.py builds the models
from tests import tiny_hf  # noqa: E402

VARIANTS = ("eager", "sdpa", "compile", "attnopt", "attnopt+compile")


@dataclass
class Row:
    n: int
    variant: str
    prefill_ms: float | None = None
    decode_tok_s: float | None = None
    prefill_vs_sdpa: float | None = None  # sdpa time / this time: above 1 is faster
    decode_vs_sdpa: float | None = None  # this tokens/s / sdpa tokens/s
    prefill_vs_eager: float | None = None
    decode_vs_eager: float | None = None
    same_tokens: bool | None = None
    note: str = ""


def build(args: argparse.Namespace) -> torch.nn.Module:
    return tiny_hf.model(
        "llama",
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        ffn=args.hidden * 11 // 4,
        vocab=args.vocab,
        positions=max(args.ctx) + args.new + 1,
        num_key_value_heads=args.kv_heads,
    ).eval()


def make_variant(name: str, eager: torch.nn.Module, example: dict) -> torch.nn.Module:
    if name == "eager":
        return eager
    if name == "sdpa":
        sdpa = copy.deepcopy(eager)
        sdpa.set_attn_implementation("sdpa")
        return sdpa
    if name == "compile":
        compiled = copy.deepcopy(eager)
        compiled.compile()
        return compiled
    inner = "inductor" if name == "attnopt+compile" else "eager"
    return attnopt.optimize(eager, example, inner=inner)


def prepare(model: torch.nn.Module, ids: torch.Tensor, new: int) -> tuple:
    """(prefill, decode, generated tokens): ``prefill()`` runs the prompt, ``decode()`` runs
    ``new`` single-token steps against the prompt's KV cache (the calls ``generate()`` makes) and
    returns their ms, the cache cropped back to the prompt after. Both are warmed up here."""
    greedy = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    tokens = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **greedy)
    first = model(ids)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else None
    cache_arg = cache_arg or "past_key_values"  # older transformers
    cache, start = first[cache_arg], first.logits[:, -1:].argmax(-1)

    def decode() -> float:
        token, began = start, time.perf_counter()
        for _ in range(new):
            token = model(token, **{cache_arg: cache}).logits[:, -1:].argmax(-1)
        elapsed = (time.perf_counter() - began) * 1e3
        cache.crop(-new)  # back to the prompt: the same cache object every repeat
        return elapsed

    def prefill() -> float:
        began = time.perf_counter()
        model(ids)
        return (time.perf_counter() - began) * 1e3

    prefill(), decode(), decode()  # compile every call pattern (a cropped cache is one)
    return prefill, decode, tokens


def run(args: argparse.Namespace) -> list[Row]:
    """Variants are timed in alternating turns, so that load on the machine hits all alike."""
    torch.manual_seed(0)
    eager = build(args)
    prompts = {n: torch.randint(1, args.vocab, (args.batch, n)) for n in args.ctx}
    rows: dict[tuple[int, str], Row] = {}
    models = {}
    for variant in args.variants:
        try:
            models[variant] = make_variant(variant, eager, {"input_ids": prompts[args.ctx[0]]})
        except Exception as error:  # a failing variant is a result, not a crash
            for n in args.ctx:
                rows[n, variant] = Row(n, variant, note=f"{type(error).__name__}: {error}"[:100])
    with torch.no_grad():
        for n, ids in prompts.items():
            ready, tokens = {}, {}
            for variant, model in models.items():
                row = rows[n, variant] = Row(n, variant)
                try:
                    *ready[variant], tokens[variant] = prepare(model, ids, args.new)
                except Exception as error:
                    row.note = f"{type(error).__name__}: {error}"[:100]
            times: dict[str, tuple[list, list]] = {v: ([], []) for v in ready}
            for _ in range(args.repeats):
                for variant, (prefill, decode) in ready.items():
                    times[variant][0].append(prefill())
                    times[variant][1].append(decode())
            for variant, (prefill_ms, decode_ms) in times.items():
                row = rows[n, variant]
                row.prefill_ms = statistics.median(prefill_ms)
                row.decode_tok_s = args.new * args.batch / statistics.median(decode_ms) * 1e3
                if "eager" in tokens:
                    row.same_tokens = bool(torch.equal(tokens[variant], tokens["eager"]))
                print(f"n={n} {variant}: {row.prefill_ms:.1f} ms, {row.decode_tok_s:.1f} tok/s")
    for (n, _), row in rows.items():
        for base in ("sdpa", "eager"):
            ref = rows.get((n, base))
            if ref is None or row.prefill_ms is None or ref.prefill_ms is None:
                continue
            setattr(row, f"prefill_vs_{base}", ref.prefill_ms / row.prefill_ms)
            setattr(row, f"decode_vs_{base}", row.decode_tok_s / ref.decode_tok_s)
    return list(rows.values())


def show(rows: list[Row], title: str) -> None:
    table = Table(title=title)
    columns = ("n", "variant", "prefill ms", "decode tok/s", "prefill ×sdpa", "decode ×sdpa")
    for column in (*columns, "prefill ×eager", "decode ×eager", "same tokens"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    fields = ("prefill_ms", "decode_tok_s", "prefill_vs_sdpa", "decode_vs_sdpa")
    fields += ("prefill_vs_eager", "decode_vs_eager")
    for r in sorted(rows, key=lambda r: (r.n, VARIANTS.index(r.variant))):
        cells = ["-" if getattr(r, f) is None else f"{getattr(r, f):.2f}" for f in fields]
        if r.prefill_ms is None:
            cells[0] = r.note
        same = "-" if r.same_tokens is None else ("yes" if r.same_tokens else "NO")
        table.add_row(str(r.n), r.variant, *cells, same)
    Console(width=max(Console().width, 140)).print(table)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new", type=int, default=32, help="decoded tokens per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # the timing makes more call patterns than generate() alone (positional prefill, a cropped
    # cache, several prompt lengths): let Dynamo keep compiling them instead of falling back
    torch._dynamo.config.recompile_limit = 64
    rows = run(args)
    title = (
        f"generate: {args.layers}-layer Llama (hidden {args.hidden}, {args.heads}q/"
        f"{args.kv_heads}kv heads), batch {args.batch}, fp32 on CPU ({torch.get_num_threads()} "
        f"threads), {args.new} new tokens"
    )
    show(rows, title)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
