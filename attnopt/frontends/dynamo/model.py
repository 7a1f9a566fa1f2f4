"""``attnopt.optimize`` through Dynamo, for models export cannot serve: calls that carry caches
(HF ``Cache`` objects, tuples of past keys/values, buffers written in place), Python ints that
change per call (``start_pos``), other argument sets than the example's, ``generate()``.

The result is the model itself in structure (same class, so ``generate()``, ``.config``,
``save_pretrained`` and ``to()`` keep working) with its call compiled by the ``attnopt`` backend:
every graph Dynamo captures, at the example or later (the decode steps, recompiles), has its
attention sites detected and rewritten.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from attnopt.frontends.dynamo.backend import attnopt_backend
from attnopt.frontends.export.capture import Inputs
from attnopt.report import Report, SiteReport

_PLAIN = (torch.Tensor, int, float, bool, type(None))


def buffer_versions(model: nn.Module) -> dict[int, int]:
    """Version counters of the model's buffers, to see which a call writes in place."""
    return {id(b): b._version for b in model.buffers()}


def why_dynamo(
    model: nn.Module, inputs: Inputs, outputs: Any, versions: dict[int, int]
) -> str | None:
    """Why an exported graph could not stand in for ``model`` (None: it can)."""
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and can_generate():
        return "the model generates: its calls carry a cache and change argument sets"
    bound = inspect.signature(model.forward).bind(*inputs.args, **inputs.kwargs)
    for name, value in bound.arguments.items():
        for leaf in pytree.tree_leaves(value):
            if not isinstance(leaf, _PLAIN):
                return f"input {name!r} carries a {type(leaf).__name__}"
            if isinstance(leaf, int | float) and not isinstance(leaf, bool):
                return f"input {name!r} is a Python number that may change per call"
    for leaf in pytree.tree_leaves(outputs):
        if not isinstance(leaf, _PLAIN):
            return f"the model returns a {type(leaf).__name__}"
    written = [name for name, b in model.named_buffers() if b._version != versions.get(id(b))]
    if written:
        return f"forward writes buffers in place ({', '.join(written[:3])})"
    return None


def structural_copy(model: nn.Module, versions: dict[int, int]) -> nn.Module:
    """The same class with its own module objects, sharing the parameters and the buffers no
    call writes (as ``torch.compile``'s wrapper shares them); buffers written in place (caches)
    and plain tensor attributes are copied, so the two models keep separate caches."""
    memo: dict[int, Any] = {id(p): p for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers() if b._version == versions.get(id(b))})
    return copy.deepcopy(model, memo)


def compile_in_place(module: nn.Module, options: dict) -> None:
    """Route ``module(...)`` through Dynamo with the attnopt backend.

    Dynamo keeps its cache and recompile limit per code object; each compiled module gets a
    code object of its own so that many optimized models never share (and exhaust) one."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return module._call_impl(*args, **kwargs)

    call.__code__ = call.__code__.replace()
    module._compiled_call_impl = torch.compile(call, backend=attnopt_backend, options=options)


def compile_model(
    model: nn.Module,
    report: Report,
    inner: str,
    variants: tuple,
    target: Any,
    configure: Callable[[SiteReport], None] | None = None,
) -> None:
    """Compile ``model`` and the submodules a generation loop calls on their own (the encoder
    of an encoder-decoder), all recording into ``report``; ``configure`` sees each rewritten
    site of every graph, those Dynamo captures after ``optimize()`` returned included."""
    options = {
        "attnopt_inner": inner,
        "attnopt_variants": variants,
        "attnopt_target": target,
        "attnopt_report": report,
        "attnopt_configure": configure,
    }
    compile_in_place(model, options)
    get_encoder = getattr(model, "get_encoder", None)
    encoder = get_encoder() if callable(get_encoder) else None
    if isinstance(encoder, nn.Module) and encoder is not model:
        compile_in_place(encoder, options)


def uncompile(model: nn.Module) -> None:
    """Back to the original ops everywhere (a rewrite failed validation)."""
    for module in model.modules():
        module._compiled_call_impl = None


def comparable(outputs: Any, depth: int = 3) -> Any:
    """Outputs with cache objects opened up into their tensors (a ``DynamicCache`` holds its
    keys and values in attributes), so two runs' caches can be compared like any output."""
    if isinstance(outputs, _PLAIN):
        return outputs
    if isinstance(outputs, list | tuple):
        return [comparable(o, depth) for o in outputs]
    if isinstance(outputs, dict):
        return {k: comparable(v, depth) for k, v in outputs.items()}
    fields = getattr(outputs, "__dict__", None)
    if depth == 0 or not isinstance(fields, dict):
        return type(outputs).__name__
    return {k: comparable(v, depth - 1) for k, v in fields.items() if not callable(v)}
