"""Lower ``conv_basis`` sites to standard ONNX ops (``DFT``), heads chosen at convert time.

``calibrate`` runs the model in onnxruntime with the site's q, k, v and bias exposed and lets
the site module watch them and ``fit`` the site budget (the torch path's per-head choice).

What the lowering computes has to hold for every input and every sequence length, so only the
heads whose basis is the bias itself are lowered: a Toeplitz bias (ALiBi, relative bias) gives
one segment whose basis is the bias's first column, read in-graph at the call's length. The
bias must be computed from shapes and constants only (no input values), so its Toeplitz form,
checked in full at the calibration length, does not depend on the input. Heads whose basis is
measured from q·k would need the segment search on every call (data-dependent control flow):
they stay exact in ONNX, with that reason. Per call an ``If`` guards the lowered heads and
falls back to exact attention for them when the content term ``scale·max‖q‖·max‖k‖`` exceeds
``tau`` (the torch path's per-call test, O(n·d)), the basis spans more than ``FP64_RANGE``, or
the bias's first column differs from its last row reversed (necessary for a Toeplitz lower
triangle, O(n): a bias whose form changes with the length falls back at other lengths).

The bias column is read through the elementwise ops that build the bias (ALiBi's
``slopes·(i − j)``: O(n), not the model's ``N × N`` bias); the full bias is built only where an
exact head or the fallback branch needs it (with every head lowered, inside that branch).

Per lowered head: ``E = exp(b − max b)``, ``b`` the bias column; numerator and denominator are
one causal convolution of ``E`` with ``[V 1]`` by ``DFT`` (length the power of two ≥ 2n − 1,
onnxruntime's radix-2 path; other lengths take its slow path), in fp64. Pairs of value channels
ride as the real and imaginary parts of one complex signal (``E`` is real, so the convolution
keeps them apart): one complex DFT and one inverse per pair. The other heads of the site go
through a fused exact op (``Attention`` at opset ≥ 23, else ``com.microsoft.MultiHeadAttention``).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from attnopt.codegen.layout import HeadsLayout
from attnopt.errors import OnnxModelError
from attnopt.frontends.onnx import verify as ort_check
from attnopt.frontends.onnx.graph import OnnxGraph
from attnopt.frontends.onnx.model import ELEM_TYPES
from attnopt.frontends.onnx.rewrite import (
    MS_DOMAIN,
    Lowering,
    NotExpressible,
    _check,
    _Emitter,
    _Facts,
    _nan_guarded,
    lowers,
)
from attnopt.passes.base import Replacement
from attnopt.rewriter.site import AttentionSite

FLOAT, DOUBLE = ELEM_TYPES["float32"], TensorProto.DOUBLE
FP64_RANGE = 20.0  # e^20 × fp64 FFT rounding (~1e-16·log n) stays below 1e-6 of a row's sum
TOEPLITZ_RTOL = 1e-6  # first column vs last row: equal up to fp32 rounding
MEASURED = "measured basis (its segments depend on each call's q·k: data-dependent control flow)"


def _i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def _facts(graph: OnnxGraph, site: AttentionSite) -> _Facts:
    """The site's facts, or NotExpressible for what no input could make lowerable."""
    if graph.opset < 17:
        raise NotExpressible(
            f"conv_basis in ONNX needs DFT (opset >= 17), the model has {graph.opset}"
        )
    facts = _Facts(site, graph, float(site.scale), True, site.fill)
    _check(facts)
    if facts.rank != 4:
        raise NotExpressible(f"conv_basis in ONNX takes 4-D scores (heads), not {facts.rank}-D")
    if _nan_guarded(graph, site):
        raise NotExpressible("a NaN guard (rows with every key masked) has no conv_basis form")
    source = _reads_input(graph, site)
    if source is not None:
        raise NotExpressible(
            f"the position bias is computed from input {source!r}: its Toeplitz form, seen on "
            "the calibration inputs, may not hold for others"
        )
    if not isinstance(site.v_shape[-1], int):
        raise NotExpressible("a dynamic value head size (channels are paired statically)")
    return facts


def _qkv(e: _Emitter, f: _Facts) -> tuple[str, str, str]:
    """q, k, v as fp32 ``(B, H|Hkv, N, D)``."""
    return tuple(e.node("Cast", [e.bnsh(x, 4)], to=FLOAT) for x in (f.site.q, f.site.k, f.site.v))


def _bias(e: _Emitter, f: _Facts) -> str:
    """The site's masks as one fp32 bias broadcastable to ``(B, H, N, N)``."""
    mask = e.mask(f, allow_bool=False)
    return mask if f.dtype == "float32" else e.node("Cast", [mask], to=FLOAT)


#: ops that commute with taking one column of their (broadcast) output
ELEMENTWISE = frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Neg", "Abs", "Exp", "Log", "Sqrt", "Cast", "Identity",
     "Where", "Not", "And", "Or", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual",
     "Min", "Max"}
)  # fmt: skip


class _Chain:
    """The model's nodes by output, for reading a value's first column (``…[..., 0:1]``)
    through the elementwise ops that compute it and for copying the bias into a branch."""

    def __init__(self, e: _Emitter) -> None:
        self.e = e
        self.producer = {out: n for n in e.graph.model.graph.node for out in n.output}
        self.parts: dict[tuple, str] = {}

    def part(self, name: str, axis: int, start: int) -> str:
        """``name`` sliced to index ``start`` (kept as size 1) on ``axis`` (< 0), sliced before
        elementwise ops so no ``N × N`` value is built."""
        key = (name, axis, start)
        if key in self.parts:
            return self.parts[key]
        e, node = self.e, self.producer.get(name)
        ranks = [None if x else 0 for x in node.input] if node is not None else []
        for i, x in enumerate(node.input if node is not None else ()):
            shape = e.graph.shapes.shape(x) if x else ()
            ranks[i] = None if shape is None else len(shape)
        if node is None or node.op_type not in ELEMENTWISE or node.domain or None in ranks:
            end = start + 1 if start != -1 else 2**62
            out = e.node("Slice", [name, *map(e.const, (_i64(start), _i64(end), _i64(axis)))])
        else:
            inputs = [
                self.part(x, axis, start) if r >= -axis else x
                for x, r in zip(node.input, ranks, strict=True)
            ]
            out = e.fresh(node.op_type)
            clone = helper.make_node(node.op_type, inputs, [out], name=e.fresh("node"))
            clone.attribute.extend(node.attribute)
            e.nodes.append(clone)
        self.parts[key] = out
        return out

    def localize(self, nodes: list[onnx.NodeProto], sources: list[str]) -> list[onnx.NodeProto]:
        """``nodes`` (a branch) preceded by copies of the model nodes that compute ``sources``
        (the mask terms, back to ``Shape``, ``Size`` and ``Constant`` nodes) which ``nodes``
        read: the model then need not compute them outside the branch on every call."""
        copied: dict[str, str] = {}
        picked: dict[int, onnx.NodeProto] = {}
        todo = list(sources)
        while todo:
            node = self.producer.get(todo.pop())
            if node is None or node.op_type in ("Shape", "Size", "Constant") or id(node) in picked:
                continue
            picked[id(node)] = node
            for out in node.output:
                copied[out] = self.e.fresh(node.op_type)
            todo.extend(x for x in node.input if x)
        order = [n for n in self.e.graph.model.graph.node if id(n) in picked]
        clones = []
        for node in order + nodes:
            clone = onnx.NodeProto()
            clone.CopyFrom(node)
            for i, x in enumerate(clone.input):
                clone.input[i] = copied.get(x, x)
            for i, x in enumerate(clone.output):
                clone.output[i] = copied.get(x, x)
            if id(node) in picked:
                clone.name = self.e.fresh("node")
            clones.append(clone)
        return clones


def _bias_part(e: _Emitter, f: _Facts, chain: _Chain, axis: int, start: int) -> str:
    """One column (``axis`` -1) or row (-2) of the bias, rank 4, fp32, read through the
    elementwise ops computing each mask term (no ``N × N`` bias is built)."""
    parts = []
    for term in f.site.masks:
        if term.relayout is None and term.operand.perm is None:
            value = chain.part(term.operand.source, axis, start)
        else:
            end = start + 1 if start != -1 else 2**62
            sliced = [e._term_value(term), *map(e.const, (_i64(start), _i64(end), _i64(axis)))]
            value = e.node("Slice", sliced)
        if term.kind == "additive":
            value = e.node("Cast", [value], to=FLOAT)
            if term.multiplier != 1.0:
                value = e.node("Mul", [value, e.const(np.float32(term.multiplier))])
        else:
            keep = value if term.kind == "keep" else e.node("Not", [value])
            value = e.node("Where", [keep, *map(e.const, (np.float32(0.0), np.float32(f.fill)))])
        parts.append(value)
    total = parts[0]
    for part in parts[1:]:
        total = e.node("Add", [total, part])
    rank = max(len(e._term_shape(t)) for t in f.site.masks)
    return e.unsqueeze(total, list(range(4 - rank)))


def _edges(e: _Emitter, f: _Facts, n: str, chain: _Chain) -> tuple[str, str]:
    """The bias's first column ``(B|1, H|1, N, 1)`` and its last row reversed, laid out the
    same way: equal where the lower triangle is Toeplitz (a necessary condition, O(n))."""
    column = e.node("Expand", [_bias_part(e, f, chain, -1, 0), _shape(e, n, 1)])
    row = e.node("Expand", [_bias_part(e, f, chain, -2, -1), _shape(e, 1, n)])
    steps = (_i64(-1), _i64(-(2**62)), _i64(-1), _i64(-1))
    backwards = e.node("Slice", [row, *map(e.const, steps)])
    return column, e.node("Transpose", [backwards], perm=[0, 1, 3, 2])


def _shape(e: _Emitter, rows: str | int, cols: str | int) -> str:
    dims = [e.const(_i64(x)) if isinstance(x, int) else x for x in (1, 1, rows, cols)]
    return e.node("Concat", dims, axis=0)


def calibrate(
    graph: OnnxGraph,
    work: onnx.ModelProto,
    site: AttentionSite,
    replacement: Replacement,
    feeds: dict,
    site_budget: dict[str, float],
) -> tuple[str | None, list[dict]]:
    """Run ``work`` on ``feeds`` with the site's inputs exposed, let the site module watch them
    and fit ``site_budget``: ``(refusal or None, per-head rows)``."""
    e = _Emitter(graph, "attnopt/probe")
    try:
        facts = _facts(graph, site)
        values = [*_qkv(e, facts), *([_bias(e, facts)] if site.masks else [])]
    except NotExpressible as err:
        return f"no ONNX form: {err}", []
    probed = onnx.ModelProto()
    probed.CopyFrom(work)
    probed.graph.node.extend(e.nodes)  # at the end: every value they read is computed before
    probed.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in values)
    try:
        sess = ort_check.session(probed, "the model with the site's inputs exposed", fuse=False)
        got = ort_check.run(sess, feeds, "the model with the site's inputs exposed")
    except OnnxModelError as err:
        return f"no ONNX form: {err}", []
    q, k, v, *mask = (torch.from_numpy(got[name]) for name in values)
    bias = mask[0].expand(*q.shape[:2], q.shape[2], k.shape[2]) if mask else None
    module = replacement.module
    module.watch(True)
    with torch.no_grad():
        module.attend(HeadsLayout(q, k, v, bias, ()))
    refusal, rows = module.fit(site_budget)
    for row in rows:
        if row["variant"] == "conv_basis" and row["basis"] != "bias":
            row["onnx"] = "exact: " + MEASURED
    return refusal, rows


def _mask_sources(site: AttentionSite) -> list[str]:
    return [t.operand.source for t in site.masks] + [
        r for t in site.masks for r in t.relayout or ()
    ]


def _reads_input(graph: OnnxGraph, site: AttentionSite) -> str | None:
    """The graph input whose values (not only its shape) the site's masks are computed from."""
    model = graph.model.graph
    producer = {out: node for node in model.node for out in node.output}
    inputs = {i.name for i in model.input} - {t.name for t in model.initializer}
    todo = _mask_sources(site)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in inputs:
            return name
        node = producer.get(name)
        if node is not None and node.op_type not in ("Shape", "Size"):
            todo.extend(i for i in node.input if i)
    return None


def _reduce(e: _Emitter, op: str, x: str, axes: list[int] | None, keepdims: int) -> str:
    if axes is None:
        return e.node(op, [x], keepdims=keepdims)
    if e.graph.opset >= 18:
        return e.node(op, [x, e.const(_i64(*axes))], keepdims=keepdims)
    return e.node(op, [x], axes=axes, keepdims=keepdims)


def _dft(e: _Emitter, x: str, length: str, inverse: bool) -> str:
    """Full complex DFT along axis 2 of ``x (…, L, …, 1|2)`` zero-padded to ``length``."""
    if e.graph.opset >= 20:
        return e.node("DFT", [x, length, e.const(np.array(2, np.int64))], inverse=int(inverse))
    return e.node("DFT", [x, length], axis=2, inverse=int(inverse))


def _cmul(e: _Emitter, a: str, z: str) -> str:
    """``a·z`` for complex tensors stored as ``(…, 2)`` (real, imaginary), ``a`` the smaller:
    ``a_r·z + a_i·(z·J)`` with ``(z_r, z_i)·J = (−z_i, z_r)`` (a MatMul, no strided slices)."""
    ar, ai = (
        e.node("Slice", [a, e.const(_i64(i)), e.const(_i64(i + 1)), e.const(_i64(-1))])
        for i in (0, 1)
    )
    turned = e.node("MatMul", [z, e.const(np.array([[0.0, 1.0], [-1.0, 0.0]]))])
    return e.node("Add", [e.node("Mul", [ar, z]), e.node("Mul", [ai, turned])])


def _convolve(e: _Emitter, col: str, vc: str, dv: int) -> str:
    """Conv-basis attention of the heads in ``vc (B, C, N, dv)`` with basis column ``col``.
    N is read here, in the branch: onnxruntime's optimizer cannot rename an outer value a
    branch reads (it warns and skips the rewrite)."""
    n = e.node("Slice", [e.node("Shape", [vc]), e.const(_i64(2)), e.const(_i64(3))])
    two_n = e.node("Cast", [e.node("Sub", [e.node("Add", [n, n]), e.const(_i64(1))])], to=DOUBLE)
    log2 = e.node("Div", [e.node("Log", [two_n]), e.const(np.array(math.log(2.0)))])
    length = e.node("Pow", [e.const(np.array(2.0)), e.node("Ceil", [log2])])
    length = e.squeeze(e.node("Cast", [length], to=TensorProto.INT64), [0])
    peak = _reduce(e, "ReduceMax", col, [2], 1)
    basis = e.node("Cast", [e.node("Exp", [e.node("Sub", [col, peak])])], to=DOUBLE)
    spectrum = e.unsqueeze(_dft(e, basis, length, False), [3])  # (b, C, L, 1, 2)
    last = e.node("Slice", [vc, *(e.const(_i64(i)) for i in (-1, 2**62, -1))])
    zero = e.node("Mul", [last, e.const(np.array(0.0, np.float32))])
    one = e.node("Add", [zero, e.const(np.array(1.0, np.float32))])
    columns = [vc, one] + ([zero] if (dv + 1) % 2 else [])
    pairs = (dv + 1 + (dv + 1) % 2) // 2
    signal = e.node("Cast", [e.node("Concat", columns, axis=-1)], to=DOUBLE)
    signal = e.node("Reshape", [signal, e.const(_i64(0, 0, 0, pairs, 2))])
    product = _cmul(e, spectrum, _dft(e, signal, length, False))
    both = e.node("Reshape", [_dft(e, product, length, True), e.const(_i64(0, 0, -1, 2 * pairs))])
    rows = e.node("Slice", [both, e.const(_i64(0)), n, e.const(_i64(2))])
    num = e.node("Slice", [rows, e.const(_i64(0)), e.const(_i64(dv)), e.const(_i64(3))])
    den = e.node("Slice", [rows, e.const(_i64(dv)), e.const(_i64(dv + 1)), e.const(_i64(3))])
    return e.node("Cast", [e.node("Div", [num, den])], to=FLOAT)


def _exact(e: _Emitter, q: str, k: str, v: str, mask: str, heads: int, scale: float) -> str:
    """Exact causal attention of fp32 ``(B, heads, N, ·)`` tensors with a fused op."""
    if e.graph.opset >= 23:
        return e.node("Attention", [q, k, v, mask], scale=scale, is_causal=1)
    bsd = e.node("Reshape", [e.node("Transpose", [q], perm=[0, 2, 1, 3]), e.const(_i64(0, 0, -1))])
    out = e.node(
        "MultiHeadAttention",
        [bsd, k, v, "", "", mask],
        domain=MS_DOMAIN,
        num_heads=heads,
        scale=scale,
        unidirectional=1,
    )
    split = e.node("Reshape", [out, e.const(_i64(0, 0, heads, -1))])
    return e.node("Transpose", [split], perm=[0, 2, 1, 3])


def _branch(
    e: _Emitter, build, chain: _Chain | None = None, sources: list[str] = ()
) -> onnx.GraphProto:
    """The nodes ``build()`` emits as a subgraph (an ``If`` branch) with its one output; with
    ``chain``, the model values they read are computed in the branch (``_Chain.localize``)."""
    kept, e.nodes = e.nodes, []
    out = build()
    nodes, e.nodes = e.nodes, kept
    if chain is not None:
        nodes = chain.localize(nodes, list(sources))
    value = helper.make_tensor_value_info(out, FLOAT, None)
    return helper.make_graph(nodes, e.fresh("branch"), [], [value])


@lowers("attnopt::conv_basis")
def _lower_conv_basis(
    graph: OnnxGraph, site: AttentionSite, replacement: Replacement, prefix: str
) -> Lowering:
    module = replacement.module
    if module is None or not getattr(module, "fitted", False):
        raise NotExpressible("conv_basis chooses its heads on calibration inputs; none ran")
    facts = _facts(graph, site)
    conv = [h for h in range(facts.heads) if bool(module.bias_basis[h])]
    measured = [h for h in range(facts.heads) if bool(module.conv_heads[h]) and h not in conv]
    if not conv:
        raise NotExpressible(
            f"no head has a bias-derived basis; heads {measured}: {MEASURED}, kept exact"
        )
    dv = site.v_shape[-1]
    tau, scale, group = float(module.tau), facts.scale, facts.heads // facts.kv_heads
    exact = [h for h in range(facts.heads) if h not in conv]
    if not site.masks:
        raise NotExpressible("no position bias at the site (a bias-derived basis needs one)")
    e = _Emitter(graph, prefix)
    q, k, v = _qkv(e, facts)

    def heads(x: str, index: list[int], kv: bool = False) -> str:
        return e.node(
            "Gather", [x, e.const(_i64(*(h // group if kv else h for h in index)))], axis=1
        )

    def bias(index: list[int], of: str) -> str:  # the mask's head (0 where it broadcasts)
        size = e.node("Slice", [e.node("Shape", [of]), e.const(_i64(1)), e.const(_i64(2))])
        top = e.node("Sub", [size, e.const(_i64(1))])
        return e.node("Gather", [of, e.node("Min", [e.const(_i64(*index)), top])], axis=1)

    qc, kc, vc = heads(q, conv), heads(k, conv, True), heads(v, conv, True)
    n = e.node("Slice", [e.node("Shape", [q]), e.const(_i64(2)), e.const(_i64(3))])
    chain = _Chain(e)
    col, rev = (bias(conv, x) for x in _edges(e, facts, n, chain))  # (B|1, C, N, 1) each
    full = _bias(e, facts) if exact else None  # the exact heads need it; else only the fallback
    norms = [_reduce(e, "ReduceMax", _reduce(e, "ReduceL2", x, [3], 0), [2], 1) for x in (qc, kc)]
    bound = e.node("Mul", [e.node("Mul", norms), e.const(np.array(scale, np.float32))])  # (B, C, 1)
    spread = e.node(
        "Sub",
        [
            _reduce(e, "ReduceMax", col, [2], 1),
            e.node("Slice", [col, e.const(_i64(0)), e.const(_i64(1)), e.const(_i64(2))]),
        ],
    )
    worst = e.node("Add", [spread, e.unsqueeze(bound, [3])])
    skew = e.node(  # |first column − last row reversed| beyond fp32 rounding
        "Sub",
        [
            e.node("Abs", [e.node("Sub", [col, rev])]),
            e.node("Mul", [e.node("Abs", [col]), e.const(np.float32(TOEPLITZ_RTOL))]),
        ],
    )
    within = [
        e.node("LessOrEqual", [_reduce(e, "ReduceMax", x, None, 0), e.const(np.float32(limit))])
        for x, limit in ((bound, tau), (worst, FP64_RANGE), (skew, TOEPLITZ_RTOL))
    ]
    cond = e.node("And", [e.node("And", within[:2]), within[2]])
    then = _branch(e, lambda: _convolve(e, col, vc, dv))
    if exact:
        fallback = _branch(e, lambda: _exact(e, qc, kc, vc, bias(conv, full), len(conv), scale))
    else:  # the bias is built in the branch: only calls that fall back pay O(n²) for it
        fallback = _branch(
            e,
            lambda: _exact(e, qc, kc, vc, bias(conv, _bias(e, facts)), len(conv), scale),
            chain,
            [t.operand.source for t in site.masks]
            + [r for t in site.masks for r in t.relayout or ()],
        )
    out = e.node("If", [cond], then_branch=then, else_branch=fallback)
    if exact:
        rest = _exact(
            e,
            heads(q, exact),
            heads(k, exact, True),
            heads(v, exact, True),
            bias(exact, full),
            len(exact),
            scale,
        )
        order = conv + exact
        inverse = [order.index(h) for h in range(facts.heads)]
        out = e.node(
            "Gather", [e.node("Concat", [out, rest], axis=1), e.const(_i64(*inverse))], axis=1
        )
    out = e.finish_output(e.node("Cast", [out], to=ELEM_TYPES[facts.dtype]), site)
    shapes = [e.scores_shape(facts, read) for read in site.shape_reads]
    config = f"conv heads {conv} (basis from the bias, DFT) exact heads {exact} tau={tau:g}" + (
        f"; heads {measured} exact in ONNX: {MEASURED}" if measured else ""
    )
    domains = {MS_DOMAIN} if graph.opset < 23 else set()  # the exact heads and fallback
    return Lowering(
        site, e.nodes, out, "onnx standard ops (conv_basis: DFT)", config, domains, shapes
    )
