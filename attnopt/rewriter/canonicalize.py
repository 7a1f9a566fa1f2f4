"""Local facts that make many spellings of attention one.

Front ends already turn ``div`` by a constant into ``mul``, ``einsum``/``bmm``/``baddbmm`` into
matmuls with a scale and an add, and ``masked_fill`` into ``where``. Here:

- ``canonicalize`` folds a hand-written stable softmax (``exp(x - max) / sum``) into ``softmax``;
- ``trace_operand`` walks back through views a site may look through (permutes compose, identity
  ops vanish, scalar multiplies move onto the scores as a scale);
- ``keep_band`` recognises masks that keep exactly the pairs ``j - i <= offset`` (causal
  triangles built from ``tril``/``triu``/``arange`` comparisons or sliced from a buffer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from attnopt.rewriter.graph import Const, GraphView, Operand

PASSTHROUGH = {"identity"}


def canonicalize(view: GraphView) -> GraphView:
    """Rewrite the view in place into canonical form and return it."""
    for node in view.nodes("div"):
        _fold_manual_softmax(view, node)
        _div_as_mul(view, node)
    for node in view.nodes("exp"):
        _fold_exp_log_softmax(view, node)
    for node in view.nodes("softmax"):
        _drop_row_max_shift(view, node)
    return view


def _fold_exp_log_softmax(view: GraphView, exp: str) -> None:
    """``exp(log_softmax(x))`` is ``softmax(x)``."""
    inner = _skip_identity(view, view.operands(exp)[0])
    if isinstance(inner, str) and view.op(inner) == "log_softmax":
        absorbed = (inner, *_identities_between(view, view.operands(exp)[0], inner))
        view.replace(
            exp, "softmax", view.operands(inner), axis=view.attrs(inner)["axis"], absorbed=absorbed
        )


def _drop_row_max_shift(view: GraphView, softmax: str) -> None:
    """``softmax(x - max(x, -1, keepdim))`` is ``softmax(x)`` (the shift, often detached, only
    guards exp against overflow, which softmax itself does)."""
    x = _skip_identity(view, view.operands(softmax)[0])
    attrs = view.attrs(softmax)
    if not isinstance(x, str) or view.op(x) != "sub" or attrs["axis"] != (view.rank(x) or 0) - 1:
        return
    source, shift = view.operands(x)
    shift_max = _row_max_of(view, _skip_identity(view, shift))
    if shift_max is None or _skip_identity(view, view.operands(shift_max)[0]) != _skip_identity(
        view, source
    ):
        return
    absorbed = (
        *attrs.get("absorbed", ()),
        x,
        shift_max,
        *_identities_between(view, shift, shift_max),
    )
    if view.op(_skip_identity(view, shift)) == "getitem":
        absorbed += (_skip_identity(view, shift),)
    view.replace(softmax, "softmax", [source], axis=attrs["axis"], absorbed=absorbed)


def _identities_between(view: GraphView, start: Operand, end: str) -> tuple[str, ...]:
    """The identity nodes walked from ``start`` back to ``end``."""
    found = []
    while isinstance(start, str) and start != end and view.op(start) in PASSTHROUGH:
        found.append(start)
        start = view.operands(start)[0]
    return tuple(found)


def _div_as_mul(view: GraphView, div: str) -> None:
    """``x / c`` for a known scalar ``c`` (a number, or a 0-d ``full``/``scalar_tensor``) is
    ``x * (1/c)``, so a scale spelled as a tensor division is an ordinary scale."""
    if view.op(div) != "div":
        return
    x, y = view.operands(div)
    divisor = scalar_value(view, y)
    if isinstance(x, str) and divisor is not None and divisor != 0:
        view.replace(div, "mul", [x, Const(1.0 / divisor)])


def _skip_identity(view: GraphView, n: Operand) -> Operand:
    while isinstance(n, str) and view.op(n) in PASSTHROUGH:
        n = view.operands(n)[0]
    return n


def _fold_manual_softmax(view: GraphView, div: str) -> None:
    """``exp(x - max(x)) / sum(exp(...))`` (max optional) over the last axis is ``softmax(x)``."""
    num, den = (_skip_identity(view, o) for o in view.operands(div))
    if not (isinstance(num, str) and isinstance(den, str)):
        return
    if view.op(num) != "exp" or view.op(den) != "sum":
        return
    rank = view.rank(num)
    den_attrs = view.attrs(den)
    if rank is None or den_attrs["axis"] != rank - 1 or not den_attrs["keepdim"]:
        return
    if _skip_identity(view, view.operands(den)[0]) != num:
        return
    absorbed = [num, den]
    x = _skip_identity(view, view.operands(num)[0])
    if isinstance(x, str) and view.op(x) == "sub":
        source, shift = (_skip_identity(view, o) for o in view.operands(x))
        shift_max = _row_max_of(view, shift)
        if shift_max is not None and _skip_identity(view, view.operands(shift_max)[0]) == source:
            absorbed += [x, shift_max, shift]
            x = source
    view.replace(div, "softmax", [x], axis=rank - 1, absorbed=tuple(absorbed))


def _row_max_of(view: GraphView, n: Operand) -> str | None:
    """The ``amax`` node behind ``n`` (through ``getitem(max, 0)``) if it is a keepdim row max."""
    if not isinstance(n, str):
        return None
    if view.op(n) == "getitem" and view.attrs(n).get("index") == 0:
        n = _skip_identity(view, view.operands(n)[0])
    if not isinstance(n, str) or view.op(n) != "amax":
        return None
    attrs, rank = view.attrs(n), view.rank(view.operands(n)[0])
    return n if attrs["keepdim"] and rank is not None and attrs["axis"] == rank - 1 else None


# -- operands -------------------------------------------------------------------------------
@dataclass
class TracedOperand:
    """``value == source.permute(perm) * scale``; ``path`` lists the view nodes walked through."""

    source: str
    perm: tuple[int, ...] | None
    scale: float = 1.0
    path: list[str] = field(default_factory=list)


def scalar_value(view: GraphView, n: Operand) -> float | None:
    """The Python number an operand is known to be, if any."""
    n = _skip_identity(view, n)
    if isinstance(n, Const):
        value = n.value
    elif view.op(n) == "constant":
        value = view.attrs(n)["value"]
    elif view.op(n) == "param" and not isinstance(view.attrs(n)["value"], nn.Parameter):
        value = view.attrs(n)["value"]  # a one-number buffer or lifted constant (a fill value)
    else:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def trace_operand(view: GraphView, n: str, allow_scale: bool) -> TracedOperand:
    """Walk back through permutes, identities and (if allowed) scalar multiplies."""
    rank = view.rank(n)
    perm = tuple(range(rank)) if rank is not None else None
    scale, path = 1.0, []
    while True:
        op = view.op(n)
        if op in PASSTHROUGH:
            path.append(n)
            n = view.operands(n)[0]
        elif op == "transpose" and perm is not None:
            inner = view.attrs(n)["perm"]
            perm = tuple(inner[p] for p in perm)
            path.append(n)
            n = view.operands(n)[0]
        elif op == "mul" and allow_scale:
            a, b = view.operands(n)
            factor_b, factor_a = scalar_value(view, b), scalar_value(view, a)
            if factor_b is not None and isinstance(a, str):
                scale *= factor_b
                path.append(n)
                n = a
            elif factor_a is not None and isinstance(b, str):
                scale *= factor_a
                path.append(n)
                n = b
            else:
                break
        else:
            break
        if not view.is_real(n) and view.op(n) not in ("transpose", "mul"):
            break
    identity = perm is not None and perm == tuple(range(len(perm)))
    return TracedOperand(n, None if identity else perm, scale, path)


# -- structured masks -----------------------------------------------------------------------
@dataclass(frozen=True)
class Band:
    """A (…, n, m) mask that keeps exactly the pairs with ``j - i <= offset``."""

    offset: Any
    rows: Any
    cols: Any


def keep_band(view: GraphView, n: Operand, keep: bool = True) -> Band | None:
    """The band kept (``keep=True``) or dropped (``keep=False``) by bool-like mask ``n``."""
    n = _skip_identity(view, n)
    if not isinstance(n, str):
        return None
    op = view.op(n)
    if op == "not":
        return keep_band(view, view.operands(n)[0], not keep)
    if op in ("cast", "unsqueeze", "reshape", "expand") and _only_unit_dims_added(view, n):
        return keep_band(view, view.operands(n)[0], keep)
    if op == "compare":
        return _band_from_compare(view, n, keep)
    if op in ("tril", "triu"):
        return _band_from_triangle(view, n, keep)
    if op == "slice":
        return _sliced_buffer_band(view, n, keep)
    return None


def additive_band(view: GraphView, n: Operand) -> Band | None:
    """The band kept by an additive mask that is 0 inside and -inf (or finfo.min) outside."""
    n = _skip_identity(view, n)
    if not isinstance(n, str):
        return None
    op = view.op(n)
    if op in ("unsqueeze", "reshape", "expand", "cast") and _only_unit_dims_added(view, n):
        return additive_band(view, view.operands(n)[0])
    if op == "where":
        cond, a, b = view.operands(n)
        va, vb = scalar_value(view, a), scalar_value(view, b)
        if va == 0 and _is_neg_inf(vb):
            return keep_band(view, cond, True)
        if vb == 0 and _is_neg_inf(va):
            return keep_band(view, cond, False)
        return None
    if op == "triu" and _is_neg_inf(_fill_value(view, view.operands(n)[0])):
        band = _triangle_dims(view, n)
        if band is None:
            return None
        rows, cols, diagonal = band
        return Band(diagonal - 1, rows, cols)  # -inf where j - i >= diagonal
    return None


def _is_neg_inf(value: float | None) -> bool:
    return value is not None and (value == -math.inf or value <= -1e30)


def _fill_value(view: GraphView, n: Operand) -> float | None:
    n = _skip_identity(view, n)
    if isinstance(n, str) and view.op(n) == "full":
        value = view.attrs(n)["value"]
        return float(value) if isinstance(value, int | float) else None
    return None


def _only_unit_dims_added(view: GraphView, n: str) -> bool:
    """The node's last two dims equal its input's (broadcasting or casting only)."""
    if view.op(n) == "cast":
        return True
    src = view.operands(n)[0]
    a, b = view.shape(n), view.shape(src)
    if a is None or b is None or len(b) < 2:
        return False
    lead_units = all(s == 1 for s in a[:-2]) or view.op(n) == "expand"
    return lead_units and view.same_size(a[-1], b[-1]) and view.same_size(a[-2], b[-2])


def _triangle_dims(view: GraphView, n: str) -> tuple | None:
    shape = view.shape(n)
    diagonal = view.attrs(n)["diagonal"]
    if shape is None or len(shape) < 2 or diagonal is None:
        return None
    return shape[-2], shape[-1], diagonal


def _is_all_ones(view: GraphView, n: Operand) -> bool:
    n = _skip_identity(view, n)
    if not isinstance(n, str):
        return False
    if view.op(n) == "cast":
        return _is_all_ones(view, view.operands(n)[0])
    return view.op(n) == "full" and view.attrs(n)["value"] in (1, True, 1.0)


def _band_from_triangle(view: GraphView, n: str, keep: bool) -> Band | None:
    if not _is_all_ones(view, view.operands(n)[0]):
        return None
    dims = _triangle_dims(view, n)
    if dims is None:
        return None
    rows, cols, diagonal = dims
    if view.op(n) == "tril":  # ones where j - i <= diagonal
        return Band(diagonal, rows, cols) if keep else None
    return Band(diagonal - 1, rows, cols) if not keep else None  # ones where j - i >= diagonal


def _tril_diagonal(buffer: torch.Tensor) -> int | None:
    """``d`` if every leading slice of ``buffer`` is ``tril(ones, d)`` (as bool), else None."""
    flat = buffer.reshape(-1, *buffer.shape[-2:]).bool()
    ones = torch.ones(buffer.shape[-2:], dtype=torch.bool, device=buffer.device)
    for d in (0, -1, 1):
        if bool((flat == torch.tril(ones, d)).all()):
            return d
    return None


def _band_from_compare(view: GraphView, n: str, keep: bool) -> Band | None:
    """``rows_pos CMP cols_pos`` with positions from broadcast ``arange``s, or a buffer == 0."""
    a, b = view.operands(n)
    cmp = view.attrs(n)["cmp"]
    zero = scalar_value(view, b)
    if cmp in ("eq", "ne") and zero == 0:
        # tril-ones buffer (or triangle) compared with 0: eq marks dropped pairs.
        return keep_band(view, a, keep if cmp == "ne" else not keep)
    pa, pb = _positions(view, a), _positions(view, b)
    if pa is None or pb is None:
        return None
    (axis_a, off_a, len_a), (axis_b, off_b, len_b) = pa, pb
    if (axis_a is None) != (axis_b is None):  # a single position lies along the other axis
        axis_a, axis_b = axis_a or -3 - axis_b, axis_b or -3 - axis_a
    if {axis_a, axis_b} != {-2, -1}:
        return None
    if axis_a == -1:  # normalise to rows CMP' cols
        (off_a, len_a), (off_b, len_b) = (off_b, len_b), (off_a, len_a)
        cmp = {"ge": "le", "gt": "lt", "le": "ge", "lt": "gt"}.get(cmp, cmp)
    # rows hold r_i = off_a + i, cols hold c_j = off_b + j.
    if cmp == "ge" and keep or cmp == "lt" and not keep:  # keep c_j <= r_i
        return Band(off_a - off_b, len_a, len_b)
    if cmp == "gt" and keep or cmp == "le" and not keep:  # keep c_j < r_i
        return Band(off_a - off_b - 1, len_a, len_b)
    return None


def _sliced_buffer_band(view: GraphView, n: str, keep: bool) -> Band | None:
    """Row/col slices ``[a:, b:]`` of ``tril(ones, d)`` keep ``j - i <= d + a - b``."""
    if not keep:
        return None
    shape = view.shape(n)
    starts = {-2: 0, -1: 0}
    cur: Operand = n
    while isinstance(cur, str) and view.op(cur) in ("slice", "identity"):
        if view.op(cur) == "slice":
            attrs = view.attrs(cur)
            rank = view.rank(cur)
            dim = attrs["dim"] - rank
            if attrs["step"] not in (1, None):
                return None
            if dim in (-2, -1):
                starts[dim] = attrs["start"] or 0
            elif attrs["start"] not in (None, 0):
                return None
        cur = view.operands(cur)[0]
    if not isinstance(cur, str) or view.op(cur) != "param" or shape is None or len(shape) < 2:
        return None
    buffer = view.attrs(cur)["value"]
    if not isinstance(buffer, torch.Tensor) or buffer.dim() < 2:
        return None
    diagonal = _tril_diagonal(buffer)
    if diagonal is None:
        return None
    return Band(diagonal + starts[-2] - starts[-1], shape[-2], shape[-1])


def _positions(view: GraphView, n: Operand) -> tuple | None:
    """``(axis, offset, length)`` when ``n`` is an arange laid along axis -2 or -1."""
    n = _skip_identity(view, n)
    shape = view.shape(n) if isinstance(n, str) else None
    if shape is None:
        return None
    laid_along = [i - len(shape) for i, s in enumerate(shape) if s != 1]
    if len(laid_along) > 1:
        return None
    axis_hint = laid_along[0] if laid_along else None  # one position (a decode step's query)
    shift = 0
    while isinstance(n, str) and view.op(n) in ("unsqueeze", "reshape", "slice", "add", "sub"):
        if view.op(n) in ("add", "sub"):
            moved = _shifted(view, n)
            if moved is None:
                return None
            n, delta = moved
            shift += delta
            continue
        if view.op(n) == "slice" and view.attrs(n)["start"] not in (None, 0):
            return None
        n = view.operands(n)[0]
    if not isinstance(n, str) or view.op(n) != "arange":
        return None
    attrs = view.attrs(n)
    if attrs["step"] != 1 or axis_hint not in (-2, -1, None):
        return None
    return axis_hint, attrs["start"] + shift, attrs["end"] - attrs["start"]


def _shifted(view: GraphView, n: str) -> tuple[str, Any] | None:
    """``(x, c)`` when ``n`` is ``x + c`` or ``x - c`` for a scalar ``c`` (an int, or the
    symbolic value of a Python int, as HF's ``arange(n) + past_length`` positions are)."""
    operands, scalars = view.operands(n), view.attrs(n).get("scalars", {})
    values = [
        scalars.get(i, o.value if isinstance(o, Const) and type(o.value) is int else None)
        for i, o in enumerate(operands)
    ]
    sign = -1 if view.op(n) == "sub" else 1
    if isinstance(operands[0], str) and values[0] is None and values[1] is not None:
        return operands[0], sign * values[1]
    if sign == 1 and isinstance(operands[1], str) and values[1] is None and values[0] is not None:
        return operands[1], values[0]
    return None
