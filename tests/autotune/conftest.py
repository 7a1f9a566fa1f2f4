"""Shared pieces of the tuner tests: the toy kernel, a CPU target, a small signature."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from attnopt.autotune import measure as measure_module
from attnopt.autotune.kernels import passes, runner
from attnopt.codegen.signature import KernelSignature
from attnopt.targets import resolve

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # makes the toy kernel importable as a kernel module path
TOY = "attnopt_toy_kernel"
BUDGET_MS = 10.0  # per measured config: enough for a median, small enough for CI


@pytest.fixture(autouse=True)
def one_thread():
    """Timings of tiny matmuls on a shared 2-core box: no thread oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cpu():
    return resolve("cpu")


@pytest.fixture
def sig():
    return KernelSignature(head_dim=32, dtype="float32", n=256, m=256, heads=2, batch=1)


@pytest.fixture
def toy_pass():
    return passes(TOY)[0]


@pytest.fixture
def toy_runner(toy_pass, sig, cpu):
    return runner(toy_pass, sig, cpu)


@pytest.fixture
def modeled_runner(toy_runner, monkeypatch):
    """The toy kernel's configs with a modeled cost instead of a clock: the launch returns the
    cost (one unit per tile plus a fixed launch cost per head split) and the CPU timer reports
    it, so tests that compare configs' times are exact on any machine, however busy. Configs the
    toy rejects at launch still fail."""

    def runner(config):
        toy_runner(config)()  # the real launch, for its failures
        tiles = -(-256 // config["block_m"]) * -(-256 // config["block_n"])
        return lambda: 0.01 * tiles + 0.05 * config["split"]

    monkeypatch.setattr(measure_module, "_cpu_median", lambda launch, budget_ms: float(launch()))
    return runner


@pytest.fixture
def storage(tmp_path):
    return f"sqlite:///{tmp_path / 'tuning.db'}"
