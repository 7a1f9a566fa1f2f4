"""Fixtures for the Dynamo front end: a fresh Dynamo per test, and a counter on the op."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from attnopt.codegen.registry import Kernel, kernels_for, register_kernel, unregister_kernel


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def op_calls() -> Iterator[list[tuple[int, int]]]:
    """``(queries, keys)`` of every call of ``attnopt::attention``: a kernel registered above
    all others records the call, then runs the kernel the op would have picked."""
    calls: list[tuple[int, int]] = []

    def forward(q, k, v, mask, **flags):
        calls.append((q.shape[-2], k.shape[-2]))
        for kernel in kernels_for("exact", q.device.type):
            if kernel.name == "counting":
                continue
            if kernel.supports is None or (
                kernel.supports(q, k, v, mask, flags["causal"], flags["window"]) is None
            ):
                return kernel.forward(q, k, v, mask, **flags)
        raise LookupError("no kernel")

    register_kernel(Kernel("exact", "cpu", "counting", forward=forward, priority=10**6))
    yield calls
    unregister_kernel("exact", "cpu", "counting")
