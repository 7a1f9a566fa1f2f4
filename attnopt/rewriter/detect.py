"""Find attention sites in a canonical GraphView.

Anchor on each softmax over the last axis; walk back through casts, scales and masks to a
matmul ``Q·Kᵀ``; walk forward through casts and dropout to the matmul ``P·V``; then prove the
region can be replaced. Existing ``scaled_dot_product_attention`` calls are sites as they are.
A region that breaks a rule is a ``NearMiss`` naming the first rule it broke.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from attnopt.rewriter.canonicalize import (
    PASSTHROUGH,
    TracedOperand,
    additive_band,
    keep_band,
    scalar_value,
    trace_operand,
)
from attnopt.rewriter.graph import Const, GraphView, Operand
from attnopt.rewriter.site import AttentionSite, MaskTerm, NearMiss

_CAST_OPS = {"cast"} | PASSTHROUGH
_WEIGHTS_KEPT = (
    "the attention weights (the softmax output) are {how}, e.g. with output_attentions=True; "
    "a fused kernel never builds them, so this attention is left as it is. Run without "
    "returning the weights (output_attentions=False) to have it rewritten"
)
_INT_DTYPES = ("int", "uint", "bool")


class _Miss(Exception):
    def __init__(self, rule: str, node: str) -> None:
        super().__init__(rule)
        self.rule, self.node = rule, node


@dataclass
class Detection:
    sites: list[AttentionSite] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)


def detect(view: GraphView) -> Detection:
    """Every attention site of the view, and the near misses."""
    found = Detection()
    anchors = [(n, _site_around_softmax) for n in view.nodes("softmax")]
    anchors += [(n, _site_from_sdpa) for n in view.nodes("sdpa")]
    anchors += [(n, _unexponentiated) for n in view.nodes("log_softmax")]
    for node, build in anchors:
        try:
            found.sites.append(build(view, node))
        except _Miss as miss:
            found.near_misses.append(NearMiss(view.location(node), miss.rule, miss.node))
    return found


def _site_around_softmax(view: GraphView, softmax: str) -> AttentionSite:
    """Tensor attention over key pairs when its own recogniser claims the softmax (it returns
    None for every other softmax), standard attention otherwise."""
    from attnopt.rewriter.tensor import tensor_site  # it builds on this module's helpers

    site = tensor_site(view, softmax)
    return site if site is not None else _site_from_softmax(view, softmax)


def _unexponentiated(view: GraphView, node: str) -> AttentionSite:
    """A ``log_softmax`` that canonicalization did not fold into ``softmax`` (no ``exp``)."""
    raise _Miss("log_softmax used as it is (not exponentiated): its rows are not weights", node)


# -- decomposed attention ------------------------------------------------------------------
@dataclass
class _Scores:
    """What the backward walk from softmax learned about the scores."""

    matmul: str
    scale: float = 1.0
    masks: list[MaskTerm] = field(default_factory=list)
    fill: float = -math.inf
    nodes: list[str] = field(default_factory=list)
    #: the one view of 3-D (b·h, n, m) scores to the layout the rest of the site has (no view
    #: back): q and k are then read before their own views to (b·h, ·, d)
    viewed: str | None = None


def _site_from_softmax(view: GraphView, softmax: str) -> AttentionSite:
    rank = view.rank(softmax)
    axis = view.attrs(softmax)["axis"]
    if rank is None or rank < 2:
        raise _Miss("softmax input has unknown rank", softmax)
    if axis != rank - 1:
        raise _Miss(f"softmax over axis {axis} of {rank}, not the key axis (last)", softmax)
    region = [softmax, *view.attrs(softmax).get("absorbed", ())]
    views_after: list[str] = []
    pv, dropout_p = _walk_to_pv(view, softmax, region, views_after)
    scores = _walk_to_qk(view, view.operands(softmax)[0], views_after, view.operands(pv)[0])
    region += scores.nodes
    q, k = _split_qk(view, scores.matmul)
    scores_shape = view.shape(scores.matmul)
    q_shape = view.shape(view.operands(scores.matmul)[0])
    if scores.viewed is not None:
        q, k = _before_head_merge(view, q, k, scores.viewed)
        scores_shape, q_shape = view.shape(scores.viewed), view.shape(q.source)
    v = trace_operand(view, _node(view.operands(pv)[1], pv), allow_scale=False)
    output, output_perm = _site_output(view, pv)
    region += [pv] if output == pv else [pv, output]
    shape_reads = _check_region(view, region, output, scores_shape)
    k, v, group = _strip_kv_repeat(view, k, v)
    site = AttentionSite(
        location=view.location(softmax),
        q=q,
        k=k,
        v=v,
        scale=scores.scale * q.scale * k.scale,
        output=output,
        nodes=region,
        scores_shape=scores_shape,
        q_shape=q_shape,
        v_shape=view.shape(view.operands(pv)[1]),
        dtype=view.dtype(view.operands(scores.matmul)[0]),
        output_dtype=view.dtype(output),
        masks=scores.masks,
        fill=scores.fill,
        kv_group=group,
        dropout_p=dropout_p,
        output_perm=output_perm,
        k_shape_lead=_lead(view, k),
        shape_reads=shape_reads,
    )
    site.q = TracedOperand(q.source, q.perm)
    site.k = TracedOperand(k.source, k.perm)
    _classify_masks(view, site)
    site.is_cross = not view.same_size(site.q_len, site.kv_len)
    site.prefix_len = _prefix_len(view, site.k, site.v)
    return site


def _node(operand: Operand, user: str) -> str:
    if not isinstance(operand, str):
        raise _Miss("a matmul operand is a constant", user)
    return operand


def _walk_to_pv(
    view: GraphView, softmax: str, region: list[str], views: list[str]
) -> tuple[str, float]:
    """Follow the probabilities through casts, dropout and views that keep the last two axes
    (collected in ``views``) to the ``P·V`` matmul."""
    cur, dropout_p = softmax, 0.0
    while True:
        users = view.users(cur)
        if len(users) != 1:
            raise _Miss(_WEIGHTS_KEPT.format(how="also returned or used elsewhere"), cur)
        user = users[0]
        op = view.op(user)
        if op in _CAST_OPS:
            region.append(user)
        elif op == "dropout":
            attrs = view.attrs(user)
            if attrs["train"] and attrs["p"] > 0:
                raise _Miss(
                    f"dropout p={attrs['p']} is active (training mode): call model.eval()", user
                )
            dropout_p = attrs["p"] if attrs["train"] else 0.0
            region.append(user)
        elif op == "reshape" and _keeps_last_two(view, user):
            region.append(user)
            views.append(user)
        elif op == "matmul" and view.operands(user)[0] == cur:
            return user, dropout_p
        elif op == "output":
            raise _Miss(_WEIGHTS_KEPT.format(how="returned by the model"), cur)
        else:
            raise _Miss(f"non-linear op '{_name(view, user)}' between softmax and P·V", user)
        cur = user


def _name(view: GraphView, n: str) -> str:
    return view.attrs(n).get("name", view.op(n))


def _walk_to_qk(view: GraphView, start: Operand, views_after: list[str], probs: Operand) -> _Scores:
    """Walk back from the softmax input to ``Q·Kᵀ``, collecting scale, masks and fill."""
    cur = _node(start, "softmax")
    scores: _Scores | None = None
    chain_scale, masks, nodes = 1.0, [], []
    fill: float | None = None  # the value masked-out scores take, once a where is seen
    reshapes: list[str] = []  # views of the scores walked through, softmax side first
    depths: list[int] = []  # how many of them lie between each mask and the softmax
    while scores is None:
        op = view.op(cur)
        nodes.append(cur)
        operands = view.operands(cur)
        if op in _CAST_OPS:
            cur = _node(operands[0], cur)
        elif op == "mul":
            factor, other = _scalar_and_other(view, operands)
            if factor is None:
                raise _Miss("scores multiplied by a tensor (non-scalar or per-head scale)", cur)
            chain_scale *= factor
            cur = other
        elif op == "div":
            raise _Miss("scores divided by a tensor (non-scalar scale)", cur)
        elif op in ("add", "sub"):
            chain, term = _chain_and_term(view, cur, operands)
            sign = -1.0 if op == "sub" else 1.0
            _check_additive(view, term, cur)
            traced = trace_operand(view, _unexpanded(view, term, nodes), allow_scale=True)
            masks.append(MaskTerm(traced, "additive", sign * chain_scale * traced.scale))
            depths.append(len(reshapes))
            cur = chain
        elif op == "where":
            cur, term, value = _where_parts(view, cur, operands, nodes)
            value = -math.inf if value * chain_scale <= -1e38 else value * chain_scale
            if any(t.kind == "additive" for t in masks) and not math.isinf(value):
                raise _Miss("a finite masked_fill value followed by an additive mask", cur)
            if fill is not None and value != fill:
                raise _Miss("two boolean masks with different fill values", cur)
            fill = value
            masks.append(term)
            depths.append(len(reshapes))
        elif op == "reshape" and _keeps_last_two(view, cur):
            reshapes.append(cur)
            cur = _node(operands[0], cur)
        elif op == "matmul":
            fill = -math.inf if fill is None else fill
            if len(reshapes) == 1 and not views_after:
                if any(depths):
                    raise _Miss("a mask applied before the only view of the scores", reshapes[0])
                return _Scores(cur, chain_scale, masks, fill, nodes, viewed=reshapes[0])
            masks = _relayout(view, cur, probs, masks, depths, reshapes, views_after)
            scores = _Scores(cur, chain_scale, masks, fill, nodes)
        else:
            raise _Miss(f"'{_name(view, cur)}' between Q·Kᵀ and softmax", cur)
    return scores


def _before_head_merge(
    view: GraphView, q: TracedOperand, k: TracedOperand, viewed: str
) -> tuple[TracedOperand, TracedOperand]:
    """Q and K as they were before being merged to (b·h, ·, d), when the (b·h, n, m) scores are
    viewed back to those very leading dims: the product is then the product of the originals."""
    there = view.shape(viewed)
    found = []
    for traced, length in ((q, -2), (k, -1)):
        merged = traced.source
        x = view.operands(merged)[0] if view.op(merged) == "reshape" else None
        shape, merged_shape = view.shape(x), view.shape(merged)
        if (
            traced.perm is not None
            or shape is None
            or merged_shape is None
            or there is None
            or len(shape) != len(there)
            or not all(map(view.same_size, shape[:-2], there[:-2]))
            or not view.same_size(shape[-2], there[length])
            or not view.same_size(shape[-1], merged_shape[-1])
        ):
            raise _Miss("scores reshaped between Q·Kᵀ and softmax", viewed)
        found.append(TracedOperand(x, None, traced.scale, [*traced.path, merged]))
    return found[0], found[1]


def _keeps_last_two(view: GraphView, n: str) -> bool:
    out, src = view.shape(n), view.shape(view.operands(n)[0])
    if out is None or src is None or len(out) < 2 or len(src) < 2:
        return False
    return view.same_size(out[-1], src[-1]) and view.same_size(out[-2], src[-2])


def _relayout(
    view: GraphView,
    matmul: str,
    probs: Operand,
    masks: list,
    depths: list,
    reshapes: list,
    views_after: list,
) -> list[MaskTerm]:
    """Scores viewed as (B, H, N, M) for the mask and back to (B·H, N, M): back before the
    softmax (OPT/BART) or after it, on the probabilities (Bloom, Falcon). Masks applied in the
    other layout are expanded and reshaped to the scores' own layout."""
    if not reshapes and not views_after:
        return masks
    if len(reshapes) + len(views_after) != 2:
        raise _Miss("scores reshaped between Q·Kᵀ and softmax", (reshapes or views_after)[0])
    if views_after:  # (there, softmax, back): masks nearer the softmax than ``there`` move
        back, there, inside = views_after[0], reshapes[0], 0
    else:
        back, there, inside = reshapes[0], reshapes[1], 1
    same = view.shape(matmul), view.shape(probs)
    if (
        same[0] is None
        or same[1] is None
        or len(same[0]) != len(same[1])
        or not all(view.same_size(a, b) for a, b in zip(same[0][1:], same[1][1:], strict=True))
        or not (view.same_size(same[0][0], same[1][0]) or _keeps_numel(view, back, there))
    ):
        raise _Miss("scores reshaped between Q·Kᵀ and softmax", there)
    moved = [term for term, depth in zip(masks, depths, strict=True) if depth == inside]
    for term in moved:
        _check_expandable(view, there, term)
    return [replace(term, relayout=(there, back)) if term in moved else term for term in masks]


def _check_expandable(view: GraphView, there: str, term: MaskTerm) -> None:
    """The mask is expanded to the sizes ``there`` spells out; a -1 among them keeps the mask's
    own size, right only where that already is the scores' size."""
    sizes, shape = view.operands(there)[1:], view.shape(there)
    mask_shape = view.shape(term.operand.source) if term.operand.perm is None else None
    if not sizes or shape is None:
        raise _Miss("scores reshaped to sizes the graph does not spell out", there)
    for i, size in enumerate(sizes):
        if not (isinstance(size, Const) and size.value == -1):
            continue
        j = i - len(sizes) + len(mask_shape or ())
        if mask_shape is None or j < 0 or not _equal_size(view, mask_shape[j], shape[i]):
            raise _Miss("scores reshaped with inferred (-1) sizes around a mask", there)


def _equal_size(view: GraphView, a, b) -> bool:
    return a == b or view.same_size(a, b)


def _keeps_numel(view: GraphView, back: str, there: str) -> bool:
    """The ops between the two views left the scores' shape as it was (a mask broadcast into
    them, not them into it), so viewing back gives the scores' element count: the first dim
    then agrees even when it is an expression sympy cannot simplify (Swin's
    ``(b // nw) * nw``)."""
    return view.shape(view.operands(back)[0]) == view.shape(there)


def _scalar_and_other(view: GraphView, operands: list[Operand]) -> tuple[float | None, str]:
    a, b = operands
    if isinstance(a, str) and scalar_value(view, b) is not None:
        return scalar_value(view, b), a
    if isinstance(b, str) and scalar_value(view, a) is not None:
        return scalar_value(view, a), b
    return None, a if isinstance(a, str) else b


def _reaches_matmul(view: GraphView, n: Operand, depth: int = 0) -> bool:
    """Whether ``n`` is on the scores chain: it leads back to a matmul through chain ops."""
    if not isinstance(n, str) or depth > 32:
        return False
    op = view.op(n)
    if op == "matmul":
        return True
    if op in _CAST_OPS | {"mul", "div", "reshape"}:
        return any(_reaches_matmul(view, o, depth + 1) for o in view.operands(n)[:1]) or (
            op == "mul" and _reaches_matmul(view, view.operands(n)[1], depth + 1)
        )
    if op in ("add", "sub"):
        return any(_reaches_matmul(view, o, depth + 1) for o in view.operands(n))
    if op == "where":
        return any(_reaches_matmul(view, o, depth + 1) for o in view.operands(n)[1:])
    return False


def _chain_and_term(view: GraphView, node: str, operands: list[Operand]) -> tuple[str, str]:
    a, b = operands
    on_a, on_b = _reaches_matmul(view, a), _reaches_matmul(view, b)
    if on_a and not on_b:
        return a, _node(b, node)
    if on_b and not on_a and view.op(node) == "add":
        return b, _node(a, node)
    raise _Miss("cannot tell the scores from the mask in an add", node)


def _check_additive(view: GraphView, term: str, node: str) -> None:
    dtype = view.dtype(term)
    if dtype is not None and dtype.startswith(_INT_DTYPES):
        raise _Miss(f"integer mask ({dtype}) added to the scores", node)


def _unexpanded(view: GraphView, n: str, region: list[str]) -> str:
    """A mask before its ``expand``s (the op broadcasts masks). An ``expand_as(mask, scores)``
    reads the scores for their shape only: it joins the region, so it goes with it."""
    while view.op(n) == "expand" and isinstance(view.operands(n)[0], str):
        if len(view.operands(n)) > 1:
            region.append(n)
        elif len(view.users(n)) > 1:
            break
        n = view.operands(n)[0]
    return n


def _where_parts(view: GraphView, node: str, operands: list[Operand], region: list) -> tuple:
    """``where(cond, x, fill)`` keeps cond; ``where(cond, fill, x)`` (masked_fill) drops it."""
    cond, a, b = operands
    dtype = view.dtype(cond)
    if dtype is not None and dtype != "bool":
        raise _Miss(f"integer mask ({dtype}) used as a condition", node)
    cond_traced = trace_operand(
        view, _unexpanded(view, _node(cond, node), region), allow_scale=False
    )
    va, vb = scalar_value(view, a), scalar_value(view, b)
    if vb is not None and isinstance(a, str) and _reaches_matmul(view, a):
        return a, MaskTerm(cond_traced, "keep"), vb
    if va is not None and isinstance(b, str) and _reaches_matmul(view, b):
        return b, MaskTerm(cond_traced, "drop"), va
    raise _Miss("where/masked_fill with a tensor fill value", node)


def _split_qk(view: GraphView, matmul: str) -> tuple[TracedOperand, TracedOperand]:
    """Q and K (not Kᵀ) of the scores matmul; K's permutation must mirror Q's."""
    a, b = (_node(o, matmul) for o in view.operands(matmul))
    q = trace_operand(view, a, allow_scale=True)
    kt = trace_operand(view, b, allow_scale=True)
    rank_a, rank_b = view.rank(a), view.rank(b)
    if rank_a is None or rank_b is None or rank_a < 2 or rank_b < 2:
        raise _Miss("Q·Kᵀ operands of unknown rank", matmul)
    kt_perm = kt.perm or tuple(range(rank_b))
    k_perm = (*kt_perm[:-2], kt_perm[-1], kt_perm[-2])
    q_perm = q.perm or tuple(range(rank_a))
    # Both contract over their source's last axis (the head dim every projection puts last);
    # a permutation that moves another axis there mixes heads, batch or positions into it.
    if k_perm[-1] != rank_b - 1 or q_perm[-1] != rank_a - 1:
        raise _Miss(
            f"the key operand is not K with its last two axes swapped (permutation {kt_perm})",
            matmul,
        )
    identity_k = k_perm == tuple(range(rank_b))
    for traced in (q, kt):
        if not view.is_real(traced.source):
            raise _Miss("Q or K is an intermediate of a fused op", matmul)
    k = TracedOperand(kt.source, None if identity_k else k_perm, kt.scale, kt.path)
    return q, k


def _site_output(view: GraphView, pv: str) -> tuple[str, tuple | None]:
    """The graph value the site produces (an einsum's output permute included)."""
    if view.is_real(pv):
        return pv, None
    users = view.users(pv)
    if len(users) == 1 and view.op(users[0]) == "transpose" and view.is_real(users[0]):
        return users[0], view.attrs(users[0])["perm"]
    raise _Miss("P·V is an intermediate of a fused op", pv)


def _check_region(
    view: GraphView, region: list[str], output: str, scores_shape: tuple | None
) -> list[str]:
    """No value inside the region may be used outside it (only the output leaves), except by
    ``shape`` nodes reading a value of the scores' shape (``expand_as(scores)`` in ONNX): the
    front end recomputes those from q and k. Returns them."""
    inside, shape_reads = set(region), []
    for n in region:
        if n == output:
            continue
        outside = [u for u in view.users(n) if u not in inside]
        shape_reads += [u for u in outside if _reads_scores_shape(view, u, n, scores_shape)]
        outside = [u for u in outside if u not in shape_reads]
        if outside:
            raise _Miss(
                f"intermediate '{n}' is also used by '{outside[0]}' outside the attention", n
            )
    return shape_reads


def _reads_scores_shape(view: GraphView, user: str, n: str, scores_shape: tuple | None) -> bool:
    shape = view.shape(n)
    return (
        view.op(user) == "shape"
        and scores_shape is not None
        and shape is not None
        and len(shape) == len(scores_shape)
        and all(map(view.same_size, shape, scores_shape))
    )


def _lead(view: GraphView, operand: TracedOperand) -> tuple:
    shape = view.shape(operand.source)
    if shape is None:
        return ()
    if operand.perm is not None:
        shape = tuple(shape[i] for i in operand.perm)
    return tuple(shape[:-2])


def _strip_kv_repeat(
    view: GraphView, k: TracedOperand, v: TracedOperand
) -> tuple[TracedOperand, TracedOperand, int]:
    """Look through GQA/MQA repeats of K and V (same ratio on both) so they are not copied."""
    if k.perm is not None or v.perm is not None:
        return k, v, 1
    inner_k, inner_v = _repeat_source(view, k.source), _repeat_source(view, v.source)
    if inner_k is None or inner_v is None or inner_k[1] != inner_v[1]:
        return k, v, 1
    return (
        TracedOperand(inner_k[0], None, k.scale, k.path),
        TracedOperand(inner_v[0], None, v.scale, v.path),
        inner_k[1],
    )


def _repeat_source(view: GraphView, n: str) -> tuple[str, int] | None:
    """``(x, g)`` when ``n`` repeats the head axis (-3) of ``x`` ``g`` times, interleaved."""
    shape = view.shape(n)
    if shape is None or len(shape) < 3:
        return None
    op = view.op(n)
    if op == "repeat_interleave":
        attrs = view.attrs(n)
        if attrs["dim"] == len(shape) - 3 and isinstance(attrs["repeats"], int):
            return _real_or_none(view, view.operands(n)[0], attrs["repeats"])
        return None
    if op != "reshape":
        return None
    expanded = view.operands(n)[0]
    if not isinstance(expanded, str) or view.op(expanded) != "expand":
        return None
    e_shape = view.shape(expanded)
    unsq = _skip_full_slices(view, view.operands(expanded)[0])
    if e_shape is None or len(e_shape) != len(shape) + 1 or unsq is None:
        return None
    if view.op(unsq) != "unsqueeze" or view.attrs(unsq)["dim"] != len(shape) - 2:
        return None
    group = e_shape[-3]
    if not isinstance(group, int) or not view.same_size(shape[-3], e_shape[-4] * group):
        return None
    return _real_or_none(view, view.operands(unsq)[0], group)


def _skip_full_slices(view: GraphView, n: Operand) -> str | None:
    while isinstance(n, str) and view.op(n) == "slice":
        attrs = view.attrs(n)
        if attrs["start"] not in (None, 0) or attrs["step"] not in (None, 1):
            return None
        if attrs["end"] is not None and not (
            isinstance(attrs["end"], int) and attrs["end"] >= 2**62
        ):
            return None
        n = view.operands(n)[0]
    return n if isinstance(n, str) else None


def _real_or_none(view: GraphView, n: Operand, group: int) -> tuple[str, int] | None:
    return (n, group) if isinstance(n, str) and view.is_real(n) and group > 1 else None


def _classify_masks(view: GraphView, site: AttentionSite) -> None:
    """Masks that are exactly the causal triangle become the ``causal`` flag; ``drop`` masks are
    negated into ``keep`` masks by the rewrite."""
    rows, cols = site.q_len, site.kv_len
    remaining = []
    for term in site.masks:
        band = _band(view, term)
        if (
            band is not None
            and view.same_size(band.rows, rows)
            and view.same_size(band.cols, cols)
            and view.same_size(band.offset, cols - rows)
            and (term.kind != "additive" or term.multiplier > 0)
        ):
            site.causal = True
            continue
        remaining.append(term)
    site.masks = remaining
    if site.causal and not remaining:
        site.fill = -math.inf


def _band(view: GraphView, term: MaskTerm):
    if term.operand.perm is not None:
        return None
    if term.kind == "additive":
        return additive_band(view, term.operand.source)
    return keep_band(view, term.operand.source, keep=term.kind == "keep")


# -- input-independent prefixes ------------------------------------------------------------
_SIZE_OPS = ("sym_size", "size", "sym_numel", "sym_stride")  # read an input's shape, not values


def _prefix_len(view: GraphView, k: TracedOperand, v: TracedOperand) -> int | None:
    """``p`` when K and V are ``[P_K; K']`` and ``[P_V; V']`` joined along the key axis, with a
    static ``p``-token prefix computed from no model input (parameters, buffers, constants)."""
    lengths = {_prefix_of(view, traced) for traced in (k, v)}
    length = lengths.pop()
    return length if not lengths else None


def _prefix_of(view: GraphView, traced: TracedOperand) -> int | None:
    n, rank = traced.source, view.rank(traced.source)
    if view.op(n) != "concat" or rank is None or len(view.operands(n)) != 2:
        return None
    key_axis = traced.perm[-2] if traced.perm is not None else rank - 2
    prefix = view.operands(n)[0]
    shape = view.shape(prefix)
    if not isinstance(prefix, str) or shape is None or len(shape) != rank:
        return None  # (an empty 1-D tensor joined to the keys: a fresh HF cache)
    if view.attrs(n)["axis"] != key_axis:
        return None
    length = shape[key_axis]
    if not isinstance(length, int) or length <= 0 or _reads_input(view, prefix):
        return None
    return length


def _reads_input(view: GraphView, n: str) -> bool:
    """Whether a model input's values flow into ``n`` (its sizes alone do not count)."""
    seen, stack = set(), [n]
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if view.op(cur) == "input":
            return True
        if view.op(cur) == "opaque" and view.attrs(cur).get("name") in _SIZE_OPS:
            continue
        stack += [o for o in view.operands(cur) if isinstance(o, str)]
    return False


# -- existing fused calls ------------------------------------------------------------------
def _site_from_sdpa(view: GraphView, node: str) -> AttentionSite:
    attrs = view.attrs(node)
    q, k, v, mask = view.operands(node)
    if attrs["dropout_p"] > 0:
        raise _Miss(f"scaled_dot_product_attention with dropout_p={attrs['dropout_p']}", node)
    q_shape, k_shape, v_shape = view.shape(q), view.shape(k), view.shape(v)
    if q_shape is None or k_shape is None or v_shape is None:
        raise _Miss("scaled_dot_product_attention inputs of unknown shape", node)
    head_dim = q_shape[-1]
    scale = attrs["scale"]
    if scale is None:
        if not isinstance(head_dim, int):
            raise _Miss("default scale with a symbolic head dim", node)
        scale = 1.0 / math.sqrt(head_dim)
    group = 1
    if attrs["enable_gqa"]:
        heads, kv_heads = q_shape[-3], k_shape[-3]
        if not (isinstance(heads, int) and isinstance(kv_heads, int)) or heads % kv_heads:
            raise _Miss("enable_gqa with heads not a multiple of kv heads", node)
        group = heads // kv_heads
    lead = tuple(q_shape[:-2])
    n, m = q_shape[-2], k_shape[-2]
    if attrs["is_causal"] and not view.same_size(n, m):
        raise _Miss("is_causal with query length ≠ key length (top-left causal)", node)
    masks = []
    if isinstance(mask, str):
        kind = "keep" if view.dtype(mask) == "bool" else "additive"
        masks.append(MaskTerm(trace_operand(view, mask, allow_scale=False), kind))
    k_traced = TracedOperand(k, None)
    site = AttentionSite(
        location=view.location(node),
        q=TracedOperand(q, None),
        k=k_traced,
        v=TracedOperand(v, None),
        scale=float(scale),
        output=node,
        nodes=[node],
        scores_shape=(*lead, n, m),
        q_shape=q_shape,
        v_shape=v_shape,
        dtype=view.dtype(q),
        output_dtype=view.dtype(node),
        masks=masks,
        causal=bool(attrs["is_causal"]),
        kv_group=group,
        source="sdpa",
        k_shape_lead=tuple(k_shape[:-2]),
    )
    _classify_masks(view, site)
    site.is_cross = not view.same_size(n, m)
    site.prefix_len = _prefix_len(view, site.k, site.v)
    for operand in (site.q, site.k, site.v):
        if not view.is_real(operand.source):
            raise _Miss("an SDPA input is an intermediate of a fused op", node)
    if isinstance(mask, Const) and mask.value is not None:
        raise _Miss("scaled_dot_product_attention with a constant mask", node)
    return site
