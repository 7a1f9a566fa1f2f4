"""``attnopt tune``: tune kernels for signatures, a model's sites, or show what is stored.

    attnopt tune b=1,h=16,n=4096,d=128,dtype=bf16,causal=1,kv_heads=4 --trials 60
    attnopt tune my_models:build --storage postgresql://user:pass@db-host/attnopt
    attnopt tune --show

Results are plain Optuna studies (one per tuning key) in the storage, so
``optuna-dashboard <storage-url>`` (e.g. ``optuna-dashboard sqlite:///$HOME/.cache/attnopt/
tuning.db``) browses every trial, its config, latency and failure reason. Several machines
tune one study at once by pointing ``--storage`` at one PostgreSQL or MySQL server (one process
per GPU, e.g. ``CUDA_VISIBLE_DEVICES=i``), all with the same ``--trials``.
``tune_command`` is the command; ``tune_app`` runs it on its own (``python -m``).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from attnopt.autotune.store import Store
from attnopt.autotune.tuner import tune_kernel
from attnopt.codegen.signature import KernelSignature
from attnopt.errors import AttnoptError
from attnopt.targets import resolve

DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float": "float32",
    "float32": "float32",
}
Sampler = Literal["tpe", "grid"]
MASKS = ("none", "causal", "additive", "boolean", "sliding_window")
_FIELDS = {
    "b": "batch",
    "batch": "batch",
    "h": "heads",
    "heads": "heads",
    "n": "n",
    "m": "m",
    "d": "head_dim",
    "head_dim": "head_dim",
    "dv": "value_dim",
    "value_dim": "value_dim",
}


def parse_signature(text: str) -> KernelSignature:
    """``b=1,h=16,n=4096,d=128,dtype=bf16,causal=1,kv_heads=4`` as a ``KernelSignature``.

    ``m`` defaults to ``n``; ``mask=`` takes any mask kind and ``causal=1`` means ``mask=causal``.
    """
    values: dict = {}
    kv_heads = None
    for item in filter(None, text.split(",")):
        name, _, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        try:
            if name in _FIELDS:
                values[_FIELDS[name]] = int(raw)
            elif name in ("kv_heads", "hkv"):
                kv_heads = int(raw)
            elif name == "dtype":
                values["dtype"] = DTYPES[raw]
            elif name == "causal":
                values["mask_kind"] = "causal" if int(raw) else values.get("mask_kind", "none")
            elif name == "mask" and raw in MASKS:
                values["mask_kind"] = raw
            else:
                raise KeyError(name)
        except (KeyError, ValueError):
            raise typer.BadParameter(
                f"cannot read {item!r} in {text!r}: use b, h, n, m, d, dv, kv_heads as integers, "
                f"dtype={'|'.join(DTYPES)}, causal=0|1, mask={'|'.join(MASKS)}"
            ) from None
    missing = [k for k in ("n", "head_dim", "dtype") if k not in values]
    if missing:
        raise typer.BadParameter(f"{text!r} needs n=, d= and dtype= (missing {missing})")
    values.setdefault("m", values["n"])
    heads = values.setdefault("heads", 8)
    if kv_heads is not None:
        if kv_heads <= 0 or heads % kv_heads:
            raise typer.BadParameter(f"kv_heads={kv_heads} must divide h={heads} in {text!r}")
        values["kv_group"] = heads // kv_heads
    return KernelSignature(**values)


def model_signatures(source: str) -> list[KernelSignature]:
    """The site signatures ``attnopt.inspect`` finds in an ONNX file or a ``module:factory``.

    The factory is called with no arguments and returns a model or ``(model, example_inputs)``.
    """
    try:
        from attnopt import inspect
    except ImportError as error:
        raise typer.BadParameter(
            f"tuning from a model needs attnopt.inspect, which is unavailable ({error}); "
            f"pass signatures like b=1,h=16,n=4096,d=128,dtype=bf16 instead"
        ) from None
    if source.endswith(".onnx"):
        model, inputs = source, None
    else:
        module_name, _, factory = source.partition(":")
        try:
            built = getattr(importlib.import_module(module_name), factory)()
        except (ImportError, AttributeError) as error:
            raise typer.BadParameter(f"cannot load {source!r}: {error}") from None
        model, inputs = built if isinstance(built, tuple) else (built, None)
    try:
        report = inspect(model, inputs)
    except TypeError as error:
        raise typer.BadParameter(f"attnopt.inspect cannot read {source!r} ({error})") from None
    found = [site.kernel_signature for site in report.sites if site.kernel_signature]
    if not found:
        raise typer.BadParameter(f"attnopt.inspect found no attention site in {source!r}")
    return found


def _signatures(sources: list[str]) -> list[KernelSignature]:
    sigs: list[KernelSignature] = []
    for source in sources:
        sigs.extend([parse_signature(source)] if "=" in source else model_signatures(source))
    return list(dict.fromkeys(sigs))


def _shape(key: dict) -> str:
    """dtype, head dim, mask and lengths of a tuning key or signature, in one cell."""
    gqa = " gqa" if key["gqa"] else ""
    return f"{key['dtype']} d{key['head_dim']} {key['mask_kind']}{gqa} n{key['n']} m{key['m']}"


def _config_text(config: dict | None) -> str:
    return "-" if config is None else " ".join(f"{k}={v}" for k, v in config.items())


def show(storage: str | None, as_json: bool) -> None:
    """Print the best config of every tuning key in the storage."""
    store = Store(storage)
    found = store.summaries()
    if as_json:
        print(json.dumps([dataclasses.asdict(s) for s in found], indent=2))
        return
    table = Table(title=f"tuned configs in {store.shown}")
    for column in ("kernel", "target", "signature", "best ms", "config", "ok/failed/invalid"):
        table.add_column(column)
    for s in sorted(found, key=lambda s: s.study):
        best = "-" if s.best_ms is None else f"{s.best_ms:.4f}"
        counts = f"{s.complete}/{s.failed}/{s.pruned}"
        key = s.key
        table.add_row(
            key["kernel"], key["target"], _shape(key), best, _config_text(s.config), counts
        )
    Console().print(table if found else f"no tuned configs in {store.shown}")


def tune_command(
    sources: Annotated[
        list[str] | None,
        typer.Argument(
            help="Signatures (b=1,h=16,n=4096,d=128,dtype=bf16,causal=1,kv_heads=4), an ONNX "
            "file, or module:factory returning a torch model (and example inputs).",
            show_default=False,
        ),
    ] = None,
    trials: Annotated[int, typer.Option(help="Measured trials each study holds in total.")] = 50,
    timeout: Annotated[
        float | None, typer.Option(help="Stop starting trials after this many seconds.")
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Optuna storage URL or SQLite path (default: ATTNOPT_TUNING_DB or cache)."
        ),
    ] = None,
    jobs: Annotated[int, typer.Option(help="Workers in this process, on one device.")] = 1,
    kernel: Annotated[
        str | None, typer.Option(help="triton, tvm or a module path (default: by target).")
    ] = None,
    target: Annotated[str, typer.Option(help="Target name, or auto for this machine.")] = "auto",
    sampler: Annotated[Sampler, typer.Option(help="Search strategy.")] = "tpe",
    seed: Annotated[
        int | None, typer.Option(help="Sampler seed, for reproducible searches.")
    ] = None,
    backward: Annotated[bool, typer.Option(help="Also tune the backward pass (training).")] = False,
    show_stored: Annotated[
        bool, typer.Option("--show", help="List the stored best configs.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Tune attention kernels and store the best configs for optimize() to use."""
    try:
        if show_stored:
            show(storage, as_json)
            return
        if not sources:
            raise typer.BadParameter("give at least one signature or model (or --show)")
        sigs = _signatures(sources)
        resolved = resolve(target)
        options = dict(trials=trials, timeout=timeout, storage=storage, sampler=sampler, seed=seed)
        options |= dict(kernel=kernel, backward=backward, jobs=jobs, progress=not as_json)
        results = [(sig, r) for sig in sigs for r in tune_kernel(resolved, sig, **options)]
    except AttnoptError as error:
        Console().print(f"[red]error:[/red] {error}")
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps([dataclasses.asdict(r) for _, r in results], indent=2))
        return
    table = Table(title=f"tuned into {results[0][1].storage}")
    for column in ("kernel", "signature", "best ms", "config", "default", "trials", "failed"):
        table.add_column(column)
    for sig, r in results:
        best = "-" if r.ms is None else f"{r.ms:.4f}"
        cells = (_config_text(r.config), _config_text(r.default), str(r.measured), str(r.failed))
        table.add_row(
            r.kernel, _shape(dataclasses.asdict(sig) | {"gqa": sig.kv_group > 1}), best, *cells
        )
    Console().print(table)


tune_app = typer.Typer(add_completion=False)
tune_app.command("tune")(tune_command)

if __name__ == "__main__":
    tune_app()
