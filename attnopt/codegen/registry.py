"""Which kernel runs a variant on a device: a dict filled by ``register_kernel``.

Backends register themselves when their module is imported (see ``attnopt.codegen.ops``); the
op picks, per device type, the available kernel with the highest priority. The plain-torch
reference is registered for every device at priority 0, so there is always a kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Kernel:
    """One implementation of a variant on one device type.

    ``forward(q, k, v, mask, scale=, causal=, window=, fill=) -> (out, lse)`` follows the
    contract of ``codegen/reference/<variant>.py``. ``backward`` (optional) takes
    ``(grad_out, q, k, v, mask, out, lse, scale=, causal=, window=, fill=)`` and returns
    ``(dq, dk, dv)``; without it, gradients come from autograd through the reference.
    ``supports(q, k, v, mask, causal, window)`` returns None or the reason it cannot run them.
    """

    variant: str
    device_type: str
    name: str
    forward: Callable
    backward: Callable | None = None
    supports: Callable | None = None
    priority: int = 0


_KERNELS: dict[tuple[str, str], dict[str, Kernel]] = {}
# select_kernel's answers per call signature: every layer of a model asks the same question at
# every step, and the ``supports`` chain costs more than a small decode kernel call
_CHOICES: dict[tuple, Kernel] = {}
_MAX_CHOICES = 4096


def forget_choices() -> None:
    """Drop the remembered selections: what decided them changed (a kernel registered or
    removed, a tuned config installed)."""
    _CHOICES.clear()


def register_kernel(kernel: Kernel) -> Kernel:
    """Add (or replace) a kernel; returns it so modules can keep a handle."""
    _KERNELS.setdefault((kernel.variant, kernel.device_type), {})[kernel.name] = kernel
    forget_choices()
    return kernel


def unregister_kernel(variant: str, device_type: str, name: str) -> None:
    """Remove a kernel (tests and plugins that registered one for a while)."""
    _KERNELS.get((variant, device_type), {}).pop(name, None)
    forget_choices()


def kernels_for(variant: str, device_type: str) -> list[Kernel]:
    """Registered kernels for a variant on a device type, best first."""
    found = _KERNELS.get((variant, device_type), {}) | _KERNELS.get((variant, "any"), {})
    return sorted(found.values(), key=lambda kern: -kern.priority)


def select_kernel(variant: str, q: torch.Tensor, k, v, mask, causal: bool, window: int) -> Kernel:
    """The best registered kernel that accepts these inputs. ``supports`` reads shapes, dtypes,
    the device and installed configs, never values: one answer per call signature."""
    key = (variant, q.device, q.dtype, q.shape, k.shape, v.shape, k.dtype, v.dtype, causal, window)
    if mask is not None:
        key += (mask.shape, mask.dtype)
    kernel = _CHOICES.get(key)
    if (
        kernel is not None
        and _KERNELS[kernel.variant, kernel.device_type].get(kernel.name) is kernel
    ):
        return kernel  # (the identity check: a kernel replaced in _KERNELS by hand is seen)
    for kernel in kernels_for(variant, q.device.type):
        if kernel.supports is None or kernel.supports(q, k, v, mask, causal, window) is None:
            if len(_CHOICES) >= _MAX_CHOICES:  # decode steps: a new key length every step
                _CHOICES.clear()
            _CHOICES[key] = kernel
            return kernel
    raise LookupError(f"no kernel registered for variant {variant!r} on {q.device.type}")
