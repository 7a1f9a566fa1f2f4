"""Timing one config: a latency in milliseconds, or the reason it could not run.

A runner is ``runner(config) -> launch``: it builds (compiles, allocates) the kernel for a config
and returns the zero-argument call to time, so build time never counts. On a GPU target the
launch is timed with ``triton.testing.do_bench`` (warm-up, then the median of repeats, with the
L2 cache flushed between runs); on CPU it is the median of repeated ``perf_counter`` runs after
a warm-up call. Any exception while building, warming up or timing (a compile error, an
out-of-resources launch) becomes a failed ``Timing``, never an exception of the tuner.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnopt.autotune.space import Config
from attnopt.errors import UnsupportedTargetError
from attnopt.targets import Target

Runner = Callable[[Config], Callable[[], object]]


@dataclass(frozen=True)
class Timing:
    """``ms`` when the config ran, else ``error`` says why it did not."""

    ms: float | None = None
    error: str | None = None


def check_device(target: Target) -> None:
    """Fail early when ``target`` needs a device this machine does not have."""
    if target.is_gpu and not torch.cuda.is_available():
        raise UnsupportedTargetError(
            f"target {target.name!r} needs a CUDA GPU and none is visible; "
            f"tune on a GPU machine or pick target='cpu'"
        )


def measure(runner: Runner, config: Config, target: Target, budget_ms: float = 100.0) -> Timing:
    """Time ``runner(config)``'s launch for about ``budget_ms``; failures are returned."""
    try:
        launch = runner(config)
        ms = _gpu_median(launch, budget_ms) if target.is_gpu else _cpu_median(launch, budget_ms)
    except Exception as error:  # any failure of a config is data, not a crash
        return Timing(error=f"{type(error).__name__}: {error}".strip()[:2000])
    return Timing(ms=ms)


def _gpu_median(launch: Callable[[], object], budget_ms: float) -> float:
    import triton.testing

    warmup, rep = max(1, int(budget_ms / 4)), max(1, int(budget_ms))
    return float(triton.testing.do_bench(launch, warmup=warmup, rep=rep, return_mode="median"))


def _cpu_median(launch: Callable[[], object], budget_ms: float) -> float:
    launch()  # warm-up: first-call compilation, allocator and cache effects
    samples: list[float] = []
    while len(samples) < 5 or (sum(samples) * 1e3 < budget_ms and len(samples) < 1000):
        start = time.perf_counter()
        launch()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3
