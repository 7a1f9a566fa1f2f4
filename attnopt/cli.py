"""The ``attnopt`` command line: one typer command per function, errors as one line.

    attnopt inspect MODEL.onnx
    attnopt optimize pkg.module:factory [--variant linear --variant exact] [--tolerance rel_l1=0.05]
        [--knob hybrid.window=64] [--search] [-o report.json] [--json]
    attnopt convert IN.onnx -o OUT.onnx [--variant exact] [--no-check] [--dim seq=512] [--json]
    attnopt report REPORT.json [--plot front.png]

Each command is a plain function registered on ``app``; a new one (``tune``, ``bench``) is one
more ``@app.command()`` or ``app.command("tune")(tune_command)``. ``_one_line_errors`` turns
every failure into ``error: <reason>`` on stderr and a non-zero exit code, never a traceback
(``ATTNOPT_DEBUG=1`` shows it).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from attnopt.errors import AttnoptError
from attnopt.report import Report

#: Options ``optimize`` and ``convert`` share: an error budget and fixed knob values.
ToleranceOption = Annotated[
    list[str],
    typer.Option(
        "--tolerance", help="a float, or metric=value (cos, rel_l1, rmse, model_rel_l1), repeatable"
    ),
]
KnobOption = Annotated[
    list[str],
    typer.Option("--knob", help="fix a knob: variant.knob=value or site/variant.knob=value"),
]

app = typer.Typer(
    name="attnopt",
    help="Find attention in a model and rewrite it into fused kernels.",
    no_args_is_help=True,
    add_completion=False,
)


def _one_line_errors(command: Callable) -> Callable:
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.BadParameter):
            raise  # typer.BadParameter and friends print as usage errors
        except Exception as failure:
            if os.environ.get("ATTNOPT_DEBUG"):
                raise
            known = isinstance(failure, AttnoptError)
            kind = "" if known else f"internal error ({type(failure).__name__}): "
            reason = " ".join(str(failure).split()) or type(failure).__name__
            message = f"error: {kind}{reason}"
            Console(stderr=True).print(message, markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1 if known else 2) from None

    return wrapper


@contextmanager
def _progress(enabled: bool):
    """A spinner on stderr naming the current step; yields the callback that advances it."""
    if not enabled:
        yield lambda message: None
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("starting")
        yield lambda message: progress.update(task, description=message)


def _dims(values: list[str]) -> dict[str, int]:
    dims = {}
    for value in values:
        name, _, size = value.partition("=")
        if not name or not size.strip().isdigit():
            raise AttnoptError(f"--dim {value!r}: expected name=size, e.g. --dim seq=512")
        dims[name.strip()] = int(size)
    return dims


def _summary(report: Report) -> Table:
    table = Table(title="summary")
    for column in ("sites found", "rewritten", "restored", "max error", "latency before → after"):
        table.add_column(column)
    errors = [s.max_error for s in report.sites if s.max_error is not None]
    if report.output_error is not None:
        errors.append(report.output_error)
    latency = "-"
    if report.latency_ms:
        before, after = report.latency_ms["before"], report.latency_ms["after"]
        latency = f"{before:.2f} → {after:.2f} ms (×{before / after:.2f})"
    table.add_row(
        str(len(report.sites)),
        str(len(report.rewritten)),
        str(sum(s.status == "restored" for s in report.sites)),
        f"{max(errors):.2e}" if errors else "-",
        latency,
    )
    return table


@app.command()
@_one_line_errors
def inspect(
    model: Annotated[Path, typer.Argument(help="an .onnx file")],
    json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """List the attention sites of a model, their signatures and near misses."""
    from attnopt.frontends.onnx.convert import inspect as inspect_onnx

    report = inspect_onnx(model)
    if json:
        typer.echo(report.to_json())
    else:
        report.print(Console())


@app.command()
@_one_line_errors
def convert(
    model: Annotated[Path, typer.Argument(help="the .onnx file to convert")],
    output: Annotated[Path, typer.Option("--output", "-o", help="where to write the result")],
    variant: Annotated[
        list[str], typer.Option("--variant", help="allowed variants, in order of preference")
    ] = ["exact"],  # noqa: B006 (typer reads the default)
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="verify and time in onnxruntime")
    ] = True,
    dim: Annotated[
        list[str],
        typer.Option(
            "--dim",
            help="verification size of a dynamic input dim, name=value (base dims only: "
            "sums such as 'past + seq' follow from their parts)",
        ),
    ] = [],  # noqa: B006
    tolerance: ToleranceOption = [],  # noqa: B006 (typer reads the default)
    knob: KnobOption = [],  # noqa: B006
    json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Rewrite a model's attention into onnxruntime's fused ops (or, with --variant linear or
    conv_basis, standard ops within an error budget), verify it, and time it."""
    from attnopt.frontends.onnx.convert import convert as convert_onnx

    dims = _dims(dim)
    with _progress(not json) as step:
        report = convert_onnx(
            model,
            output,
            variants=tuple(variant),
            check=check,
            dims=dims,
            tolerance=_tolerance(tolerance),
            knobs=_knobs(knob) or None,
            latency=check,
            progress=step,
        )
    if json:
        typer.echo(report.to_json())
        return
    console = Console()
    report.print(console)
    console.print(_summary(report))
    console.print(f"wrote {output}")


def _load_spec(spec: str) -> tuple:
    """``module:factory`` (or ``path/file.py:factory``) called with no arguments, returning
    ``(model, example_inputs)`` or ``(model, example_inputs, calibration)``."""
    import importlib
    import importlib.util
    import sys

    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise AttnoptError(f"{spec!r}: expected module:factory, e.g. mypkg.models:make")
    try:
        if where.endswith(".py"):
            loaded = importlib.util.spec_from_file_location(Path(where).stem, where)
            if loaded is None or not Path(where).is_file():
                raise ImportError(f"no file {where}")
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(where)
    except ImportError as err:
        raise AttnoptError(f"{spec!r}: cannot import {where} ({err})") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise AttnoptError(f"{spec!r}: {where} has no callable {name}")
    made = factory()
    if not isinstance(made, tuple) or len(made) not in (2, 3):
        raise AttnoptError(
            f"{spec!r}: the factory must return (model, example_inputs[, calibration]), "
            f"not {type(made).__name__}"
        )
    return made if len(made) == 3 else (*made, None)


def _number(text: str) -> float | int | bool | str:
    """An int, else a float, a bool (``true``/``false``: a switch such as quant_projections),
    else the text itself (a knob such as feature_map=elu)."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _tolerance(values: list[str]) -> float | dict | None:
    """``--tolerance 1e-3`` (exact variants) or ``--tolerance rel_l1=0.05 --tolerance cos=0.99``."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        value = _number(values[0])
        if isinstance(value, str):
            raise AttnoptError(f"--tolerance {value!r}: expected a number or metric=value")
        return float(value)
    limits = {}
    for text in values:
        metric, _, value = text.partition("=")
        number = _number(value.strip())
        if not metric or isinstance(number, str):
            raise AttnoptError(f"--tolerance {text!r}: expected metric=value, e.g. rel_l1=0.05")
        limits[metric.strip()] = float(number)
    return limits


def _knobs(values: list[str]) -> dict:
    """``--knob hybrid.window=64`` (every site) or ``--knob blocks.0/hybrid.window=32``."""
    knobs: dict = {}
    for text in values:
        path, _, value = text.partition("=")
        site, _, path = path.rpartition("/")
        variant, _, knob = path.partition(".")
        if not variant or not knob or not value:
            raise AttnoptError(
                f"--knob {text!r}: expected variant.knob=value or site/variant.knob=value"
            )
        place = knobs.setdefault(site, {}) if site else knobs
        place.setdefault(variant, {})[knob] = _number(value.strip())
    return knobs


@app.command()
@_one_line_errors
def optimize(
    spec: Annotated[
        str,
        typer.Argument(
            help="module:factory (or file.py:factory) returning (model, example_inputs"
            "[, calibration])"
        ),
    ],
    variant: Annotated[
        list[str], typer.Option("--variant", help="allowed variants, in order of preference")
    ] = ["exact"],  # noqa: B006 (typer reads the default)
    tolerance: ToleranceOption = [],  # noqa: B006 (typer reads the default)
    knob: KnobOption = [],  # noqa: B006
    search: Annotated[
        bool, typer.Option("--search", help="an Optuna study picks variants and knobs per site")
    ] = False,
    search_trials: Annotated[int, typer.Option("--search-trials", help="plans tried")] = 30,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="write the report JSON here")
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Optimize a torch model made by a Python factory; print the report, save it as JSON."""
    import attnopt

    model, example, calibration = _load_spec(spec)
    optimized = attnopt.optimize(
        model,
        example,
        variants=tuple(variant),
        tolerance=_tolerance(tolerance),
        calibration=calibration,
        search=search,
        search_trials=search_trials,
        knobs=_knobs(knob) or None,
    )
    report = optimized.attnopt_report
    if output is not None:
        output.write_text(report.to_json())
    if json:
        typer.echo(report.to_json())
        return
    console = Console()
    report.print(console)
    console.print(_summary(report))
    if output is not None:
        console.print(f"wrote {output}")


@app.command("report")
@_one_line_errors
def report_command(
    path: Annotated[Path, typer.Argument(help="a report saved as JSON (Report.to_json())")],
    plot: Annotated[
        Path | None, typer.Option("--plot", help="draw the search's Pareto front to this image")
    ] = None,
) -> None:
    """Show a saved report; with --plot, draw time vs model error of its Pareto front."""
    import json as json_module

    try:
        data = json_module.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise AttnoptError(f"{path}: not a readable JSON report ({err})") from None
    pareto = data.get("pareto") or []
    console = Console()
    table = Table(title=f"attnopt report: {data.get('model', '?')}")
    for column in ("site", "variant", "status", "trials"):
        table.add_column(column, overflow="fold")
    for site in data.get("sites", []):
        tried = ", ".join(f"{t['variant']}: {t['decision']}" for t in site.get("trials", []))
        table.add_row(site["location"], site.get("variant") or "-", site["status"], tried)
    console.print(table)
    for point in pareto:
        console.print(
            f"pareto trial {point['trial']}: {point['ms']:.3f} ms, "
            f"model rel_l1 {point['model_rel_l1']:.3e}"
        )
    if plot is not None:
        from attnopt.plot import plot_pareto

        console.print(f"wrote {plot_pareto(pareto, plot, data.get('model', ''))}")


def _register_tune() -> None:
    """``attnopt tune`` lives with the tuner; its module imports Optuna only when it runs."""
    from attnopt.autotune.cli import tune_command

    app.command("tune", help=tune_command.__doc__)(_one_line_errors(tune_command))


_register_tune()
