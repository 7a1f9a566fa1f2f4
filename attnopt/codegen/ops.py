"""``attnopt::attention``: the one op every exact site is rewritten into.

It is a ``torch.library.custom_op`` so rewritten graphs still export, compile (it has a fake
implementation) and pickle. At run time it folds the site's layout to the kernels' 4-D contract
(``codegen/layout.py``) and calls the best kernel registered for the device
(``codegen/registry.py``); gradients go through the kernel's backward when it has one, else
through autograd of the reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from attnopt.codegen.layout import HeadsLayout, leading_shape, to_heads
from attnopt.codegen.reference.exact import exact_attention
from attnopt.codegen.registry import Kernel, register_kernel, select_kernel

REFERENCE = register_kernel(
    Kernel(variant="exact", device_type="any", name="reference", forward=exact_attention)
)

_forced: list[str] = []


@contextlib.contextmanager
def use_kernel(name: str) -> Iterator[None]:
    """Run ``attnopt::attention`` with the named kernel (tests, benchmarks, debugging)."""
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def _pick(q, k, v, mask, causal: bool, window: int) -> Kernel:
    if _forced:
        from attnopt.codegen.registry import kernels_for

        for kernel in kernels_for("exact", q.device.type):
            if kernel.name == _forced[-1]:
                return kernel
        raise LookupError(f"kernel {_forced[-1]!r} is not registered for {q.device.type}")
    return select_kernel("exact", q, k, v, mask, causal, window)


def _run(q, k, v, mask, scale, causal, window, fill, kv_group):
    heads = to_heads(q, k, v, mask, kv_group)
    kernel = _pick(heads.q, heads.k, heads.v, heads.mask, causal, window)
    out, _ = kernel.forward(
        heads.q, heads.k, heads.v, heads.mask, scale=scale, causal=causal, window=window, fill=fill
    )
    # contiguous, as the fake implementation says: Inductor checks the strides it planned for
    return _nan_rows(out, heads.q).reshape(heads.out_shape).contiguous()


def _nan_rows(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A NaN in a query row makes that row's scores, and so its output, NaN in the decomposed
    original; online-softmax kernels drop it (their running max ignores NaN). Put it back."""
    if not q.is_floating_point():
        return out
    if q.device.type == "cpu" and not bool(q.sum().isnan()):  # no NaN: one reduction, no copy
        return out
    return out.masked_fill(torch.isnan(q).any(dim=-1, keepdim=True), float("nan"))


@torch.library.custom_op("attnopt::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    causal: bool,
    window: int,
    fill: float,
    kv_group: int,
) -> torch.Tensor:
    """softmax(scale·q·kᵀ (+ mask) with causal/window exclusions)·v, in the site's own layout."""
    return _run(q, k, v, mask, scale, causal, window, fill, kv_group)


def attention_eager(q, k, v, mask, scale, causal, window, fill, kv_group) -> torch.Tensor:
    """``attnopt::attention`` for graphs run as plain Python (the Dynamo path's ``eager`` inner
    backend): without autograd it calls the body directly, sparing the custom op's dispatch
    (~50 µs a call, as much as a short decode kernel); with autograd, the op."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, mask)):
        return attention(q, k, v, mask, scale, causal, window, fill, kv_group)
    return _run(q, k, v, mask, scale, causal, window, fill, kv_group)


@attention.register_fake
def _attention_fake(q, k, v, mask, scale, causal, window, fill, kv_group):
    lead = leading_shape(q.shape, k.shape, kv_group)
    return q.new_empty((*lead, q.shape[-2], v.shape[-1]))


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, causal, window, fill, kv_group = inputs
    ctx.save_for_backward(q, k, v, mask)
    ctx.attrs = (scale, causal, window, fill, kv_group)


def _kernel_grads(kernel: Kernel, heads: HeadsLayout, grad_out, flags: dict) -> tuple[list, list]:
    """The 4-D views and the kernel's gradients for them (its forward rerun for out and lse)."""
    views = (heads.q, heads.k, heads.v)
    with torch.no_grad():
        out, lse = kernel.forward(*views, heads.mask, **flags)
        grads = kernel.backward(grad_out.reshape(out.shape), *views, heads.mask, out, lse, **flags)
    pairs = [(view, g) for view, g in zip(views, grads, strict=True) if view.requires_grad]
    return [view for view, _ in pairs], [g for _, g in pairs]


def _backward(ctx, grad_out):
    q, k, v, mask = ctx.saved_tensors
    scale, causal, window, fill, kv_group = ctx.attrs
    flags = dict(scale=scale, causal=causal, window=window, fill=fill)
    wants = [ctx.needs_input_grad[i] for i in range(4)]
    with torch.enable_grad():
        leaves = [
            t.detach().requires_grad_(w) if t is not None else None
            for t, w in zip((q, k, v, mask), wants, strict=True)
        ]
        heads = to_heads(*leaves[:3], leaves[3], kv_group)
        kernel = _pick(heads.q, heads.k, heads.v, heads.mask, causal, window)
        if kernel.backward is not None and not wants[3]:  # kernels give no mask gradient
            outputs, grad_outputs = _kernel_grads(kernel, heads, grad_out, flags)
        else:
            out, _ = exact_attention(heads.q, heads.k, heads.v, heads.mask, **flags)
            outputs, grad_outputs = [out.reshape(heads.out_shape)], [grad_out]
        targets = [t for t, w in zip(leaves, wants, strict=True) if w]
        grads = iter(torch.autograd.grad(outputs, targets, grad_outputs)) if targets else iter(())
    return tuple(next(grads) if w else None for w in wants) + (None,) * 5


attention.register_autograd(_backward, setup_context=_setup_context)

import attnopt.codegen.backends  # noqa: E402,F401  (registers the compiled kernels)
