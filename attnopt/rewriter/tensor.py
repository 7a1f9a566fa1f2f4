"""Recognise naive tensor (higher-order) attention around a softmax (ALGORITHMS.md §4).

Two spellings, one site of kind ``"tensor"``:

- einsum: ``S = einsum("…id,…jd,…ld->…ijl", q, k1, k2)`` (times a scale), viewed as
  ``(…, n, m1·m2)`` for one softmax over both key axes, viewed back, then
  ``einsum("…ijl,…je,…le->…ie", P, v1, v2)``;
- outer product: ``K = (k1[…, :, None, :] * k2[…, None, :, :]).flatten(-3, -2)`` and ``V``
  alike from ``v1, v2``, then ``softmax(s·q Kᵀ) V``, which is tensor attention with the pair
  index flattened (the standard detector would see a site over ``m1·m2`` keys).

``tensor_site`` returns None when the softmax is not fed by either form, so every other softmax
goes to the standard detector exactly as before; it raises ``_Miss`` when it is but a rule
breaks (weights used elsewhere, a mask, a layout it does not know).
"""

from __future__ import annotations

import sympy

from attnopt.rewriter.canonicalize import TracedOperand, keep_band, scalar_value, trace_operand
from attnopt.rewriter.detect import (
    _CAST_OPS,
    _WEIGHTS_KEPT,
    _check_region,
    _lead,
    _Miss,
    _scalar_and_other,
    _skip_full_slices,
)
from attnopt.rewriter.graph import GraphView
from attnopt.rewriter.site import AttentionSite


def _equal(view: GraphView, a, b) -> bool:
    """Sizes provably equal; export writes the pair axis of an einsum as ``(m·m)//m``, so exact
    floor divisions are divided out first."""
    if a == b or view.same_size(a, b):
        return True
    return view.same_size(_exact_division(a), _exact_division(b))


def _exact_division(size):
    if not isinstance(size, sympy.Expr):
        return size

    def exact(e) -> bool:
        if type(e).__name__ != "FloorDiv":
            return False
        _, remainder = sympy.div(*e.args)
        return remainder == 0

    return size.replace(exact, lambda e: sympy.div(*e.args)[0])


def _einsum(view: GraphView, n: str, arity: int) -> tuple[list[str], str] | None:
    """Operands and equation of an ``arity``-operand einsum node, else None."""
    if view.op(n) != "opaque" or view.attrs(n).get("name") != "einsum":
        return None
    operands, equation = view.operands(n), view.attrs(n).get("equation")
    if equation is None or len(operands) != arity or not all(isinstance(o, str) for o in operands):
        return None
    return list(operands), equation


def _scores_equation(equation: str) -> bool:
    """``…id,…jd,…ld->…ijl``: one contracted letter last in each, the same batch letters."""
    if "->" not in equation or "..." in equation:
        return False
    inputs, out = equation.split("->")
    parts = inputs.split(",")
    if len(parts) != 3 or any(len(p) < 2 for p in parts):
        return False
    a, b, c = parts
    batch, d = a[:-2], a[-1]
    free = a[-2] + b[-2] + c[-2]
    return (
        b[:-2] == batch == c[:-2]
        and b[-1] == d == c[-1]
        and len(set(batch + free + d)) == len(batch) + 4
        and out == batch + free
    )


def _values_equation(equation: str) -> bool:
    """``…ijl,…je,…le->…ie``."""
    if "->" not in equation or "..." in equation:
        return False
    inputs, out = equation.split("->")
    parts = inputs.split(",")
    if len(parts) != 3 or len(parts[0]) < 3 or any(len(p) < 2 for p in parts[1:]):
        return False
    p, v1, v2 = parts
    batch, (i, j, l) = p[:-3], p[-3:]  # noqa: E741
    e = v1[-1]
    return (
        v1 == batch + j + e
        and v2 == batch + l + e
        and out == batch + i + e
        and len(set(batch + i + j + l + e)) == len(batch) + 4
    )


def _outer(view: GraphView, n: str) -> tuple[str, str, list[str]] | None:
    """``(a, b, nodes)`` when ``n`` is ``(a[…, :, None, :] * b[…, None, :, :])`` flattened over
    the pair axes (a's index outer), else None. ``nodes``: the product and its view."""
    if view.op(n) != "reshape" or not isinstance(view.operands(n)[0], str):
        return None
    product = view.operands(n)[0]
    flat, full = view.shape(n), view.shape(product)
    if view.op(product) != "mul" or flat is None or full is None or len(full) < 4:
        return None
    if len(flat) != len(full) - 1 or not _equal(view, flat[-2], full[-3] * full[-2]):
        return None
    factors = {}
    for operand in view.operands(product):
        unsq = _skip_full_slices(view, operand)
        if unsq is None or view.op(unsq) != "unsqueeze":
            return None
        axis = view.attrs(unsq)["dim"] - len(full)  # negative: -2 outer, -3 inner
        source = _skip_full_slices(view, view.operands(unsq)[0])
        if source is None or axis not in (-2, -3) or axis in factors:
            return None
        factors[axis] = source
    if set(factors) != {-2, -3}:
        return None
    return factors[-2], factors[-3], [product, n]


def _traced(view: GraphView, n: str, allow_scale: bool = True) -> TracedOperand:
    """Scalar factors of q and keys move onto the scores; the values' stay in the graph."""
    traced = trace_operand(view, n, allow_scale=allow_scale)
    if not view.is_real(traced.source):
        raise _Miss("an input of the tensor attention is an intermediate of a fused op", n)
    return traced


def tensor_site(view: GraphView, softmax: str) -> AttentionSite | None:
    """The tensor-attention site around ``softmax``, None if it is not one (see module doc)."""
    rank = view.rank(softmax)
    if rank is None or view.attrs(softmax)["axis"] != rank - 1:
        return None
    cur = view.operands(softmax)[0]
    chain, scale, causal = [], 1.0, False
    flat_view = None  # the reshape (…, n, m1, m2) -> (…, n, m1·m2) of the einsum form
    while isinstance(cur, str):
        op = view.op(cur)
        if op in _CAST_OPS:
            chain.append(cur)
            cur = view.operands(cur)[0]
        elif op == "mul":
            factor, other = _scalar_and_other(view, view.operands(cur))
            if factor is None:
                return None
            scale *= factor
            chain.append(cur)
            cur = other
        elif op == "where" and not causal:
            cur = _pair_causal(view, cur)
            if cur is None:
                return None
            causal = True
            chain.append(cur[1])
            cur = cur[0]
        elif op == "reshape" and flat_view is None and not chain:
            flat_view = cur
            chain.append(cur)
            cur = view.operands(cur)[0]
        else:
            break
    if not isinstance(cur, str):
        return None
    einsum = _einsum(view, cur, 3)
    if einsum is not None and _scores_equation(einsum[1]) and flat_view is not None:
        site = _einsum_form(view, softmax, cur, einsum[0], flat_view, chain, scale)
        site.causal = causal
        same = _equal(view, site.q_len, site.kv_len) and _equal(view, site.kv_len, site.pair_len)
        if causal and not same:
            raise _Miss("a causal pair mask with other key lengths than query length", softmax)
        return site
    if view.op(cur) == "matmul" and flat_view is None and not causal:
        q, kt = view.operands(cur)
        if isinstance(kt, str) and view.op(kt) == "transpose":
            perm = tuple(view.attrs(kt).get("perm") or ())
            keys = _outer(view, view.operands(kt)[0]) if isinstance(q, str) else None
            swaps_last = len(perm) >= 2 and perm[-2:] == (len(perm) - 1, len(perm) - 2)
            if keys is not None and swaps_last and perm[:-2] == tuple(range(len(perm) - 2)):
                return _outer_form(view, softmax, cur, q, keys, [*chain, kt], scale)
    return None


def _pair_causal(view: GraphView, where: str) -> tuple[str, str] | None:
    """``(scores, where)`` when ``where`` fills -inf outside ``keep[:, :, None] & keep[:, None,
    :]`` for the causal triangle ``keep`` of queries × keys (``masked_fill`` of its negation
    too), else None."""
    cond, a, b = view.operands(where)
    if _is_neg_inf(scalar_value(view, b)) and isinstance(a, str):
        scores, keep = a, True
    elif _is_neg_inf(scalar_value(view, a)) and isinstance(b, str):
        scores, keep = b, False
    else:
        return None
    while isinstance(cond, str) and view.op(cond) == "not":
        cond, keep = view.operands(cond)[0], not keep
    if not keep or not isinstance(cond, str) or not _is_and(view, cond):
        return None
    axes = {}
    for operand in view.operands(cond):
        unsq = _skip_full_slices(view, operand)
        if unsq is None or view.op(unsq) != "unsqueeze":
            return None
        rank = view.rank(unsq)
        axis = view.attrs(unsq)["dim"] - (rank or 0)
        inner = _skip_full_slices(view, view.operands(unsq)[0])
        band = keep_band(view, inner, True) if inner is not None else None
        if band is None or axis not in (-1, -2) or axis in axes:
            return None
        if not _equal(view, band.offset, band.cols - band.rows):
            return None
        axes[axis] = band
    return (scores, where) if set(axes) == {-1, -2} else None


def _is_and(view: GraphView, n: str) -> bool:
    """``&`` of two bool tensors (export keeps ``Tensor.__and__`` as an opaque call)."""
    op = view.op(n)
    return op == "and" or (op == "opaque" and view.attrs(n).get("name") == "__and__")


def _is_neg_inf(value: float | None) -> bool:
    return value is not None and value <= -1e38


def _only_user(view: GraphView, n: str) -> str:
    users = view.users(n)
    if len(users) != 1:
        raise _Miss(_WEIGHTS_KEPT.format(how="also returned or used elsewhere"), n)
    if view.op(users[0]) == "output":
        raise _Miss(_WEIGHTS_KEPT.format(how="returned by the model"), n)
    return users[0]


def _einsum_form(view, softmax, scores, operands, flat_view, chain, scale) -> AttentionSite:
    full = view.shape(scores)
    full = None if full is None else tuple(_exact_division(size) for size in full)
    flat = view.shape(flat_view)
    if flat is None or full is None or len(flat) != len(full) - 1:
        raise _Miss("the pair scores are not viewed as (…, n, m1·m2) for the softmax", flat_view)
    if not _equal(view, flat[-1], full[-2] * full[-1]):
        raise _Miss("the softmax is not over both key axes together", flat_view)
    back = _only_user(view, softmax)
    while view.op(back) in _CAST_OPS:
        chain.append(back)
        back = _only_user(view, back)
    back_shape = view.shape(back)
    if view.op(back) != "reshape" or back_shape is None or len(back_shape) != len(full):
        raise _Miss("the pair probabilities are not viewed back as (…, n, m1, m2)", back)
    if not all(_equal(view, a, b) for a, b in zip(back_shape, full, strict=True)):
        raise _Miss("the pair probabilities are viewed back in another shape", back)
    pv = _only_user(view, back)
    values = _einsum(view, pv, 3)
    if values is None or not _values_equation(values[1]) or values[0][0] != back:
        raise _Miss("the pair probabilities are not contracted with two value sets", pv)
    q, k1, k2 = (_traced(view, o) for o in operands)
    v1, v2 = (_traced(view, o, allow_scale=False) for o in values[0][1:])
    region = [scores, *chain, softmax, back, pv]
    return _site(view, softmax, pv, region, (q, k1, k2, v1, v2), scale, full)


def _outer_form(view, softmax, scores, q_node, keys, chain, scale) -> AttentionSite:
    pv = _only_user(view, softmax)
    while view.op(pv) in _CAST_OPS:
        chain.append(pv)
        pv = _only_user(view, pv)
    v_node = view.operands(pv)[1] if view.op(pv) == "matmul" else None
    values = _outer(view, v_node) if isinstance(v_node, str) else None
    if values is None or view.operands(pv)[0] == v_node:
        raise _Miss("the pair probabilities are not contracted with an outer product of values", pv)
    k1, k2, _ = keys
    v1, v2, _ = values
    q = _traced(view, q_node)
    pair = view.shape(keys[2][0])  # the product (…, m1, m2, d)
    full = (*view.shape(scores)[:-1], pair[-3], pair[-2])
    region = [scores, *chain, softmax, pv]
    traced = (q, _traced(view, k1), _traced(view, k2), *(_traced(view, o, False) for o in (v1, v2)))
    return _site(view, softmax, pv, region, traced, scale, full)


def _site(view, softmax, pv, region, operands, scale, full) -> AttentionSite:
    if not view.is_real(pv):
        raise _Miss("the value contraction is an intermediate of a fused op", pv)
    _check_region(view, region, pv, None)
    q, k1, k2, v1, v2 = operands
    return AttentionSite(
        location=view.location(softmax),
        q=TracedOperand(q.source, q.perm),
        k=TracedOperand(k1.source, k1.perm),
        v=TracedOperand(v1.source, v1.perm),
        scale=scale * q.scale * k1.scale * k2.scale,
        output=pv,
        nodes=region,
        scores_shape=tuple(full[:-1]),
        q_shape=view.shape(q.source) if q.perm is None else _permuted(view, q),
        v_shape=view.shape(pv),
        dtype=view.dtype(q.source),
        output_dtype=view.dtype(pv),
        k_shape_lead=_lead(view, k1),
        is_cross=not view.same_size(full[-3], full[-2]),
        kind="tensor",
        k2=TracedOperand(k2.source, k2.perm),
        v2=TracedOperand(v2.source, v2.perm),
        pair_len=full[-1],
    )


def _permuted(view: GraphView, operand: TracedOperand) -> tuple:
    shape = view.shape(operand.source)
    return tuple(shape[i] for i in operand.perm)
