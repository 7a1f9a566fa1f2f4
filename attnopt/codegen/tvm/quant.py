"""TVM fused INT8 attention (``quant``, ALGORITHMS.md §6) for CPUs: one loop nest per query tile
with ``Q·Kᵀ`` on the CPU's integer dot-product instruction, the online softmax in fp32 and
``P·V`` in the same pass, so no score ever leaves the core's registers and L1.

The quantization is the reference's (``codegen/reference/quant.py``): K smoothed, Q per 128
rows with ``scale·log2 e`` folded in, K per 64 keys. A first compiled pass (``_prep_kernel``,
O(n·d)) quantizes and packs the operands the way the dot product reads them:

- ``vpdpbusd`` (AVX-512 VNNI) multiplies 4 unsigned bytes by 4 signed bytes per int32 lane.
  Q is stored as ``q + 128`` (u8) and broadcast 4 bytes at a time; K as panels of 64 keys
  ``(D/4, 64, 4)``, so one 64-byte load holds 4 dims of 16 keys. ``Σ(q+128)·k`` is
  corrected by ``128·Σk`` per key, the accumulator's initial value: the scores are exact int32.
- Without VNNI (AVX2) the same 4-byte products are spelled out in plain TIR (bytes widened,
  which LLVM turns into ``vpmaddwd``), so the kernel runs on every x86-64 CPU. It stays selected
  there: at the AVX2 level (n=2048, d=64, causal, 1 thread) it took 50 ms against the int_mm
  kernel's 482 ms (oneDNN capped at AVX2), though torch's AVX2 SDPA took 25 ms.

``P·V``: with ``pv="int8"`` P (u8) and V (s8) are integers as well and run on the same
instruction, as the reference's ``"int8"`` mode defines them (``int8_values``: V smoothed by
its channel mean, per-channel scales; P per key block against the block's own row max), the
block's int32 sums scaled into the fp32 accumulator. With ``pv="fp16"``/``"bf16"``, V is
rounded to that dtype and ``P·V`` runs in fp32 FMAs as in the exact kernel (P unrounded, so
slightly closer to exact than the reference, which rounds P as well). ``pv="fp8"`` is left
to the ``int_mm`` kernel (CPUs have no FP8 units; it emulates them).

Which key blocks a tile visits, and which need the causal / window / bounds check, are the exact
kernel's ``_band_start``, ``_band_count``, ``_inside_band`` and ``_visible``. Scores are in log2
units; masks are added (or boolean fill used) in log2 units, floored as the reference floors them.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

from attnopt.codegen.reference.quant import BLOCK_K, BLOCK_Q, LOG2E, PV_DTYPES
from attnopt.codegen.registry import Kernel, register_kernel
from attnopt.codegen.tvm import cache
from attnopt.codegen.tvm.exact import (
    MIN_QUERIES,
    NEG_INF,
    _band_count,
    _band_start,
    _contract,
    _inside_band,
    _mask_operand,
    _visible,
)
from attnopt.errors import KernelError
from attnopt.targets import Target, detect_cpu

_FLOOR = torch.finfo(torch.float32).min / 2  # masks floored as in the reference
MAX_HEAD_DIM = 256
# Below this many scores the launches, packing and thread-pool handoff (1-3 ms for the exact
# kernel, see its MIN_WORK) weigh most; a guess, not tuned for this kernel.
MIN_WORK = 1 << 20
KEY_BLOCK = BLOCK_K  # keys per block: P is quantized per row of a block, as in the reference
PV_KINDS = (*PV_DTYPES, "int8")  # FP8 has no CPU units: the int_mm kernel emulates it


@dataclass(frozen=True)
class Spec:
    """The static facts a compiled kernel is specialised on."""

    head_dim: int
    value_dim: int
    pv: str  # "int8" (u8 P · s8 V) or "float32"
    dot: str  # "vnni" (vpdpbusd) or "generic"
    mask: str = "none"
    mask_dtype: str = "float32"
    mask_key_stride: int = 1


def dot_kind(target: Target) -> str:
    """``"vnni"`` where the target has 512-bit VNNI, else ``"generic"``."""
    wide = target.vector_bits >= 512
    return "vnni" if wide and "avx512_vnni" in target.cpu_features else "generic"


def _config(target: Target, value_dim: int) -> dict | None:
    """Register tiles for the target's vector registers (32 on AVX-512, 16 on AVX2), or None
    when the value dim is not a whole number of vectors."""
    if target.vector_bits >= 512:
        config = {"block_m": 96, "rows": 6, "cols": 4, "vec": 16, "pv_cols": 4}
    else:
        config = {"block_m": 48, "rows": 4, "cols": 2, "vec": 8, "pv_cols": 2}
    while value_dim % (config["pv_cols"] * config["vec"]) and config["pv_cols"] > 1:
        config["pv_cols"] //= 2
    return None if value_dim % config["vec"] else config


def _dot4(spec: Spec, vec: int):
    """``dot(acc, a, b)``: int32 lanes plus the sums of 4 u8·s8 byte products (``a`` u8 and
    ``b`` s8 vectors of ``4·vec`` bytes)."""
    from tvm import tirx
    from tvm.script import tirx as T

    if spec.dot == "vnni":

        def vnni(acc, a, b):
            return T.call_llvm_pure_intrin(
                f"int32x{vec}", f"llvm.x86.avx512.vpdpbusd.{32 * vec}", acc, a, b
            )

        return vnni

    def generic(acc, a, b):
        for t in range(4):
            pick = [tirx.IntImm("int32", 4 * lane + t) for lane in range(vec)]
            ua = T.Cast(f"int32x{vec}", tirx.Shuffle([a], pick))
            sb = T.Cast(f"int32x{vec}", tirx.Shuffle([b], pick))
            acc = acc + ua * sb
        return acc

    return generic


def _cpu_kernel(spec: Spec, config: dict):
    """The PrimFunc of one signature class; every shape in it is symbolic."""
    from tvm import tirx
    from tvm.script import tirx as T

    from attnopt.codegen.tvm.tirlib import STACK, exp2, hmax, hsum, lanes

    d4, dv = spec.head_dim // 4, spec.value_dim
    bm, rows, vec = config["block_m"], config["rows"], config["vec"]
    cols, pv_cols = config["cols"], config["pv_cols"]
    tw = cols * vec  # keys of a Q·Kᵀ register tile
    bn = KEY_BLOCK  # keys per block (the P quantization's block, as the reference's)
    key_tiles = bn // tw
    pw = pv_cols * vec
    bv = bn // vec
    stats = -(-bm // vec) * vec
    int_pv = spec.pv == "int8"
    neg = T.float32(NEG_INF)
    dot = _dot4(spec, vec)
    log2e = T.float32(LOG2E)
    floor = T.float32(_FLOOR)
    i64 = T.int64

    def bcast4(word):
        """An int32 (4 bytes) repeated over the vector, seen as ``4·vec`` unsigned bytes."""
        return T.reinterpret(f"uint8x{4 * vec}", tirx.Broadcast(word, vec))

    def row_max(buf, i):
        return hmax(
            functools.reduce(T.max, [lanes(buf, i, c * vec, width=vec) for c in range(bv)]), vec
        )

    def row_sum(buf, i, lane):
        return functools.reduce(lambda a, b: a + b, [buf[i, c * vec + lane] for c in range(bv)])

    def safe(m):
        return T.Select(m == neg, T.float32(0), m)

    def masked(mask_buf, b, h, row, key, s, fill):
        if spec.mask == "boolean":
            return T.Select(mask_buf[b, h, row, key] != T.uint8(0), s, fill)
        if spec.mask == "additive":
            return s + T.max(T.Cast("float32", mask_buf[b, h, row, key]), floor) * log2e
        return s

    def score(MASK, KS, acc, qs_s, fill, b, h, hk, i0, j0, N, M, g, kt, r, cv, c):
        """The dequantized (and masked) score of register-tile lane ``(r, cv·vec + c)``."""
        key = kt * tw + cv * vec + c
        value = T.Cast("float32", acc[r, cv * vec + c]) * (qs_s[g * rows + r] * KS[b, hk, j0 + key])
        row = T.min(i0 + g * rows + r, N - 1)
        return masked(MASK, b, h, row, T.min(j0 + key, M - 1), value, fill)

    @T.macro
    def attend_tile(
        QU, QS, KP, KC, KS, VP, VS, VM, MASK, OUT, H, HK, N, M, causal, window, fill, bi, hi, ti
    ):
        b: T.let = bi
        h: T.let = hi
        i0: T.let = ti * bm
        n_rows: T.let = T.Cast("int32", T.min(i64(bm), N - i0))
        used: T.let = (n_rows + rows - 1) // rows * rows
        hk: T.let = h // (H // HK)
        first: T.let = i0 + M - N
        last: T.let = first + n_rows - 1
        blk0: T.let = _band_start(first, window, bn)
        n_blk: T.let = _band_count(first, last, M, causal, window, bn)
        win: T.let = T.Cast("int32", T.min(window, N + M))
        q_s = T.alloc_buffer((bm, d4), "int32", annotations=STACK)
        qs_s = T.alloc_buffer((bm,), "float32", annotations=STACK)
        s_t = T.alloc_buffer((bm, bn), "float32", annotations=STACK)
        p_q = T.alloc_buffer((bm, bn), "uint8", annotations=STACK)
        acc_o = T.alloc_buffer((bm, dv), "float32", annotations=STACK)
        l_run = T.alloc_buffer((bm, vec), "float32", annotations=STACK)
        m_run = T.alloc_buffer((stats,), "float32", annotations=STACK)
        m_sub = T.alloc_buffer((stats,), "float32", annotations=STACK)
        alpha = T.alloc_buffer((stats,), "float32", annotations=STACK)
        beta = T.alloc_buffer((stats,), "float32", annotations=STACK)
        for i in range(bm):
            for c in range(d4):
                q_s[i, c] = QU[b, h, T.min(i0 + i, N - 1), c]
            qs_s[i] = QS[b, h, T.min(i0 + i, N - 1)]
            for c in T.vectorized(dv):
                acc_o[i, c] = T.float32(0)
            for c in T.vectorized(vec):
                l_run[i, c] = T.float32(0)
        for i in range(stats):
            m_run[i] = neg
            m_sub[i] = neg
        for jb in range(n_blk):
            blk: T.let = blk0 + jb
            j0: T.let = blk * bn
            whole: T.let = _inside_band(j0, first, last, M, causal, window, bn)
            base: T.let = T.Cast("int32", j0 - first)
            n_keys: T.let = T.Cast("int32", T.min(i64(bn), M - j0))
            # S = Q·Kᵀ on integers, a register tile of rows × bn, then scaled and masked
            for g, kt in T.grid(used // rows, key_tiles):
                acc = T.alloc_buffer((rows, tw), "int32", annotations=STACK)
                for r, cv in T.grid(rows, cols):
                    for c in T.vectorized(vec):
                        acc[r, cv * vec + c] = -KC[b, hk, j0 + kt * tw + cv * vec + c]
                for dd in range(d4):
                    for r in T.unroll(rows):
                        for cv in T.unroll(cols):
                            acc[r, T.Ramp(cv * vec, 1, vec)] = dot(
                                acc[r, T.Ramp(cv * vec, 1, vec)],
                                bcast4(q_s[g * rows + r, dd]),
                                KP[b, hk, blk, dd, T.Ramp((kt * tw + cv * vec) * 4, 1, 4 * vec)],
                            )
                # blocks wholly inside the band skip the causal / window / bounds check
                if whole:
                    for r, cv in T.grid(rows, cols):
                        for c in T.vectorized(vec):
                            s_t[g * rows + r, kt * tw + cv * vec + c] = score(
                                MASK, KS, acc, qs_s, fill, b, h, hk, i0, j0, N, M, g, kt, r, cv, c
                            )
                else:
                    for r, cv in T.grid(rows, cols):
                        for c in T.vectorized(vec):
                            s_t[g * rows + r, kt * tw + cv * vec + c] = T.Select(
                                _visible(
                                    base + kt * tw + cv * vec + c - T.Cast("int32", g * rows + r),
                                    kt * tw + cv * vec + c,
                                    n_keys,
                                    causal,
                                    win,
                                ),
                                score(
                                    MASK,
                                    KS,
                                    acc,
                                    qs_s,
                                    fill,
                                    b,
                                    h,
                                    hk,
                                    i0,
                                    j0,
                                    N,
                                    M,
                                    g,
                                    kt,
                                    r,
                                    cv,
                                    c,
                                ),  # fmt: skip
                                neg,
                            )
            # running max, rescale factors; int8 P is taken against the block's own row max
            for i in range(used):
                m_sub[i] = row_max(s_t, i)
            for iv in range((used + vec - 1) // vec):
                for c in T.vectorized(vec):
                    alpha[iv * vec + c] = exp2(
                        m_run[iv * vec + c] - safe(T.max(m_run[iv * vec + c], m_sub[iv * vec + c]))
                    )
                    beta[iv * vec + c] = exp2(
                        m_sub[iv * vec + c] - safe(T.max(m_run[iv * vec + c], m_sub[iv * vec + c]))
                    )
                    m_run[iv * vec + c] = T.max(m_run[iv * vec + c], m_sub[iv * vec + c])
                    if int_pv:
                        m_sub[iv * vec + c] = safe(m_sub[iv * vec + c])
                    else:
                        m_sub[iv * vec + c] = safe(m_run[iv * vec + c])
            for i in range(used):
                for cv in range(bv):
                    for c in T.vectorized(vec):
                        if int_pv:
                            s_t[i, cv * vec + c] = T.floor(
                                exp2(s_t[i, cv * vec + c] - m_sub[i]) * T.float32(255)
                                + T.float32(0.5)
                            )
                            p_q[i, cv * vec + c] = T.Cast(
                                "uint8", T.Cast("int32", s_t[i, cv * vec + c])
                            )
                        else:
                            s_t[i, cv * vec + c] = exp2(s_t[i, cv * vec + c] - m_sub[i])
                for c in T.vectorized(vec):
                    if int_pv:
                        l_run[i, c] = l_run[i, c] * alpha[i] + row_sum(s_t, i, c) * beta[i]
                    else:
                        l_run[i, c] = l_run[i, c] * alpha[i] + row_sum(s_t, i, c)
            # O = α·O + P·V
            for g in range(used // rows):
                for db in range(dv // pw):
                    if int_pv:
                        pacc = T.alloc_buffer((rows, pw), "int32", annotations=STACK)
                        for r, cv in T.grid(rows, pv_cols):
                            for c in T.vectorized(vec):
                                pacc[r, cv * vec + c] = T.int32(0)
                        for j4 in range((n_keys + 3) // 4):
                            for r in T.unroll(rows):
                                for cv in T.unroll(pv_cols):
                                    pacc[r, T.Ramp(cv * vec, 1, vec)] = dot(
                                        pacc[r, T.Ramp(cv * vec, 1, vec)],
                                        bcast4(
                                            T.reinterpret(
                                                "int32", p_q[g * rows + r, T.Ramp(j4 * 4, 1, 4)]
                                            )
                                        ),
                                        VP[
                                            b,
                                            hk,
                                            blk,
                                            j4,
                                            T.Ramp((db * pw + cv * vec) * 4, 1, 4 * vec),
                                        ],
                                    )
                        for r, cv in T.grid(rows, pv_cols):
                            for c in T.vectorized(vec):
                                acc_o[g * rows + r, db * pw + cv * vec + c] = acc_o[
                                    g * rows + r, db * pw + cv * vec + c
                                ] * alpha[g * rows + r] + T.Cast(
                                    "float32", pacc[r, cv * vec + c]
                                ) * (beta[g * rows + r] * VS[b, hk, db * pw + cv * vec + c])
                    else:
                        facc = T.alloc_buffer((rows, pw), "float32", annotations=STACK)
                        for r, cv in T.grid(rows, pv_cols):
                            for c in T.vectorized(vec):
                                facc[r, cv * vec + c] = (
                                    acc_o[g * rows + r, db * pw + cv * vec + c]
                                    * alpha[g * rows + r]
                                )
                        for j in range(n_keys):
                            for r in T.unroll(rows):
                                for cv in T.unroll(pv_cols):
                                    for c in T.vectorized(vec):
                                        facc[r, cv * vec + c] = (
                                            facc[r, cv * vec + c]
                                            + s_t[g * rows + r, j]
                                            * VP[b, hk, blk, j, db * pw + cv * vec + c]
                                        )
                        for r, cv in T.grid(rows, pv_cols):
                            for c in T.vectorized(vec):
                                acc_o[g * rows + r, db * pw + cv * vec + c] = facc[r, cv * vec + c]
        for i in range(n_rows):
            total: T.let = hsum(lanes(l_run, i, 0, width=vec), vec)
            inv: T.let = T.Select(total > T.float32(0), T.float32(1) / total, T.float32(0))
            for c in T.vectorized(dv):
                OUT[b, h, i0 + i, c] = T.Select(
                    total > T.float32(0), acc_o[i, c] * inv + VM[b, hk, c], T.float32(0)
                )

    # V panels: 4 keys interleaved per channel for the dot product, or fp32 rows
    v_rows, v_cols, v_dtype = (bn // 4, 4 * dv, "int8") if int_pv else (bn, dv, "float32")

    def buffers(qu, qs, kp, kc, ks, vp, vs, vm, mask, o):
        """The operands' buffers, declared inside the ``prim_func`` body (sizes symbolic)."""
        B, H, HK, N, NB = (T.int64() for _ in range(5))
        QU = T.match_buffer(qu, (B, H, N, i64(d4)), "int32")
        QS = T.match_buffer(qs, (B, H, N), "float32")
        KP = T.match_buffer(kp, (B, HK, NB, i64(d4), i64(4 * bn)), "int8")
        KC = T.match_buffer(kc, (B, HK, NB * bn), "int32")
        KS = T.match_buffer(ks, (B, HK, NB * bn), "float32")
        VP = T.match_buffer(vp, (B, HK, NB, i64(v_rows), i64(v_cols)), v_dtype)
        VS = T.match_buffer(vs, (B, HK, i64(dv)), "float32")
        VM = T.match_buffer(vm, (B, HK, i64(dv)), "float32")
        mask_shape = tuple(T.int64() for _ in range(4))
        sm = [T.int64() for _ in range(3)]
        MASK = T.match_buffer(
            mask, mask_shape, spec.mask_dtype, strides=(*sm, i64(spec.mask_key_stride))
        )
        OUT = T.match_buffer(o, (B, H, N, i64(dv)), "float32")
        return B, H, HK, N, QU, QS, KP, KC, KS, VP, VS, VM, MASK, OUT

    @T.prim_func
    def kernel(
        qu: T.handle,
        qs: T.handle,
        kp: T.handle,
        kc: T.handle,
        ks: T.handle,
        vp: T.handle,
        vs: T.handle,
        vm: T.handle,
        mask: T.handle,
        o: T.handle,
        M: T.int64,
        causal: T.int64,
        window: T.int64,
        fill: T.float32,
    ):
        T.func_attr({"tir.noalias": True})
        B, H, HK, N, QU, QS, KP, KC, KS, VP, VS, VM, MASK, OUT = buffers(
            qu, qs, kp, kc, ks, vp, vs, vm, mask, o
        )
        tiles: T.let = (N + bm - 1) // bm
        # tiles of a (batch, head) taken in pairs from both ends: causal work balances
        for task in T.parallel(B * H * tiles):
            bh: T.let = task // tiles
            t: T.let = task % tiles
            attend_tile(
                QU, QS, KP, KC, KS, VP, VS, VM, MASK, OUT, H, HK, N, M, causal, window, fill,
                bh // H, bh % H, t // 2 + t % 2 * (tiles - 1 - t // 2 * 2),
            )  # fmt: skip

    return kernel


# ----------------------------------------------------------------------------- launcher


def _prep_kernel(head_dim: int, value_dim: int, int_pv: bool):
    """The PrimFunc that quantizes and packs the operands in three parallel passes (Q blocks,
    K blocks, V per kv head), as ``quantize_blocks`` and ``int8_values`` quantize them:
    ``x·scale / (max|x·scale| / 127)`` rounded half to even, clamped to ±127."""
    from tvm import tirx
    from tvm.script import tirx as T

    from attnopt.codegen.tvm.tirlib import STACK, hmax, hsum, lanes

    d, dv, bq, bn = head_dim, value_dim, BLOCK_Q, KEY_BLOCK
    w = next(width for width in (16, 8, 4) if d % width == 0)  # vector lanes along d
    i64 = T.int64
    qmax = T.float32(127)

    def quantized(x, step):
        return T.Cast("int32", T.max(T.min(round_even(x / step), qmax), -qmax))

    def round_even(x):
        """torch.round's half-to-even from ``floor`` (``nearbyint`` stops TVM vectorizing)."""
        half, up = (tirx.Var(name, "float32") for name in ("x", "r"))
        odd = up - T.float32(2) * T.floor(up * T.float32(0.5)) != T.float32(0)
        tie_odd = tirx.all(up - half == T.float32(0.5), odd)
        value = T.Select(tie_odd, up - T.float32(1), up)
        value = tirx.Let(up, T.floor(half + T.float32(0.5)), value)
        return tirx.Let(half, x, value)

    def step_of(peak):
        return T.Select(peak > T.float32(0), peak / qmax, T.float32(1))

    def buffers(q, k, v, km, vm, qu, qs, kp, kc, ks, vp, vs):
        B, H, HK, N, M, NB = (T.int64() for _ in range(6))
        Q = T.match_buffer(q, (B, H, N, i64(d)), "float32")
        K = T.match_buffer(k, (B, HK, M, i64(d)), "float32")
        V = T.match_buffer(v, (B, HK, M, i64(dv)), "float32")
        KM = T.match_buffer(km, (B, HK, i64(d)), "float32")
        VM = T.match_buffer(vm, (B, HK, i64(dv)), "float32")
        QU = T.match_buffer(qu, (B, H, N, i64(d)), "uint8")
        QS = T.match_buffer(qs, (B, H, N), "float32")
        KP = T.match_buffer(kp, (B, HK, NB, i64(d // 4), i64(bn)), "int32")  # 4 bytes a key
        KC = T.match_buffer(kc, (B, HK, NB * bn), "int32")
        KS = T.match_buffer(ks, (B, HK, NB * bn), "float32")
        VP = T.match_buffer(vp, (B, HK, NB, i64(bn // 4), i64(4 * dv)), "int8")
        VS = T.match_buffer(vs, (B, HK, i64(dv)), "float32")
        return B, H, HK, N, M, NB, Q, K, V, KM, VM, QU, QS, KP, KC, KS, VP, VS

    @T.prim_func
    def prep(
        q: T.handle,
        k: T.handle,
        v: T.handle,
        km: T.handle,
        vm: T.handle,
        qu: T.handle,
        qs: T.handle,
        kp: T.handle,
        kc: T.handle,
        ks: T.handle,
        vp: T.handle,
        vs: T.handle,
        scale: T.float32,
    ):
        T.func_attr({"tir.noalias": True})
        B, H, HK, N, M, NB, Q, K, V, KM, VM, QU, QS, KP, KC, KS, VP, VS = buffers(
            q, k, v, km, vm, qu, qs, kp, kc, ks, vp, vs
        )
        q_blocks: T.let = (N + bq - 1) // bq
        for task in T.parallel(B * H * q_blocks):
            b: T.let = task // (H * q_blocks)
            h: T.let = task // q_blocks % H
            r0: T.let = task % q_blocks * bq
            rows: T.let = T.min(i64(bq), N - r0)
            peak = T.alloc_buffer((w,), "float32", annotations=STACK)
            for c in T.vectorized(w):
                peak[c] = T.float32(0)
            for r, c0 in T.grid(rows, d // w):
                for c in T.vectorized(w):
                    peak[c] = T.max(peak[c], T.abs(Q[b, h, r0 + r, c0 * w + c] * scale))
            step: T.let = step_of(hmax(lanes(peak, 0, width=w), w))
            for r in range(rows):
                QS[b, h, r0 + r] = step
                for c0 in range(d // w):
                    for c in T.vectorized(w):
                        QU[b, h, r0 + r, c0 * w + c] = T.Cast(
                            "uint8", quantized(Q[b, h, r0 + r, c0 * w + c] * scale, step) + 128
                        )
        for task in T.parallel(B * HK * NB):
            b: T.let = task // (HK * NB)
            hk: T.let = task // NB % HK
            blk: T.let = task % NB
            j0: T.let = blk * bn
            peak = T.alloc_buffer((w,), "float32", annotations=STACK)
            for c in T.vectorized(w):
                peak[c] = T.float32(0)
            for j, c0 in T.grid(T.min(i64(bn), M - j0), d // w):
                for c in T.vectorized(w):
                    peak[c] = T.max(
                        peak[c], T.abs(K[b, hk, j0 + j, c0 * w + c] - KM[b, hk, c0 * w + c])
                    )
            step: T.let = step_of(hmax(lanes(peak, 0, width=w), w))
            # a block of K quantized row by row, then its 4-byte groups moved into the panel
            kq = T.alloc_buffer((bn, d), "int8", annotations=STACK)
            sums = T.alloc_buffer((w,), "int32", annotations=STACK)
            for j in range(bn):
                for c in T.vectorized(w):
                    sums[c] = 0
                for c0 in range(d // w):
                    for c in T.vectorized(w):
                        kq[j, c0 * w + c] = T.Cast(
                            "int8",
                            T.Select(
                                j0 + j < M,
                                quantized(
                                    K[b, hk, T.min(j0 + j, M - 1), c0 * w + c]
                                    - KM[b, hk, c0 * w + c],
                                    step,
                                ),
                                0,
                            ),
                        )
                        sums[c] = sums[c] + T.Cast("int32", kq[j, c0 * w + c])
                KC[b, hk, j0 + j] = hsum(lanes(sums, 0, width=w), w) * 128
                KS[b, hk, j0 + j] = T.Select(j0 + j < M, step, T.float32(0))
            for c4, j in T.grid(d // 4, bn):
                KP[b, hk, blk, c4, j] = T.reinterpret("int32", kq[j, T.Ramp(c4 * 4, 1, 4)])
        if int_pv:
            for task in T.parallel(B * HK):
                b: T.let = task // HK
                hk: T.let = task % HK
                for c in T.vectorized(dv):
                    VS[b, hk, c] = T.float32(0)
                for j in range(M):
                    for c in T.vectorized(dv):
                        VS[b, hk, c] = T.max(VS[b, hk, c], T.abs(V[b, hk, j, c] - VM[b, hk, c]))
                for c in T.vectorized(dv):
                    VS[b, hk, c] = T.max(VS[b, hk, c], T.float32(1e-30)) / qmax
                for j4, c in T.grid(NB * bn // 4, dv):
                    for t in T.vectorized(4):
                        VP[b, hk, j4 * 4 // bn, j4 % (bn // 4), c * 4 + t] = T.Cast(
                            "int8",
                            T.Select(
                                j4 * 4 + t < M,
                                quantized(
                                    V[b, hk, T.min(j4 * 4 + t, M - 1), c] - VM[b, hk, c],
                                    VS[b, hk, c],
                                ),
                                0,
                            ),
                        )

    return prep


def operands(q, k, v, *, scale: float, pv: str, target: Target) -> dict:
    """The kernel's operands: the reference's quantization, packed for the dot product by one
    compiled pass (``_prep_kernel``); only the token means and fp32 V's rounding are torch."""
    q, k, v = (t.float().contiguous() for t in (q, k, v))
    (b, h, n, d), (hk, m), dv = q.shape, k.shape[1:3], v.shape[-1]
    blocks = -(-m // KEY_BLOCK)
    int_pv = pv == "int8"
    k_mean = k.mean(dim=-2)
    v_mean = v.mean(dim=-2) if int_pv else v.new_zeros(b, hk, dv)
    ops = {
        "qu": q.new_empty(b, h, n, d, dtype=torch.uint8),
        "qs": q.new_empty(b, h, n),
        "kp": q.new_empty(b, hk, blocks, d // 4, 4 * KEY_BLOCK, dtype=torch.int8),
        "kc": q.new_empty(b, hk, blocks * KEY_BLOCK, dtype=torch.int32),
        "ks": q.new_empty(b, hk, blocks * KEY_BLOCK),
        # (unwritten without int8 P·V: that pass is compiled out, the fp32 panels replace it)
        "vp": q.new_empty(b, hk, blocks, KEY_BLOCK // 4, 4 * dv, dtype=torch.int8),
        "vs": q.new_zeros(b, hk, dv),
        "vm": v_mean,
    }
    key = {"head_dim": d, "value_dim": dv, "int_pv": int_pv}
    prep = cache.kernel_function("tvm.quant.prep", key, target, _prep_kernel, d, dv, int_pv)
    outs = [ops[name].view(torch.int32) if name == "kp" else ops[name] for name in list(ops)[:7]]
    prep(q, k, v, k_mean, v_mean, *outs, scale * LOG2E)
    ops["qu"] = ops["qu"].view(torch.int32)
    if not int_pv:
        ops["vp"] = _key_blocks(v.to(PV_DTYPES[pv]).float(), KEY_BLOCK)
    return ops


def _key_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x (B, Hk, M, C)`` as ``(B, Hk, blocks, block, C)``, zero-padded (a copy) only when
    ``M`` is not a whole number of blocks."""
    b, h, m, c = x.shape
    blocks = -(-m // block)
    if m % block:
        x = torch.cat([x, x.new_zeros(b, h, blocks * block - m, c)], dim=2)
    return x.view(b, h, blocks, block, c)


def _spec(q, v, mask_facts: dict, pv: str, target: Target) -> Spec:
    kind = "int8" if pv == "int8" else "float32"
    return Spec(q.shape[-1], v.shape[-1], kind, dot_kind(target), **mask_facts)


def supports(q, k, v, mask, causal: bool, window: int, bits: int, pv: str) -> str | None:
    """None, or why this kernel does not run these inputs (the int_mm kernel then does)."""
    if q.device.type != "cpu":
        return "CPU kernel"
    if bits != 8 or pv not in PV_KINDS:
        return f"bits={bits}, pv={pv!r}: the fused kernel runs bits=8 with pv in {PV_KINDS}"
    try:
        reason = _contract(q, k, v, mask)
    except RuntimeError as err:
        return str(err)
    if reason is not None:
        return reason
    d, dv = q.shape[-1], v.shape[-1]
    if d % 4 or max(d, dv) > MAX_HEAD_DIM:
        return f"head dim {d} must be a multiple of 4 and at most {MAX_HEAD_DIM}"
    target = detect_cpu()
    if _config(target, dv) is None:
        return f"value dim {dv} is not a whole number of {target.vector_bits}-bit vectors"
    if q.shape[2] < MIN_QUERIES:  # decoding: packing K and V each call would dominate
        return (
            f"{q.shape[2]} queries: below {MIN_QUERIES} the per-call packing outweighs the kernel"
        )
    work = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
    if work < MIN_WORK:
        return f"{work} scores: below {MIN_WORK} quantizing and packing outweigh the kernel"
    return None


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float,
    causal: bool = False,
    window: int = 0,
    fill: float = NEG_INF,
    bits: int = 8,
    pv: str = "fp16",
) -> torch.Tensor:
    """Quantized attention as ``reference.quant_attention`` computes it (INT8 Q·Kᵀ, P·V as the
    module docstring says), in one compiled pass."""
    if bits != 8 or pv not in PV_KINDS:
        raise KernelError(f"the fused kernel runs bits=8 with pv in {PV_KINDS}; got {bits}, {pv!r}")
    reason = _contract(q, k, v, mask)
    if reason is not None:
        raise KernelError(reason)
    target = detect_cpu()
    config = _config(target, v.shape[-1])
    if config is None:
        raise KernelError(f"value dim {v.shape[-1]} is not a whole number of vectors")
    mask_arg, facts = _mask_operand(mask, q, k)
    spec = _spec(q, v, facts, pv, target)
    ops = operands(q.detach(), k.detach(), v.detach(), scale=scale, pv=pv, target=target)
    out = q.new_empty(*q.shape[:3], v.shape[-1], dtype=torch.float32)
    fill2 = fill if fill == NEG_INF else max(fill, _FLOOR) * LOG2E
    key = {**asdict(spec), **config}
    function = cache.kernel_function("tvm.quant.cpu", key, target, _cpu_kernel, spec, config)
    function(*ops.values(), mask_arg, out, k.shape[-2], int(causal), max(window, 0), fill2)
    return out.to(q.dtype)


TVM_QUANT = register_kernel(
    Kernel(
        variant="quant",
        device_type="cpu",
        name="tvm",
        forward=forward,
        supports=supports,
        priority=20,
    )
)
