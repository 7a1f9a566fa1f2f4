"""Shared test fixtures: deterministic seeds, and the CUDA check behind the ``gpu`` marker."""

from __future__ import annotations

import os

import torch

# Triton picks interpreter or compiler when a kernel (or its own stdlib) is defined, so this must
# be set before anything imports triton: without CUDA, kernels run in the interpreter on CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
