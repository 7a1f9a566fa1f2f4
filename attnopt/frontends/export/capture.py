"""Capture an nn.Module as an fx GraphModule: torch.export first, symbolic_trace as fallback.

Export runs with every dimension of every tensor input marked ``Dim.AUTO``, so the graph serves
other batch sizes and sequence lengths; if that fails, a static export; if that fails too,
``torch.fx.symbolic_trace``. The capture records which one ran and which dims stayed dynamic.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from attnopt.errors import CaptureError, InputSignatureError, UnsupportedOutputError


@dataclass
class Inputs:
    """Example inputs as the model takes them: positional args and keyword args."""

    args: tuple
    kwargs: dict

    @classmethod
    def of(cls, example_inputs: Any) -> Inputs:
        if isinstance(example_inputs, dict):
            return _checked(cls((), dict(example_inputs)))
        if isinstance(example_inputs, torch.Tensor):
            return cls((example_inputs,), {})
        if isinstance(example_inputs, list | tuple):
            return _checked(cls(tuple(example_inputs), {}))
        raise InputSignatureError(
            f"example_inputs must be a tuple of positional arguments or a dict of keyword "
            f"arguments, not {type(example_inputs).__name__}"
        )


_PLAIN = (torch.Tensor, int, float, bool, type(None))


def _checked(inputs: Inputs) -> Inputs:
    """Example inputs are tensors (in tuples, lists, dicts) and plain numbers, flags or None:
    what a captured graph can take. Anything else is named here, not deep inside the model."""
    leaves, _ = pytree.tree_flatten((inputs.args, inputs.kwargs))
    for leaf in leaves:
        if not isinstance(leaf, _PLAIN):
            raise InputSignatureError(
                f"example inputs must be tensors (or ints, floats, bools, None), but one is a "
                f"{type(leaf).__name__} ({str(leaf)[:40]!r}); pass torch tensors"
            )
    if not any(isinstance(leaf, torch.Tensor) for leaf in leaves):
        raise InputSignatureError("example inputs hold no tensor: pass the model's input tensors")
    return inputs


@dataclass
class Capture:
    gm: fx.GraphModule
    method: str  # "torch.export", "torch.export (static)" or "torch.fx.symbolic_trace"
    dynamic: bool  # the graph accepts other input shapes
    shapes_hold: bool  # node shapes are facts for every accepted input
    dynamic_dims: dict[str, list[int]] = field(default_factory=dict)
    size_hints: dict[str, int] = field(default_factory=dict)  # symbol -> example value
    notes: list[str] = field(default_factory=list)


def check_signature(model: nn.Module, inputs: Inputs) -> inspect.BoundArguments:
    """Bind the inputs to ``forward``'s signature, or say what does not fit."""
    try:
        return inspect.signature(model.forward).bind(*inputs.args, **inputs.kwargs)
    except TypeError as err:
        params = ", ".join(inspect.signature(model.forward).parameters)
        raise InputSignatureError(
            f"example inputs do not match {type(model).__name__}.forward({params}): {err}"
        ) from None


def check_outputs(outputs: Any) -> None:
    """The optimized module returns the same structure: only tensors and plain values fit."""
    leaves, _ = pytree.tree_flatten(outputs)
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor | int | float | bool | type(None)):
            raise UnsupportedOutputError(
                f"the model returns a {type(leaf).__name__}; attnopt needs outputs made of "
                "tensors in tuples, lists, dicts or registered dataclasses (e.g. HF ModelOutput). "
                "Return tensors from forward, or wrap the model in a module that does."
            )


def _auto_dims(value: Any) -> Any:
    return {i: Dim.AUTO for i in range(value.dim())} if isinstance(value, torch.Tensor) else None


def _dynamic_shapes(bound: inspect.BoundArguments, pinned: frozenset = frozenset()) -> dict:
    """Every dim dynamic except the ``(argument, dim)`` pairs in ``pinned``."""
    shapes = {name: pytree.tree_map(_auto_dims, value) for name, value in bound.arguments.items()}
    for name, dim in pinned:
        shapes[name][dim] = Dim.STATIC
    return shapes


def _scale_dims(program: Any, bound: inspect.BoundArguments) -> frozenset:
    """Input feature dims (the last dim of a top-level floating-point argument) that a float
    computed from a size depends on: ``x / math.sqrt(q.size(-1))``, ``q.shape[-1] ** -0.5``.
    These never change for a model (its weights fix them); kept static, the scale is a
    constant the site can carry."""
    last_dims: dict[Any, list] = {}
    for node in program.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        arg = bound.arguments.get(node.name)
        if (
            isinstance(val, torch.Tensor)
            and isinstance(arg, torch.Tensor)
            and val.dim()
            and arg.is_floating_point()
            and _is_symbolic(val.shape[-1])
        ):
            last_dims.setdefault(val.shape[-1].node.expr, []).append((node.name, val.dim() - 1))
    pinned = set()
    for node in program.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.SymFloat) and val.node.expr.free_symbols:
            for symbol in val.node.expr.free_symbols:
                pinned.update(last_dims.get(symbol, ()))
    return frozenset(pinned)


def _has_unit_dim(inputs: Inputs) -> bool:
    leaves = pytree.tree_leaves((inputs.args, inputs.kwargs))
    return any(isinstance(t, torch.Tensor) and 1 in t.shape for t in leaves)


def _sizes_of_one_stay_dynamic(enabled: bool):
    """Export specialises dims of size 1 (a batch of one would pin the batch); size-oblivious
    reasoning keeps them symbolic. Validation at the example still checks the result."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.fx.experimental._config.patch(backed_size_oblivious=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def capture(model: nn.Module, inputs: Inputs) -> Capture:
    """Capture ``model`` on ``inputs``; raise CaptureError naming why every method failed."""
    bound = check_signature(model, inputs)
    failures = []
    for dynamic in (True, False):
        try:
            program = _export(model, inputs, bound, dynamic, frozenset())
            pinned = _scale_dims(program, bound) if dynamic else frozenset()
            if pinned:
                program = _export(model, inputs, bound, dynamic, pinned)
            captured = _exported(program, dynamic)
            if pinned:
                dims = ", ".join(f"{name}[{dim}]" for name, dim in sorted(pinned))
                captured.notes.append(
                    f"{dims} kept static: an attention scale is computed from them"
                )
            return captured
        except Exception as err:  # noqa: BLE001 - every export failure means: try the next way
            failures.append(
                f"torch.export ({'dynamic' if dynamic else 'static'}): {_first_line(err)}"
            )
    try:
        return _traced(model, bound)
    except Exception as err:  # noqa: BLE001
        failures.append(f"torch.fx.symbolic_trace: {_first_line(err)}")
    raise CaptureError(
        f"could not capture {type(model).__name__}:\n  "
        + "\n  ".join(failures)
        + "\nRemove the construct named above (data-dependent Python control flow, "
        "non-tensor outputs, unsupported ops) or make it depend only on shapes."
    )


def _export(
    model: nn.Module, inputs: Inputs, bound: inspect.BoundArguments, dynamic: bool, pinned
) -> Any:
    with _sizes_of_one_stay_dynamic(dynamic and _has_unit_dim(inputs)):
        return torch.export.export(
            model,
            inputs.args,
            inputs.kwargs,
            dynamic_shapes=_dynamic_shapes(bound, pinned) if dynamic else None,
            strict=False,
        )


def _is_symbolic(size: Any) -> bool:
    return isinstance(size, torch.SymInt) and bool(size.node.expr.free_symbols)


def _exported(program: Any, dynamic: bool) -> Capture:
    """Read the dynamic dims off the program before ``module()`` (which re-traces its meta)."""
    dims: dict[str, list[int]] = {}
    hints: dict[str, int] = {}
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if node.name not in user_inputs or not isinstance(val, torch.Tensor):
            continue
        symbolic = [i for i, size in enumerate(val.shape) if _is_symbolic(size)]
        if symbolic:
            dims[node.name] = symbolic
        for size in val.shape:
            if _is_symbolic(size) and size.node.hint is not None:
                hints[str(size.node.expr)] = int(size.node.hint)
    notes = []
    if not dims:
        notes.append(
            "captured with static shapes: the optimized module accepts only the example's shapes"
        )
    elif dynamic:
        static = [
            f"{node.name}[{i}]"
            for node in program.graph.find_nodes(op="placeholder")
            if node.name in user_inputs and isinstance(node.meta.get("val"), torch.Tensor)
            for i, size in enumerate(node.meta["val"].shape)
            if not _is_symbolic(size)
        ]
        if static:
            notes.append(f"static dims (the model fixes them): {', '.join(static)}")
    gm = program.module()
    _drop_metadata_asserts(gm)
    method = "torch.export" if dynamic else "torch.export (static)"
    return Capture(gm, method, bool(dims), True, dims, hints, notes)


_METADATA_ASSERTS = (torch.ops.aten._assert_tensor_metadata.default,)


def _drop_metadata_asserts(gm: fx.GraphModule) -> None:
    """Export's dtype/device asserts on intermediates would pin values a rewrite replaces."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _METADATA_ASSERTS and not node.users:
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _traced(model: nn.Module, bound: inspect.BoundArguments) -> Capture:
    gm = fx.symbolic_trace(model)
    placeholders = [n.target for n in gm.graph.find_nodes(op="placeholder")]
    values = [bound.arguments.get(name) for name in placeholders]
    ShapeProp(gm).propagate(*values)
    return Capture(
        gm,
        "torch.fx.symbolic_trace",
        dynamic=True,
        shapes_hold=False,
        notes=["traced with torch.fx: shapes are known only at the example's sizes"],
    )
