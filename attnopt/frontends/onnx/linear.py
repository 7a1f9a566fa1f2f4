"""Lower ``linear`` sites into standard ONNX ops that stock onnxruntime runs (no custom op).

The site's q, k, v go to ``(B, H, N, D)``; the feature map (``elu``: Elu + 1, ``relu``: Relu,
``hedgehog``: MatMul by the site's weights as a constant, then Softmax of both signs) is applied
in fp32; kv heads are repeated to the query heads (GQA). A column of ones beside ``v`` carries the
normaliser through the same matmuls, ``y = num / (den + eps)``. Not causal: ``φ(Q)(φ(K)ᵀ V)``.
Causal, in chunks of ``C`` tokens (the sequence padded to whole chunks with ``Pad``):

    intra = tril(Q_c K_cᵀ) V_c            inter = Q_c · exclusive-CumSum over chunks of K_cᵀ V_c

so memory is ``N/C`` states of ``F × (Dv + 1)`` and no ``N × N`` matrix appears.
"""

from __future__ import annotations

import numpy as np

from attnopt.codegen.linear_ops import EPS
from attnopt.frontends.onnx.graph import OnnxGraph
from attnopt.frontends.onnx.model import ELEM_TYPES
from attnopt.frontends.onnx.rewrite import (
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

FLOAT = ELEM_TYPES["float32"]


def _i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def _features(e: _Emitter, x: str, kind: str, weight: np.ndarray | None) -> str:
    """φ(x) for ``(B, H, N, D)`` fp32 ``x``."""
    if kind == "elu":
        return e.node("Add", [e.node("Elu", [x], alpha=1.0), e.const(np.array(1.0, np.float32))])
    if kind == "relu":
        return e.node("Relu", [x])
    z = e.node("MatMul", [x, e.const(weight[None].astype(np.float32))])  # (1, H, D, F)
    halves = [e.node("Softmax", [t], axis=-1) for t in (z, e.node("Neg", [z]))]
    return e.node("Concat", halves, axis=-1)


def _repeat_heads(e: _Emitter, x: str, group: int, heads: int) -> str:
    """``(B, Hkv, N, F)`` to ``(B, H, N, F)``, kv head ``h // group`` for query head ``h``."""
    if group == 1:
        return x
    wide = e.node("Expand", [e.unsqueeze(x, [2]), e.const(_i64(1, 1, group, 1, 1))])
    return e.node("Reshape", [wide, e.const(_i64(0, heads, -1, 0))])


def _shape(e: _Emitter, x: str, lead: tuple[int, ...], last_axis: int) -> str:
    """A Reshape target: ``lead`` (0 copies, -1 infers) then ``x``'s size at ``last_axis``."""
    shape = e.node("Shape", [x])
    last = e.node("Slice", [shape, e.const(_i64(last_axis)), e.const(_i64(last_axis + 1))])
    return e.node("Concat", [e.const(_i64(*lead)), last], axis=0)


def _causal(e: _Emitter, fq: str, fk: str, vv: str, chunk: int) -> str:
    """Chunked causal linear attention over ``vv`` (v with its ones column)."""
    n = e.node("Slice", [e.node("Shape", [fq]), e.const(_i64(2)), e.const(_i64(3))])
    size = e.const(_i64(chunk))
    pad = e.node("Mod", [e.node("Sub", [size, e.node("Mod", [n, size])]), size])
    zeros2, zeros1 = e.const(_i64(0, 0)), e.const(_i64(0))
    pads = e.node("Concat", [zeros2, zeros2, zeros2, pad, zeros1], axis=0)

    def chunks(x: str) -> str:  # (B, H, N, D) -> (B, H, N/C, C, D)
        padded = e.node("Pad", [x, pads])
        return e.node("Reshape", [padded, _shape(e, x, (0, 0, -1, chunk), 3)])

    qc, kc, vc = chunks(fq), chunks(fk), chunks(vv)
    kt = e.node("Transpose", [kc], perm=[0, 1, 2, 4, 3])
    tril = np.tril(np.ones((chunk, chunk), np.float32))
    scores = e.node("Mul", [e.node("MatMul", [qc, kt]), e.const(tril)])
    intra = e.node("MatMul", [scores, vc])
    states = e.node("MatMul", [kt, vc])  # (B, H, N/C, F, Dv + 1)
    before = e.node("CumSum", [states, e.const(np.array(2, np.int64))], exclusive=1)
    out = e.node("Add", [intra, e.node("MatMul", [qc, before])])
    flat = e.node("Reshape", [out, _shape(e, out, (0, 0, -1), 4)])
    return e.node("Slice", [flat, e.const(_i64(0)), n, e.const(_i64(2))])


@lowers("attnopt::linear")
def _lower_linear(
    graph: OnnxGraph, site: AttentionSite, replacement: Replacement, prefix: str
) -> Lowering:
    attrs = replacement.attrs
    if graph.opset < 11:
        raise NotExpressible(
            f"linear attention in ONNX needs opset >= 11 (CumSum, Pad inputs), "
            f"the model has {graph.opset}"
        )
    facts = _Facts(site, graph, float(site.scale), bool(site.causal), site.fill)
    _check(facts)
    if _nan_guarded(graph, site):
        raise NotExpressible("a NaN guard (rows with every key masked) has no linear form")
    module = replacement.module
    kind, chunk = attrs["feature_map"], int(attrs["chunk"])
    e = _Emitter(graph, prefix)
    q, k, v = (e.node("Cast", [e.bnsh(x, facts.rank)], to=FLOAT) for x in (site.q, site.k, site.v))
    weights = {"q": None, "k": None}
    if kind == "hedgehog":
        weights = {
            "q": module.feature_q.weight.detach().float().numpy(),
            "k": module.feature_k.weight.detach().float().numpy(),
        }
    group = facts.heads // facts.kv_heads
    fq = _features(e, q, kind, weights["q"])
    fk = _repeat_heads(e, _features(e, k, kind, weights["k"]), group, facts.heads)
    v = _repeat_heads(e, v, group, facts.heads)
    ones = e.node(
        "Add",
        [
            e.node("Mul", [e.node("Slice", [v, *(e.const(_i64(i)) for i in (0, 1, -1))]),
                           e.const(np.array(0.0, np.float32))]),
            e.const(np.array(1.0, np.float32)),
        ],
    )  # fmt: skip
    vv = e.node("Concat", [v, ones], axis=-1)
    if facts.causal:
        both = _causal(e, fq, fk, vv, chunk)
    else:
        state = e.node("MatMul", [e.node("Transpose", [fk], perm=[0, 1, 3, 2]), vv])
        both = e.node("MatMul", [fq, state])
    num = e.node("Slice", [both, *(e.const(_i64(i)) for i in (0, -1, -1))])
    den = e.node("Slice", [both, *(e.const(_i64(i)) for i in (-1, 2**62, -1))])
    out = e.node("Div", [num, e.node("Add", [den, e.const(np.array(EPS, np.float32))])])
    out = e.node("Cast", [out], to=ELEM_TYPES[facts.dtype])
    if facts.rank != 4:
        out = e.squeeze(out, [1] if facts.rank == 3 else [0, 1])
    out = e.finish_output(out, site)
    config = f"feature_map={kind} chunk={chunk} causal={int(facts.causal)} heads={facts.heads}"
    return Lowering(site, e.nodes, out, "onnx standard ops (linear)", config)
