"""Shared test fixtures: deterministic seeds, the CPU ISA levels to build for, and the CUDA
check behind the ``gpu`` marker."""

from __future__ import annotations

import os

import torch

# Triton picks interpreter or compiler when a kernel (or its own stdlib) is defined, so this must
# be set before anything imports triton: without CUDA, kernels run in the interpreter on CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from attnopt.targets import CPU_TARGET_ENV, Target, cpu_levels, cpu_target  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=cpu_levels())
def cpu_level(request, monkeypatch) -> Target:
    """Each vector ISA level this machine can execute (AVX2, and AVX-512 where present), pinned
    through ``ATTNOPT_CPU_TARGET`` for the test, so an AVX-512 machine also proves the AVX2 code."""
    monkeypatch.setenv(CPU_TARGET_ENV, request.param)
    return cpu_target(request.param)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
