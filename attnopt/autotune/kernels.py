"""Which kernels can be tuned, and the runner that times one on inputs of a signature.

A tunable kernel module declares, by convention, ``FORWARD_SPACE`` with ``forward`` (or
``SPACE`` with ``launch``) and optionally ``BACKWARD_SPACE`` with ``backward``; the launchers
follow ``codegen/reference/exact.py``'s contract plus a ``config=`` keyword. ``triton`` and
``tvm`` name ``attnopt.codegen.<backend>.<variant>``, ``KERNEL_MODULES`` the registered kernels
with a module of their own (the decode kernels); any other name is a module path, so a kernel
outside attnopt can be tuned the same way.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnopt.autotune.measure import Runner
from attnopt.autotune.space import ConfigSpace
from attnopt.codegen.signature import KernelSignature
from attnopt.errors import KernelError
from attnopt.targets import Target

BACKENDS = {"triton": "attnopt.codegen.triton", "tvm": "attnopt.codegen.tvm"}
# Registered kernels that live in a module of their own rather than ``<backend>.<variant>``.
KERNEL_MODULES = {
    "triton_decode": "attnopt.codegen.triton.decode",
    "tvm_decode": "attnopt.codegen.tvm.decode",
}
WINDOW = 256  # the window timed for ``sliding_window`` signatures, which do not carry one
_CONVENTIONS = (
    ("forward", "FORWARD_SPACE", "forward"),
    ("forward", "SPACE", "launch"),
    ("backward", "BACKWARD_SPACE", "backward"),
)


@dataclass(frozen=True)
class Pass:
    """One tunable launcher of a kernel module (``forward`` for backward passes' inputs)."""

    name: str
    space: ConfigSpace
    launch: Callable
    forward: Callable | None = None


def default_kernel(target: Target) -> str:
    """The backend a target's kernels come from."""
    return "triton" if target.backend == "triton" else "tvm"


def passes(kernel: str, variant: str = "exact") -> list[Pass]:
    """The tunable passes of ``kernel`` (a backend name or a module path), forward first."""
    module_name = f"{BACKENDS[kernel]}.{variant}" if kernel in BACKENDS else kernel
    module_name = KERNEL_MODULES.get(kernel, module_name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise KernelError(
            f"kernel {kernel!r} is not available ({error}); use one of {', '.join(BACKENDS)} "
            f"or a module path that defines FORWARD_SPACE and forward"
        ) from None
    found: list[Pass] = []
    for name, space_name, launch_name in _CONVENTIONS:
        space, launch = getattr(module, space_name, None), getattr(module, launch_name, None)
        if isinstance(space, ConfigSpace) and callable(launch):
            forward = found[0].launch if name == "backward" and found else None
            found.append(Pass(name, space, launch, forward))
    if not found or found[0].name != "forward":
        raise KernelError(f"{module_name} declares no FORWARD_SPACE with forward (or SPACE/launch)")
    return found


@dataclass(frozen=True)
class Inputs:
    """Random inputs of a signature in the kernels' contract: ``(q, k, v, mask)`` and flags."""

    args: tuple
    flags: dict


def inputs(sig: KernelSignature, target: Target, seed: int = 0) -> Inputs:
    """Inputs of ``sig`` on the target's device (masks expanded from one (N, M) plane)."""
    device = "cuda" if target.is_gpu else "cpu"
    dtype = getattr(torch, sig.dtype)
    gen = torch.Generator().manual_seed(seed)

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    kv_heads = sig.heads // sig.kv_group
    q = tensor(sig.batch, sig.heads, sig.n, sig.head_dim)
    k = tensor(sig.batch, kv_heads, sig.m, sig.head_dim)
    v = tensor(sig.batch, kv_heads, sig.m, sig.value_dim or sig.head_dim)
    mask = None
    if sig.mask_kind == "additive":
        mask = tensor(1, 1, sig.n, sig.m).expand(sig.batch, sig.heads, sig.n, sig.m)
    elif sig.mask_kind == "boolean":
        keep = torch.rand(1, 1, sig.n, sig.m, generator=gen) > 0.1
        mask = keep.to(device).expand(sig.batch, sig.heads, sig.n, sig.m)
    flags = dict(
        scale=sig.head_dim**-0.5,
        causal=sig.mask_kind == "causal",
        window=WINDOW if sig.mask_kind == "sliding_window" else 0,
        fill=float("-inf"),
    )
    return Inputs((q, k, v, mask), flags)


def runner(kernel_pass: Pass, sig: KernelSignature, target: Target, seed: int = 0) -> Runner:
    """``config -> launch`` of one pass on ``inputs(sig, target, seed)``."""
    given = inputs(sig, target, seed)
    args = given.args
    if kernel_pass.name == "backward":
        out, lse = kernel_pass.forward(*args, **given.flags)
        args = (torch.randn_like(out), *args, out, lse)
    return lambda config: functools.partial(kernel_pass.launch, *args, **given.flags, config=config)
