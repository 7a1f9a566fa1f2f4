"""Lower sites into onnxruntime's fused attention ops and splice them into the ONNX graph.

A site ``softmax(scale·Q·Kᵀ + masks)·V`` of 2-D, 3-D or 4-D scores becomes, in order of
preference, the first fused op whose contract it meets (``FUSED_OPS``): standard ``Attention``
(opset >= 23: any head grouping, bool or float mask), ``com.microsoft.MultiHeadAttention``
(fp32, equal head counts, cross-attention too) or ``com.microsoft.GroupQueryAttention``
(grouped heads, query length = key length). Transposes and ``Reshape``s with 0/-1 bring q, k, v
into the op's layout and the result back, so dynamic sizes need no constants; masks are
broadcast to the ``(…, S, T)`` the ops require with ``Shape``-computed sizes. Splicing the
nodes into the model is ``splice``'s part.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from attnopt.frontends.onnx.graph import OnnxGraph
from attnopt.frontends.onnx.model import ELEM_TYPES
from attnopt.passes.base import Replacement
from attnopt.rewriter.canonicalize import TracedOperand
from attnopt.rewriter.site import AttentionSite, MaskTerm

MS_DOMAIN = "com.microsoft"


class NotExpressible(Exception):
    """No fused op can compute the site exactly; the message says why."""


@dataclass
class Lowering:
    """The nodes computing a site's value with a fused op; ``output`` has the site's layout."""

    site: AttentionSite
    nodes: list[onnx.NodeProto]
    output: str
    kernel: str
    config: str
    domains: set[str] = field(default_factory=set)
    #: (a ``Shape`` node's old output, the nodes computing it from q and k, the new value)
    shapes: list[tuple[str, list[onnx.NodeProto], str]] = field(default_factory=list)


@dataclass
class _Facts:
    """What choosing and building a fused op needs to know about one site."""

    site: AttentionSite
    graph: OnnxGraph
    scale: float  # the call's attributes (the Replacement's), which the ops compute
    causal: bool
    fill: float
    rank: int = 0
    heads: int = 1
    kv_heads: int = 1
    dtype: str = ""
    square: bool = False  # query length provably equals key length

    def same(self, a: object, b: object) -> bool:
        return a == b or self.graph.view.same_size(a, b)


# -- the ops ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusedOp:
    kernel: str
    domain: str
    why_not: Callable[[_Facts], str | None]
    build: Callable[[_Emitter, _Facts], str]


def _attention_why_not(f: _Facts) -> str | None:
    if f.graph.opset < 23:
        return f"Attention needs opset >= 23 (the model has {f.graph.opset})"
    if f.dtype not in ("float32", "float16"):
        return f"Attention runs float32/float16, not {f.dtype}"
    return None


def _mha_why_not(f: _Facts) -> str | None:
    if f.kv_heads != f.heads:
        return f"MultiHeadAttention needs as many kv heads as query heads ({f.kv_heads}/{f.heads})"
    if f.dtype != "float32":
        return f"MultiHeadAttention runs float32 on CPU, not {f.dtype}"
    return None


def _mha_repeat_why_not(f: _Facts) -> str | None:
    if f.rank != 4:
        return "MultiHeadAttention over repeated kv heads needs 4-D scores"
    if f.dtype != "float32":
        return f"MultiHeadAttention runs float32 on CPU, not {f.dtype}"
    return None


def _gqa_why_not(f: _Facts) -> str | None:
    if not f.square:
        return "GroupQueryAttention needs query length = key length (no KV cache here)"
    if f.dtype not in ("float32", "float16"):
        return f"GroupQueryAttention runs float32/float16, not {f.dtype}"
    return None


def _build_attention(e: _Emitter, f: _Facts) -> str:
    q, k, v = (e.bnsh(x, f.rank) for x in (f.site.q, f.site.k, f.site.v))
    mask = e.mask(f, allow_bool=True)
    out = e.node(
        "Attention",
        [q, k, v] + ([mask] if mask else []),
        scale=f.scale,
        is_causal=int(f.causal),
    )
    if f.rank == 4:
        return out
    return e.squeeze(out, [1] if f.rank == 3 else [0, 1])


def _build_mha(e: _Emitter, f: _Facts) -> str:
    q = e.bsd(f.site.q, f.rank)
    if f.kv_heads == f.heads:
        k, v = e.kv_layout(f.site.k, f.site.v, f.rank)
    else:  # each kv head repeated for its group of query heads, as the model does
        k = e.repeat_heads(f.site.k, f, f.site.q_shape[-1])
        v = e.repeat_heads(f.site.v, f, f.site.v_shape[-1])
    mask = e.mask(f, allow_bool=False)
    out = e.node(
        "MultiHeadAttention",
        [q, k, v, "", "", mask or ""],
        domain=MS_DOMAIN,
        num_heads=f.heads,
        scale=f.scale,
        unidirectional=int(f.causal),
    )
    return e.from_bsd(out, f)


def _build_gqa(e: _Emitter, f: _Facts) -> str:
    q, k, v = (e.bsd(x, f.rank) for x in (f.site.q, f.site.k, f.site.v))
    kv_len = e.dim(f.site.k, -2, f.rank)
    batch = e.dim(f.site.q, 0, f.rank) if f.rank > 2 else e.const(np.array([1], np.int64))
    last = e.node("Sub", [kv_len, e.const(np.array([1], np.int64))])
    seqlens = e.node("Expand", [e.node("Cast", [last], to=TensorProto.INT32), batch])
    total = e.squeeze(e.node("Cast", [kv_len], to=TensorProto.INT32), [0])
    mask = e.mask(f, allow_bool=False)
    out = e.node(
        "GroupQueryAttention",
        [q, k, v, "", "", seqlens, total, "", "", "", mask or ""],
        domain=MS_DOMAIN,
        num_heads=f.heads,
        kv_num_heads=f.kv_heads,
        scale=f.scale,
        causal=int(f.causal),
    )
    return e.from_bsd(out, f)


#: In order of preference: the first op whose contract a site meets is used.
FUSED_OPS: tuple[FusedOp, ...] = (
    FusedOp("Attention", "", _attention_why_not, _build_attention),
    FusedOp("com.microsoft.MultiHeadAttention", MS_DOMAIN, _mha_why_not, _build_mha),
    FusedOp("com.microsoft.GroupQueryAttention", MS_DOMAIN, _gqa_why_not, _build_gqa),
    FusedOp("com.microsoft.MultiHeadAttention", MS_DOMAIN, _mha_repeat_why_not, _build_mha),
)


# -- lowering ---------------------------------------------------------------------------------
#: How each Replacement op is lowered into ONNX; other variants have no ONNX lowering yet.
LOWERINGS: dict[str, Callable[[OnnxGraph, AttentionSite, Replacement, str], Lowering]] = {}


def lowers(op: str):
    def register(fn):
        LOWERINGS[op] = fn
        return fn

    return register


def lower(graph: OnnxGraph, site: AttentionSite, replacement: Replacement, prefix: str) -> Lowering:
    """The nodes replacing ``site``; raises NotExpressible with the reason when none can."""
    lowering = LOWERINGS.get(replacement.op)
    if lowering is None:
        raise NotExpressible(f"no ONNX lowering for {replacement.op}")
    return lowering(graph, site, replacement, prefix)


@lowers("attnopt::quant")
def _lower_quant(
    graph: OnnxGraph, site: AttentionSite, replacement: Replacement, prefix: str
) -> Lowering:
    """Not lowered: ``DynamicQuantizeLinear`` gives one uint8 scale per tensor, and quant's
    per-block Q/K scales and K smoothing would need a hand-built QuantizeLinear subgraph that
    onnxruntime runs unfused (no faster than its fused fp32 attention)."""
    raise NotExpressible(
        "quant's per-block INT8 scales have no fused onnxruntime op (DynamicQuantizeLinear "
        "quantizes a whole tensor with one scale); the site stays exact"
    )


@lowers("attnopt::attention")
def _lower_exact(
    graph: OnnxGraph, site: AttentionSite, replacement: Replacement, prefix: str
) -> Lowering:
    attrs = replacement.attrs
    if attrs["window"]:
        raise NotExpressible("sliding-window attention is not lowered to ONNX yet")
    facts = _Facts(site, graph, float(attrs["scale"]), bool(attrs["causal"]), attrs["fill"])
    _check(facts)
    reasons = []
    for op in FUSED_OPS:
        why_not = op.why_not(facts)
        if why_not is None:
            emitter = _Emitter(graph, prefix)
            out = emitter.finish_output(op.build(emitter, facts), site)
            if _nan_guarded(graph, site):
                out = emitter.nan_to_zero(out, site.output_dtype or facts.dtype)
            config = (
                f"heads={facts.heads}/{facts.kv_heads} scale={facts.scale:.4g} "
                f"causal={int(facts.causal)} masks={len(site.masks)}"
            )
            domains = {op.domain} if op.domain else set()
            shapes = [emitter.scores_shape(facts, read) for read in site.shape_reads]
            return Lowering(site, emitter.nodes, out, op.kernel, config, domains, shapes)
        reasons.append(why_not)
    raise NotExpressible("; ".join(reasons))


def _nan_guarded(graph: OnnxGraph, site: AttentionSite) -> bool:
    """Whether the model sets NaN probabilities to 0 (rows with every key masked by -inf).

    The fused ops give NaN for such rows, the model 0: the same guard on the op's output
    makes them agree. A guard on q, k or v cannot move there and is not lowered."""
    view = graph.view
    for operand in (site.q, site.k, site.v):
        if any(view.attrs(n).get("nan_to_zero") for n in operand.path):
            raise NotExpressible("a NaN guard on q, k or v")
    guards = [n for n in site.nodes if view.attrs(n).get("nan_to_zero")]
    for guard in guards:
        cur = view.operands(guard)[0]
        while view.op(cur) in ("cast", "identity"):
            cur = view.operands(cur)[0]
        if view.op(cur) != "softmax":
            raise NotExpressible("a NaN guard before the softmax")
    return bool(guards)


def _check(facts: _Facts) -> None:
    """Check the site fits the fused ops' shared contract and fill in its sizes."""
    site, view = facts.site, facts.graph.view
    rank = len(site.scores_shape)
    if rank not in (2, 3, 4):
        raise NotExpressible(f"{rank}-D scores (the fused ops take up to 4-D)")
    lead = site.scores_shape[:-2]
    q_lead = tuple(site.q_shape[:-2])
    k_lead = tuple(site.k_shape_lead)
    v_lead = _lead(view.shape(site.v.source), site.v.perm)
    facts.rank, facts.dtype = rank, site.dtype or ""
    if len(q_lead) != len(lead) or not all(map(facts.same, q_lead, lead)):
        raise NotExpressible("queries broadcast over batch or heads")
    if len(k_lead) != len(lead) or v_lead is None or not all(map(facts.same, k_lead, v_lead)):
        raise NotExpressible("keys and values of different or unknown leading shapes")
    if rank > 2 and not facts.same(k_lead[0], lead[0]):
        raise NotExpressible("keys broadcast over the batch")
    heads, kv_heads = (lead[-1], k_lead[-1]) if rank == 4 else (1, 1)
    if not isinstance(heads, int) or not isinstance(kv_heads, int) or heads % kv_heads:
        raise NotExpressible(f"head counts {heads}/{kv_heads} are not static multiples")
    for operand in (site.k, site.v):
        if view.dtype(operand.source) != site.dtype:
            raise NotExpressible("q, k and v of different dtypes")
    facts.heads, facts.kv_heads = heads, kv_heads
    facts.square = facts.same(site.q_len, site.kv_len)
    if facts.causal and not facts.square:
        raise NotExpressible("causal mask with query length ≠ key length")


def _lead(shape: tuple | None, perm: tuple | None) -> tuple | None:
    if shape is None:
        return None
    if perm is not None:
        shape = tuple(shape[i] for i in perm)
    return tuple(shape[:-2])


class _Emitter:
    """Appends nodes with fresh value names; helpers pick the opset's form of each op."""

    def __init__(self, graph: OnnxGraph, prefix: str) -> None:
        self.graph = graph
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def fresh(self, base: str) -> str:
        self._count += 1
        return f"{self.prefix}/{base}_{self._count}"

    def node(self, op: str, inputs: list[str], domain: str = "", **attrs: object) -> str:
        out = self.fresh(op)
        name = self.fresh(f"{op}_node")
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, domain=domain, **attrs))
        return out

    def const(self, array: np.ndarray) -> str:
        return self.node("Constant", [], value=onnx.numpy_helper.from_array(array))

    def axes_op(self, op: str, x: str, axes: list[int]) -> str:
        if self.graph.opset >= 13:
            return self.node(op, [x, self.const(np.array(axes, np.int64))])
        return self.node(op, [x], axes=axes)

    def unsqueeze(self, x: str, axes: list[int]) -> str:
        return self.axes_op("Unsqueeze", x, axes) if axes else x

    def squeeze(self, x: str, axes: list[int]) -> str:
        return self.axes_op("Squeeze", x, axes)

    def transpose(self, x: str, perm: tuple | None) -> str:
        if perm is None or tuple(perm) == tuple(range(len(perm))):
            return x
        return self.node("Transpose", [x], perm=list(perm))

    def value(self, operand: TracedOperand) -> str:
        return self.transpose(operand.source, operand.perm)

    def bnsh(self, operand: TracedOperand, rank: int) -> str:
        """(B, N, S, H): 4-D as it is, 3-D (B·N, S, H) as one head, 2-D as batch and head 1."""
        return self.unsqueeze(self.value(operand), {4: [], 3: [1], 2: [0, 1]}[rank])

    def bsd(self, operand: TracedOperand, rank: int) -> str:
        """(B, S, N·H), the contrib ops' layout: one composed transpose and a 0/-1 reshape."""
        if rank == 2:
            return self.unsqueeze(self.value(operand), [0])
        if rank == 3:
            return self.value(operand)
        perm = operand.perm or (0, 1, 2, 3)
        moved = self.transpose(operand.source, tuple(perm[i] for i in (0, 2, 1, 3)))
        return self.node("Reshape", [moved, self.const(np.array([0, 0, -1], np.int64))])

    def kv_layout(self, k: TracedOperand, v: TracedOperand, rank: int) -> tuple[str, str]:
        """MultiHeadAttention's K and V, both (B, L, N·H) or both (B, N, L, H) (the op takes
        one rank for the two): (B, N, L, H) when neither is a view of its source as
        (B, L, N·H) without a transpose."""
        if rank == 4 and all(_moves_data(x.perm or (0, 1, 2, 3), (0, 2, 1, 3)) for x in (k, v)):
            return self.bnsh(k, rank), self.bnsh(v, rank)
        return self.bsd(k, rank), self.bsd(v, rank)

    def repeat_heads(self, operand: TracedOperand, f: _Facts, head_dim: object) -> str:
        """(B, kv_heads, L, H) -> (B, heads, L, H), each kv head repeated for its group: the
        model's own repeat where it has one (it stays for the ``Shape`` nodes that size the
        mask, so a second copy would cost twice), else a new one."""
        view = self.graph.view
        source = view.shape(operand.source)
        for unsqueeze in view.users(operand.source) if operand.perm is None else ():
            if view.op(unsqueeze) != "unsqueeze" or view.attrs(unsqueeze)["dim"] != 2:
                continue
            for expand in view.users(unsqueeze):
                for repeated in view.users(expand) if view.op(expand) == "expand" else ():
                    shape = view.shape(repeated)
                    if (
                        view.op(repeated) == "reshape"
                        and shape is not None
                        and source is not None
                        and len(shape) == len(source) == 4
                        and shape[1] == f.heads
                        and all(map(view.same_size, shape[2:], source[2:]))
                    ):
                        return repeated
        if not isinstance(head_dim, int):
            raise NotExpressible("repeating kv heads of a dynamic head size")
        x = self.unsqueeze(self.value(operand), [2])
        group = self.const(np.array([1, 1, f.heads // f.kv_heads, 1, 1], np.int64))
        sizes = self.const(np.array([0, f.heads, -1, head_dim], np.int64))
        return self.node("Reshape", [self.node("Expand", [x, group]), sizes])

    def scores_shape(self, f: _Facts, read: str) -> tuple[str, list[onnx.NodeProto], str]:
        """A ``Shape`` node of a value of the scores' shape, computed from q and k instead (the
        scores are no longer computed); its nodes go where the old ``Shape`` node was."""
        kept, self.nodes = self.nodes, []
        q, k, rank = f.site.q, f.site.k, f.rank
        dims = [self.dim(q, axis, rank) for axis in range(rank - 1)] + [self.dim(k, -2, rank)]
        shape = self.node("Concat", dims, axis=0)
        attrs = self.graph.view.attrs(read)
        if attrs["start"] != 0 or attrs["end"] is not None:
            end = np.iinfo(np.int64).max if attrs["end"] is None else attrs["end"]
            starts, ends = (self.const(np.array([x], np.int64)) for x in (attrs["start"], end))
            shape = self.node("Slice", [shape, starts, ends])
        nodes, self.nodes = self.nodes, kept
        return read, nodes, shape

    def nan_to_zero(self, out: str, dtype: str) -> str:
        zero = self.const(np.array(0, np.dtype(dtype)))
        return self.node("Where", [self.node("IsNaN", [out]), zero, out])

    def from_bsd(self, out: str, f: _Facts) -> str:
        """A contrib op's (B, S, N·H) output back in the site's layout."""
        if f.rank == 2:
            return self.squeeze(out, [0])
        if f.rank == 3:
            return out
        split = self.node("Reshape", [out, self.const(np.array([0, 0, f.heads, -1], np.int64))])
        return self.transpose(split, (0, 2, 1, 3))

    def dim(self, operand: TracedOperand, axis: int, rank: int) -> str:
        """Size ``axis`` of the operand as the site sees it, as a 1-D int64 value."""
        source_axis = (operand.perm or tuple(range(rank)))[axis % rank]
        size = self.graph.shapes.shape(operand.source)
        if size is not None and isinstance(size[source_axis], int):
            return self.const(np.array([size[source_axis]], np.int64))
        shape = self.node("Shape", [operand.source])
        starts, ends = (np.array([v], np.int64) for v in (source_axis, source_axis + 1))
        return self.node("Slice", [shape, self.const(starts), self.const(ends)])

    def mask(self, f: _Facts, allow_bool: bool) -> str | None:
        """The site's masks as one bias (or, where allowed, one bool mask) of shape
        broadcastable to (B, N, S, T) with full S and T."""
        site = f.site
        if not site.masks:
            return None
        shapes = [self._term_shape(t) for t in site.masks]
        additive = [self._additive(t, f) for t in site.masks if t.kind == "additive"]
        keeps = [self._keep(t) for t in site.masks if t.kind != "additive"]
        keep = _fold(lambda a, b: self.node("And", [a, b]), keeps)
        bias = _fold(lambda a, b: self.node("Add", [a, b]), additive)
        if keep is not None and (bias is not None or not allow_bool or f.fill != -math.inf):
            dtype = np.dtype(f.dtype)
            zero, fill = (self.const(np.array(x, dtype)) for x in (0.0, f.fill))
            blocked = self.node("Where", [keep, zero, fill])
            bias = blocked if bias is None else self.node("Add", [bias, blocked])
            keep = None
        mask = bias if bias is not None else keep
        if any(shape is None or len(shape) < 2 for shape in shapes):
            raise NotExpressible("a mask of unknown shape")
        rank = max(len(shape) for shape in shapes)
        if rank > f.rank:
            raise NotExpressible("a mask of higher rank than the scores")
        mask = self.unsqueeze(mask, [1] if (f.rank, rank) == (3, 3) else list(range(4 - rank)))
        full = all(
            f.same(shape[-2], site.q_len) and f.same(shape[-1], site.kv_len) for shape in shapes
        )
        if not full:
            target = [self.const(np.array([1, 1], np.int64))]
            target += [self.dim(site.q, -2, f.rank), self.dim(site.k, -2, f.rank)]
            mask = self.node("Expand", [mask, self.node("Concat", target, axis=0)])
        return mask

    def _term_shape(self, term: MaskTerm) -> tuple | None:
        """The shape a mask term has once laid out like the scores."""
        view = self.graph.view
        if term.relayout is not None:
            return view.shape(term.relayout[1])
        shape = view.shape(term.operand.source)
        if shape is None or term.operand.perm is None:
            return shape
        return tuple(shape[i] for i in term.operand.perm)

    def _term_value(self, term: MaskTerm) -> str:
        """A mask term's value; one the model applies to a 4-D view of 3-D scores (OPT/BART)
        is broadcast to that view's sizes and reshaped as the scores are reshaped back."""
        value = self.value(term.operand)
        if term.relayout is None:
            return value
        there, back = (self.graph.view.handle(r) for r in term.relayout)
        target = there.input[1]
        sizes = self.graph.values.ints.get(target)
        if sizes is None or any(isinstance(s, int) and s < -1 for s in sizes):
            raise NotExpressible("a mask applied to a view of the scores of unknown sizes")
        if 0 in sizes and not any(a.name == "allowzero" and a.i for a in there.attribute):
            raise NotExpressible("a mask applied to a view of the scores sized by a 0 (copy)")
        if -1 in sizes:  # the size the Reshape infers: the mask's own there (detection checked)
            minus_one, one = (self.const(np.array(x, np.int64)) for x in (-1, 1))
            target = self.node("Where", [self.node("Equal", [target, minus_one]), one, target])
        expanded = self.node("Expand", [value, target])
        allowzero = next((a.i for a in back.attribute if a.name == "allowzero"), 0)
        return self.node("Reshape", [expanded, back.input[1]], allowzero=allowzero)

    def _additive(self, term: MaskTerm, f: _Facts) -> str:
        value = self._term_value(term)
        if self.graph.view.dtype(term.operand.source) != f.dtype:
            value = self.node("Cast", [value], to=ELEM_TYPES[f.dtype])
        if term.multiplier != 1.0:
            value = self.node(
                "Mul", [value, self.const(np.array(term.multiplier, np.dtype(f.dtype)))]
            )
        return value

    def _keep(self, term: MaskTerm) -> str:
        value = self._term_value(term)
        return self.node("Not", [value]) if term.kind == "drop" else value

    def finish_output(self, out: str, site: AttentionSite) -> str:
        out = self.transpose(out, site.output_perm)
        if site.output_dtype is not None and site.output_dtype != site.dtype:
            out = self.node("Cast", [out], to=ELEM_TYPES[site.output_dtype])
        return out


def _moves_data(perm: tuple, then: tuple) -> bool:
    """Whether ``perm`` followed by ``then`` is not the identity (a transpose must copy)."""
    return tuple(perm[i] for i in then) != tuple(range(len(perm)))


def _fold(fn: Callable[[str, str], str], values: list[str]) -> str | None:
    if not values:
        return None
    result = values[0]
    for value in values[1:]:
        result = fn(result, value)
    return result
