"""TVM exact attention (FlashAttention-2 online softmax) for CPUs through LLVM, and for CUDA.

Follows the contract in ``codegen/reference/exact.py``: q ``(B, H, N, D)``, k/v ``(B, Hkv, M, D)``
read through the kv head ``h // (H // Hkv)``, bottom-right causal and ``window`` as runtime
arguments, additive or boolean masks read in place from their expanded views (a stride-0 key axis
is a compile-time case, other broadcast axes are runtime strides), fully-masked rows giving 0 and
``-inf``. Shapes are symbolic, so one compiled kernel per (head dims, dtype, mask kind, config,
target) serves every batch, head count and sequence length; ``cache.py`` keeps it on disk.

CPU kernel, query tiles of ``block_m`` rows on TVM's thread pool (split by (batch, head) pairs
or by tiles, the ``parallel`` knob):

- K is first copied, a key block at a time, into fp32 panels ``(D, BN)`` (the launcher's
  workspace; vec × vec tiles transposed in registers by shuffles), so ``S = Q·Kᵀ`` is a
  register-tiled outer product: ``rows`` query rows times ``cols`` vectors of keys accumulate
  in vector registers along d, each q element broadcast.
- The softmax of a block runs in three vector passes: row maxima (lanes, then halving shuffles);
  the new running max and rescale factor of ``vec`` rows at once; then ``p = 2^(s - max)`` with
  ``tirlib.exp2`` and lane-wise row sums, whose lanes are added once, at the end.
- ``O = α·O + P·V`` is the same outer product, P broadcast and V rows loaded as vectors.
- ``_band_start``, ``_band_count`` and ``_inside_band`` say which key blocks a tile visits and
  whether a block needs the causal, window and bounds checks (blocks wholly inside skip them).

Score units as in the Triton kernel: log2 without a mask (``log2 e`` folded into the scale), and
natural units with one, converted in the exponent, because masks carry values like
``finfo.min`` that overflow to ``-inf`` once multiplied by ``log2 e``.

The CUDA kernel is a plainer schedule of the same algorithm (a thread per query row, K/V tiles
staged in shared memory); it is registered below the Triton kernel and only checked to compile
without a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from dataclasses import asdict, dataclass

import torch

from attnopt.autotune.runtime import config_for
from attnopt.autotune.space import Config, ConfigSpace
from attnopt.codegen.registry import Kernel, register_kernel
from attnopt.codegen.signature import KernelSignature
from attnopt.codegen.tvm import cache
from attnopt.errors import KernelError
from attnopt.targets import Target, detect_cuda, resolve

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
NEG_INF = -math.inf
MAX_HEAD_DIM = 256  # the q, accumulator and score tiles of a task live on its thread's stack
DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# Half types are converted to fp32 on load; without one of these ISAs LLVM converts element by
# element through library calls, slower than the reference's fp32 matmuls.
HALF_ISAS = {
    "float16": frozenset({"avx2", "avx512_fp16", "neon", "asimd"}),
    "bfloat16": frozenset({"avx2", "avx512_bf16", "neon", "asimd"}),
}
MASK_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# Below this many queries the CPU kernel's per-call K transpose outweighs its work (measured on
# 16 heads × 2048 keys: 8 queries 1.7 ms against the reference's 1.6, 16 queries 2.1 against 2.7).
MIN_QUERIES = 16
# Below this many scores (batch × heads × n × m) a call inside a model is slower than torch's
# SDPA on CPU: handing work from torch's OpenMP pool to TVM's costs ~1-3 ms on 2 cores
# (4-layer GPT-2, 3 × 8 heads × 200²: 0.8× eager; 12 heads × 1024²: 1.7× eager). AVX2 and
# AVX-512 cross over alike (bench_attention.py --with-projection --always --rounds 30
# [--cpu-target avx2], torch held to AVX2 too): SDPA faster up to 0.5M scores, TVM at 8M, the
# crossover in between moving from run to run on a busy 2-core box; so one threshold serves both.
MIN_WORK = 1 << 22


@dataclass(frozen=True)
class Spec:
    """The static facts a compiled kernel is specialised on (its signature class)."""

    head_dim: int
    value_dim: int
    dtype: str
    mask: str = "none"  # "none", "additive" or "boolean"
    mask_dtype: str = "float32"
    mask_key_stride: int = 1  # 1: a value per key; 0: one value per query row, broadcast


# ----------------------------------------------------------------------------- CPU kernel


def _visible(delta, key, n_keys, causal, window):
    """Whether a key at ``delta = key - diagonal`` of its query row passes the band and bounds."""
    from tvm import tirx

    return tirx.all(
        key < n_keys,
        tirx.any(causal == 0, delta <= 0),
        tirx.any(window <= 0, tirx.all(delta < window, -delta < window)),
    )


def _band_start(first, window, block: int):
    """The first key block rows on diagonals ``first..`` can see (the window's left edge)."""
    from tvm.script import tirx as T

    zero = T.int64(0)
    return T.Select(window > 0, T.max(zero, first - window + 1), zero) // block


def _band_count(first, last, n_keys, causal, window, block: int):
    """How many key blocks, from ``_band_start``, rows on diagonals ``first..last`` visit."""
    from tvm.script import tirx as T

    end = T.min(n_keys, T.Select(causal != 0, last + 1, n_keys))
    end = T.min(end, T.Select(window > 0, last + window, n_keys))
    return T.max(T.int64(0), (end + block - 1) // block - _band_start(first, window, block))


def _inside_band(key0, first, last, n_keys, causal, window, block: int):
    """Whether every (row, key) pair of the block starting at ``key0`` is allowed."""
    from tvm import tirx

    key1 = key0 + block - 1
    return tirx.all(
        key1 < n_keys,
        tirx.any(causal == 0, key1 <= first),
        tirx.any(window <= 0, tirx.all(last - key0 < window, key1 - first < window)),
    )


def _score(spec: Spec, raw, mask_buf, b, h, row, key, scale, fill):
    """A scaled score with the site's mask (row and key already clamped inside the tensor), in
    log2 units without a mask and natural units with one (see the module docstring)."""
    from tvm.script import tirx as T

    s = raw * (scale * T.float32(1.0 if spec.mask != "none" else LOG2E))
    if spec.mask == "boolean":
        return T.Select(mask_buf[b, h, row, key] != T.uint8(0), s, fill)
    if spec.mask != "none":
        return s + T.Cast("float32", mask_buf[b, h, row, key])
    return s


def _cpu_kernel(spec: Spec, config: Config):
    """The PrimFunc of one signature class and config; every shape in it is symbolic."""
    from tvm.script import tirx as T

    from attnopt.codegen.tvm.tirlib import (
        STACK,
        concat,
        exp2,
        heads_buffers,
        hmax,
        hsum,
        lanes,
        transpose,
    )

    d, dv, dtype = spec.head_dim, spec.value_dim, spec.dtype
    bm, rows, vec, unroll = config["block_m"], config["rows"], config["vec"], config["unroll"]
    cols, pv_cols, key_tiles = config["cols"], config["pv_cols"], config["key_tiles"]
    tw, pw = cols * vec, pv_cols * vec  # register tile widths of Q·Kᵀ and P·V
    bn = key_tiles * tw  # keys per block
    bv = bn // vec  # vectors per block row
    stats = -(-bm // vec) * vec  # per-row statistics padded to whole vectors
    masked = spec.mask != "none"
    exp_unit = LOG2E if masked else 1.0  # applied to s - max before exp2
    lse_unit = 1.0 if masked else LN2
    # buffer shapes and strides must be int64 throughout: the ABI binder checks their types
    d64, bn64 = T.int64(d), T.int64(bn)
    neg = T.float32(NEG_INF)
    over_tiles = config["parallel"] == 1

    def row_max(buf, i):
        return hmax(
            functools.reduce(T.max, [lanes(buf, i, c * vec, width=vec) for c in range(bv)]), vec
        )

    def row_sum(buf, i, lane):
        return functools.reduce(lambda a, b: a + b, [buf[i, c * vec + lane] for c in range(bv)])

    def safe(m):
        return T.Select(m == neg, T.float32(0), m)

    # K panels are written vec × vec tiles at a time, transposed in registers by shuffles;
    # keys past the last are copies of it (their scores are masked, their values never read)
    square_tiles = d % vec == 0

    def panel_tile(k_buf, b, hk, key0, c0, n_keys):
        rows_in = [
            T.Cast(
                f"float32x{vec}", lanes(k_buf, b, hk, T.min(key0 + r, n_keys - 1), c0, width=vec)
            )
            for r in range(vec)
        ]
        return concat(transpose(rows_in, vec), vec)

    # TVM's pool splits either the (batch, head) pairs, each task walking its query tiles, or
    # the query tiles, taken in pairs from both ends so its static split balances causal work
    def parallel_extent(tiles, pairs):
        return tiles if over_tiles else pairs

    def serial_extent(tiles, pairs):
        return pairs if over_tiles else tiles

    def pair_of(task, step):
        return step if over_tiles else task

    def tile_of(task, step, tiles):
        return task // 2 + task % 2 * (tiles - 1 - task // 2 * 2) if over_tiles else step

    @T.macro
    def attend_tile(
        Q, K, V, KT, MASK, OUT, LSE, H, HK, N, M, scale, causal, window, fill, bi, hi, ti
    ):
        # bind the arguments once: a macro substitutes each expression at every use
        b: T.let = bi
        h: T.let = hi
        i0: T.let = ti * bm
        n_rows: T.let = T.Cast("int32", T.min(T.int64(bm), N - i0))
        used: T.let = (n_rows + rows - 1) // rows * rows
        hk: T.let = h // (H // HK)
        first: T.let = i0 + M - N  # the diagonal of the tile's first row
        last: T.let = first + n_rows - 1
        blk0: T.let = _band_start(first, window, bn)
        n_blk: T.let = _band_count(first, last, M, causal, window, bn)
        win: T.let = T.Cast("int32", T.min(window, N + M))
        q_s = T.alloc_buffer((bm, d), "float32", annotations=STACK)
        s_t = T.alloc_buffer((bm, bn), "float32", annotations=STACK)
        acc_o = T.alloc_buffer((bm, dv), "float32", annotations=STACK)
        l_run = T.alloc_buffer((bm, vec), "float32", annotations=STACK)
        m_run = T.alloc_buffer((stats,), "float32", annotations=STACK)
        m_ref = T.alloc_buffer((stats,), "float32", annotations=STACK)
        alpha = T.alloc_buffer((stats,), "float32", annotations=STACK)
        for i in range(bm):
            for c in T.vectorized(d):
                q_s[i, c] = T.if_then_else(
                    i < n_rows, T.Cast("float32", Q[b, h, T.min(i0 + i, N - 1), c]), T.float32(0)
                )
            for cv in range(dv // vec):
                for c in T.vectorized(vec):
                    acc_o[i, cv * vec + c] = T.float32(0)
            for c in T.vectorized(vec):
                l_run[i, c] = T.float32(0)
        for i in range(stats):
            m_run[i] = neg
            m_ref[i] = neg
        for jb in range(n_blk):
            j0: T.let = (blk0 + jb) * bn
            whole: T.let = _inside_band(j0, first, last, M, causal, window, bn)
            base: T.let = T.Cast("int32", j0 - first)
            n_keys: T.let = T.Cast("int32", T.min(T.int64(bn), M - j0))
            # S = scale · Q Kᵀ (+ mask), register tiles of rows × tw
            for g, kt in T.grid(used // rows, key_tiles):
                acc = T.alloc_buffer((rows, tw), "float32", annotations=STACK)
                for r, cv in T.grid(rows, cols):
                    for c in T.vectorized(vec):
                        acc[r, cv * vec + c] = T.float32(0)
                for d0 in range(d // unroll):
                    for du in T.unroll(unroll):
                        for r in T.unroll(rows):
                            for cv in T.unroll(cols):
                                for c in T.vectorized(vec):
                                    acc[r, cv * vec + c] = (
                                        acc[r, cv * vec + c]
                                        + q_s[g * rows + r, d0 * unroll + du]
                                        * KT[
                                            b,
                                            hk,
                                            blk0 + jb,
                                            d0 * unroll + du,
                                            kt * tw + cv * vec + c,
                                        ]
                                    )
                if whole:
                    for r, cv in T.grid(rows, cols):
                        for c in T.vectorized(vec):
                            s_t[g * rows + r, kt * tw + cv * vec + c] = _score(
                                spec,
                                acc[r, cv * vec + c],
                                MASK,
                                b,
                                h,
                                T.min(i0 + g * rows + r, N - 1),
                                j0 + kt * tw + cv * vec + c,
                                scale,
                                fill,
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
                                _score(
                                    spec,
                                    acc[r, cv * vec + c],
                                    MASK,
                                    b,
                                    h,
                                    T.min(i0 + g * rows + r, N - 1),
                                    T.min(j0 + kt * tw + cv * vec + c, M - 1),
                                    scale,
                                    fill,
                                ),
                                neg,
                            )
            # the new running max and the rescale factor of each row, vec rows at once
            for i in range(used):
                m_ref[i] = row_max(s_t, i)
            for iv in range((used + vec - 1) // vec):
                for c in T.vectorized(vec):
                    m_ref[iv * vec + c] = T.max(m_run[iv * vec + c], m_ref[iv * vec + c])
                    alpha[iv * vec + c] = exp2(
                        (m_run[iv * vec + c] - safe(m_ref[iv * vec + c])) * T.float32(exp_unit)
                    )
                    m_run[iv * vec + c] = m_ref[iv * vec + c]
                    m_ref[iv * vec + c] = safe(m_ref[iv * vec + c])
            # P = 2^(S - max) and the lane-wise row sums
            for i in range(used):
                for cv in range(bv):
                    for c in T.vectorized(vec):
                        s_t[i, cv * vec + c] = exp2(
                            (s_t[i, cv * vec + c] - m_ref[i]) * T.float32(exp_unit)
                        )
                for c in T.vectorized(vec):
                    l_run[i, c] = l_run[i, c] * alpha[i] + row_sum(s_t, i, c)
            # O = α·O + P V, register tiles of rows × pw
            for g in range(used // rows):
                for db in range(dv // pw):
                    acc = T.alloc_buffer((rows, pw), "float32", annotations=STACK)
                    for r, cv in T.grid(rows, pv_cols):
                        for c in T.vectorized(vec):
                            acc[r, cv * vec + c] = (
                                acc_o[g * rows + r, db * pw + cv * vec + c] * alpha[g * rows + r]
                            )
                    for j in range(n_keys):
                        for r in T.unroll(rows):
                            for cv in T.unroll(pv_cols):
                                for c in T.vectorized(vec):
                                    acc[r, cv * vec + c] = acc[r, cv * vec + c] + s_t[
                                        g * rows + r, j
                                    ] * T.Cast("float32", V[b, hk, j0 + j, db * pw + cv * vec + c])
                    for r, cv in T.grid(rows, pv_cols):
                        for c in T.vectorized(vec):
                            acc_o[g * rows + r, db * pw + cv * vec + c] = acc[r, cv * vec + c]
        for i in range(n_rows):
            total: T.let = hsum(lanes(l_run, i, 0, width=vec), vec)
            inv: T.let = T.Select(total > T.float32(0), T.float32(1) / total, T.float32(0))
            for cv in range(dv // vec):
                for c in T.vectorized(vec):
                    OUT[b, h, i0 + i, cv * vec + c] = T.Cast(dtype, acc_o[i, cv * vec + c] * inv)
            LSE[b, h, i0 + i] = T.Select(
                total > T.float32(0), m_run[i] * T.float32(lse_unit) + T.log(total), neg
            )

    @T.prim_func
    def kernel(
        q: T.handle,
        k: T.handle,
        v: T.handle,
        kt: T.handle,
        mask: T.handle,
        o: T.handle,
        lse: T.handle,
        scale: T.float32,
        causal: T.int64,
        window: T.int64,
        fill: T.float32,
    ):
        T.func_attr({"tir.noalias": True})
        B, H, HK, N, M, Q, K, V, MASK, OUT, LSE = heads_buffers(q, k, v, mask, o, lse, spec)
        NB = T.int64()
        KT = T.match_buffer(kt, (B, HK, NB, d64, bn64), "float32")
        # K in fp32 panels of bn keys (zero past the last key), read as vectors by Q·Kᵀ
        for task in T.parallel(B * HK * NB):
            kb: T.let = task // (HK * NB)
            kh: T.let = task // NB % HK
            key0: T.let = task % NB * bn
            if square_tiles:
                for kv, cv in T.grid(bn // vec, d // vec):
                    tile = T.alloc_buffer((vec * vec,), "float32", annotations=STACK)
                    tile[T.Ramp(0, 1, vec * vec)] = panel_tile(
                        K, kb, kh, key0 + kv * vec, cv * vec, M
                    )
                    for r in range(vec):
                        for c in T.vectorized(vec):
                            KT[kb, kh, task % NB, cv * vec + r, kv * vec + c] = tile[r * vec + c]
            else:
                for j, c in T.grid(bn, d):
                    KT[kb, kh, task % NB, c, j] = T.if_then_else(
                        key0 + j < M,
                        T.Cast("float32", K[kb, kh, T.min(key0 + j, M - 1), c]),
                        T.float32(0),
                    )
        tiles: T.let = (N + bm - 1) // bm
        for task in T.parallel(parallel_extent(tiles, B * H)):
            for step in range(serial_extent(tiles, B * H)):
                bh: T.let = pair_of(task, step)
                attend_tile(
                    Q, K, V, KT, MASK, OUT, LSE, H, HK, N, M, scale, causal, window, fill,
                    bh // H, bh % H, tile_of(task, step, tiles),
                )  # fmt: skip

    return kernel


# ----------------------------------------------------------------------------- CUDA kernel


def _cuda_kernel(spec: Spec, config: Config):
    """The CUDA PrimFunc: a thread per query row keeps its q row, accumulator and running
    max/sum in registers; a block's threads stage each key/value tile in shared memory."""
    from tvm.script import tirx as T

    from attnopt.codegen.tvm.tirlib import heads_buffers

    d, dv, dtype = spec.head_dim, spec.value_dim, spec.dtype
    bm, bn = config["block_m"], config["block_n"]
    masked = spec.mask != "none"
    exp_unit = LOG2E if masked else 1.0
    lse_unit = 1.0 if masked else LN2
    neg = T.float32(NEG_INF)

    @T.prim_func
    def kernel(
        q: T.handle,
        k: T.handle,
        v: T.handle,
        mask: T.handle,
        o: T.handle,
        lse: T.handle,
        scale: T.float32,
        causal: T.int64,
        window: T.int64,
        fill: T.float32,
    ):
        T.func_attr({"tir.noalias": True})
        B, H, HK, N, M, Q, K, V, MASK, OUT, LSE = heads_buffers(q, k, v, mask, o, lse, spec)
        for tile in T.thread_binding((N + bm - 1) // bm, thread="blockIdx.x"):
            for bh in T.thread_binding(B * H, thread="blockIdx.y"):
                for tx in T.thread_binding(bm, thread="threadIdx.x"):
                    k_s = T.alloc_buffer((bn, d), "float32", scope="shared")
                    v_s = T.alloc_buffer((bn, dv), "float32", scope="shared")
                    q_r = T.alloc_buffer((d,), "float32", scope="local")
                    acc = T.alloc_buffer((dv,), "float32", scope="local")
                    s_r = T.alloc_buffer((bn,), "float32", scope="local")
                    stat = T.alloc_buffer((4,), "float32", scope="local")  # m, l, block max, α
                    b: T.let = bh // H
                    h: T.let = bh % H
                    hk: T.let = h // (H // HK)
                    i0: T.let = tile * bm
                    row: T.let = T.min(i0 + tx, N - 1)
                    first: T.let = i0 + M - N
                    last: T.let = first + T.min(T.int64(bm), N - i0) - 1
                    blk0: T.let = _band_start(first, window, bn)
                    n_blk: T.let = _band_count(first, last, M, causal, window, bn)
                    diag: T.let = row + M - N
                    for c in range(d):
                        q_r[c] = T.Cast("float32", Q[b, h, row, c])
                    for c in range(dv):
                        acc[c] = T.float32(0)
                    stat[0] = neg
                    stat[1] = T.float32(0)
                    for jb in range(n_blk):
                        j0: T.let = (blk0 + jb) * bn
                        T.tvm_storage_sync("shared")
                        for e in range((bn * d + bm - 1) // bm):
                            at: T.let = e * bm + tx
                            if at < bn * d:
                                k_s[at // d, at % d] = T.if_then_else(
                                    j0 + at // d < M,
                                    T.Cast("float32", K[b, hk, T.min(j0 + at // d, M - 1), at % d]),
                                    T.float32(0),
                                )
                        for e in range((bn * dv + bm - 1) // bm):
                            at: T.let = e * bm + tx
                            if at < bn * dv:
                                v_s[at // dv, at % dv] = T.if_then_else(
                                    j0 + at // dv < M,
                                    T.Cast(
                                        "float32", V[b, hk, T.min(j0 + at // dv, M - 1), at % dv]
                                    ),
                                    T.float32(0),
                                )
                        T.tvm_storage_sync("shared")
                        stat[2] = neg
                        for j in range(bn):
                            s_r[j] = T.float32(0)
                            for c in range(d):
                                s_r[j] = s_r[j] + q_r[c] * k_s[j, c]
                            s_r[j] = T.Select(
                                _visible(j0 + j - diag, j0 + j, M, causal, window),
                                _score(
                                    spec, s_r[j], MASK, b, h, row, T.min(j0 + j, M - 1), scale, fill
                                ),
                                neg,
                            )
                            stat[2] = T.max(stat[2], s_r[j])
                        stat[2] = T.max(stat[0], stat[2])
                        stat[3] = T.exp2(
                            (stat[0] - T.Select(stat[2] == neg, T.float32(0), stat[2]))
                            * T.float32(exp_unit)
                        )
                        stat[0] = stat[2]
                        stat[2] = T.Select(stat[2] == neg, T.float32(0), stat[2])
                        stat[1] = stat[1] * stat[3]
                        for c in range(dv):
                            acc[c] = acc[c] * stat[3]
                        for j in range(bn):
                            s_r[j] = T.exp2((s_r[j] - stat[2]) * T.float32(exp_unit))
                            stat[1] = stat[1] + s_r[j]
                            for c in range(dv):
                                acc[c] = acc[c] + s_r[j] * v_s[j, c]
                    if i0 + tx < N:
                        for c in range(dv):
                            OUT[b, h, row, c] = T.Cast(
                                dtype,
                                T.Select(stat[1] > T.float32(0), acc[c] / stat[1], T.float32(0)),
                            )
                        LSE[b, h, row] = T.Select(
                            stat[1] > T.float32(0),
                            stat[0] * T.float32(lse_unit) + T.log(stat[1]),
                            neg,
                        )

    return kernel


# ----------------------------------------------------------------------------- config space

PARAMS = {
    "block_m": (16, 24, 32, 48, 64, 96, 128),  # query rows per task
    "rows": (2, 4, 6, 8),  # query rows of a register tile
    "cols": (1, 2, 4),  # key vectors of a Q·Kᵀ register tile
    "key_tiles": (1, 2, 4),  # Q·Kᵀ register tiles per key block: blocks of key_tiles·cols·vec keys
    "vec": (4, 8, 16),  # fp32 lanes per vector
    "pv_cols": (1, 2, 4, 8),  # value-dim vectors of a P·V register tile
    "unroll": (1, 2, 4),  # of the head-dim loop of Q·Kᵀ
    "parallel": (0, 1),  # TVM's pool splits (batch, head) pairs (0) or query tiles (1)
}


def _registers(target: Target) -> int:
    """Vector registers of the target (AVX-512 and AArch64 have 32, AVX2 and SSE 16)."""
    wide = target.vector_bits >= 512 or target.cpu_features & {"neon", "asimd"}
    return 32 if wide else 16


def _keep_cpu(config: Config, target: Target, sig: KernelSignature) -> str | None:
    """None, or why ``config`` cannot run (or would spill registers) on ``target`` for ``sig``."""
    if target.is_gpu:
        return f"target {target.name!r} is a GPU; the CPU kernel's space does not apply"
    value_dim = sig.value_dim or sig.head_dim
    if max(sig.head_dim, value_dim) > MAX_HEAD_DIM:
        return f"head dim {max(sig.head_dim, value_dim)} is above {MAX_HEAD_DIM}"
    bits = 32 * config["vec"]
    if bits > max(target.vector_bits, 128):
        return f"vec={config['vec']} needs {bits}-bit vectors, {target.name!r} has fewer"
    if config["block_m"] % config["rows"]:
        return f"block_m={config['block_m']} is not a multiple of rows={config['rows']}"
    for knob in ("cols", "pv_cols"):
        needed = config["rows"] * config[knob] + config[knob] + 1  # tile, operand row, broadcast
        if needed > _registers(target):
            return f"rows × {knob} needs {needed} vector registers, the target has fewer"
    if value_dim % (config["pv_cols"] * config["vec"]):
        return f"value dim {value_dim} is not a multiple of pv_cols × vec"
    if sig.head_dim % config["unroll"]:
        return f"head dim {sig.head_dim} is not a multiple of unroll={config['unroll']}"
    return None


def _default_cpu(target: Target, sig: KernelSignature) -> Config:
    """Register tiles that fill the target's vector registers, widest vectors that fit."""
    wide = _registers(target) == 32
    # split (batch, head) pairs when there are enough to keep every thread busy; else tiles
    parallel = int(sig.batch * sig.heads < 2 * torch.get_num_threads())
    # long sequences: taller tiles stream each K panel and V block from L2 half as often
    # (n=4096, d=128: 93 ms against 103 ms with 48 rows, one thread)
    block_m = 96 if sig.n >= 1024 else 48
    configs = [
        {
            "block_m": block_m,
            "rows": 6,
            "cols": 4 if wide else 2,
            "key_tiles": 1,
            "vec": vec,
            "pv_cols": pv_cols,
            "unroll": 1,
            "parallel": parallel,
        }
        for vec in (16, 8, 4)
        for pv_cols in (4, 2, 1)
    ]
    return next((c for c in configs if _keep_cpu(c, target, sig) is None), configs[-1])


FORWARD_SPACE = ConfigSpace("tvm.exact.cpu", PARAMS, _keep_cpu, _default_cpu)

CUDA_PARAMS = {
    "block_m": (32, 64, 128),  # threads per block, one query row each
    "block_n": (16, 32, 64),  # keys per shared-memory tile
}
MAX_THREAD_WORDS = 384  # fp32 values a thread keeps (q row, accumulator, scores) before spilling


def _keep_cuda(config: Config, target: Target, sig: KernelSignature) -> str | None:
    """None, or why ``config`` cannot launch (or would spill) on ``target`` for ``sig``."""
    if not target.is_gpu:
        return f"target {target.name!r} is not a GPU"
    value_dim = sig.value_dim or sig.head_dim
    if max(sig.head_dim, value_dim) > MAX_HEAD_DIM:
        return f"head dim {max(sig.head_dim, value_dim)} is above {MAX_HEAD_DIM}"
    if config["block_m"] > target.max_threads_per_block:
        return f"block_m={config['block_m']} threads exceed the block limit"
    smem = 4 * config["block_n"] * (sig.head_dim + value_dim)
    if smem > target.smem_per_block:
        return f"needs {smem // 1024} KiB shared memory, {target.name!r} has less"
    if sig.head_dim + value_dim + config["block_n"] > MAX_THREAD_WORDS:
        return f"a thread would hold over {MAX_THREAD_WORDS} values and spill"
    return None


def _default_cuda(target: Target, sig: KernelSignature) -> Config:
    configs = [{"block_m": 64, "block_n": bn} for bn in (32, 16)]
    return next((c for c in configs if _keep_cuda(c, target, sig) is None), configs[-1])


CUDA_SPACE = ConfigSpace("tvm.exact.cuda", CUDA_PARAMS, _keep_cuda, _default_cuda)


# ----------------------------------------------------------------------------- launcher


@functools.cache
def _has_tvm() -> bool:
    return importlib.util.find_spec("tvm") is not None


@functools.cache
def _cuda_target(index: int) -> Target:
    return dataclasses.replace(detect_cuda(index), backend="tvm-cuda")


def _target(device_type: str, index: int | None) -> Target:
    """The target launches on a device are built for: a GPU's is read once, the CPU's on every
    call (cheap) so that ``ATTNOPT_CPU_TARGET`` can change it."""
    return _cuda_target(index or 0) if device_type == "cuda" else resolve("cpu")


def _space(target: Target) -> ConfigSpace:
    return CUDA_SPACE if target.is_gpu else FORWARD_SPACE


def _mask_kind(mask: torch.Tensor | None, causal: bool, window: int) -> str:
    if mask is not None:
        return "boolean" if mask.dtype == torch.bool else "additive"
    if window > 0:
        return "sliding_window"
    return "causal" if causal else "none"


def _contract(q, k, v, mask) -> str | None:
    """None, or how the inputs break the kernel's contract (the registry then picks another)."""
    if not _has_tvm():
        return "TVM is not installed (pip install apache-tvm)"
    if q.device.type not in ("cpu", "cuda"):
        return f"no TVM kernel for {q.device.type} tensors"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v must share one of {tuple(DTYPES)}, got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be 4-D (B, H, N, D) and (B, Hkv, M, D)"
    (batch, heads, _, d), (kv_batch, kv_heads, _, _) = q.shape, k.shape
    if kv_batch != batch or k.shape[-1] != d or v.shape[:3] != k.shape[:3] or heads % kv_heads:
        shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        return f"{shapes} break the contract (B, H, N, D), (B, Hkv, M, D), H % Hkv == 0"
    if 0 in (*q.shape, *k.shape, *v.shape):
        return "empty inputs (the reference returns them)"
    if mask is not None:
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            return f"mask must be bool or floating point, got {mask.dtype}"
        shape = (*q.shape[:3], k.shape[2])
        if torch.broadcast_shapes(mask.shape, shape) != shape:
            return f"mask {tuple(mask.shape)} does not broadcast to {shape}"
    if q.device.type == "cpu":
        name = DTYPES[q.dtype]
        isas = HALF_ISAS.get(name, frozenset())
        if isas and not _target("cpu", None).cpu_features & isas:
            return f"{name} on CPU needs one of {sorted(isas)} for vector conversions"
    return None


def _signature(q, k, v, mask, causal: bool, window: int) -> KernelSignature:
    return KernelSignature.of(q, k, v, _mask_kind(mask, causal, window))


def supports(q, k, v, mask, causal: bool, window: int) -> str | None:
    """None, or why this kernel cannot run these inputs (the registry then picks another)."""
    try:
        reason = _contract(q, k, v, mask)
    except RuntimeError as err:  # a mask that does not broadcast
        return str(err)
    if reason is not None:
        return reason
    if q.device.type == "cpu" and q.shape[2] < MIN_QUERIES:
        return (
            f"{q.shape[2]} queries (decoding): the K panels the CPU kernel builds per call cost "
            f"more than the reference's matmuls below {MIN_QUERIES} queries"
        )
    target = _target(q.device.type, q.device.index)
    sig = _signature(q, k, v, mask, causal, window)
    config, source = config_for(_space(target), target, sig)
    bad = _space(target).keep(config, target, sig)
    if bad is not None:
        return f"the {source} config {config} cannot run: {bad}"
    work = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
    if q.device.type == "cpu" and work < MIN_WORK:
        return f"{work} scores: below {MIN_WORK} the thread-pool handoff outweighs the kernel"
    return None


def _compact(mask: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous copy of the mask's broadcast source (never of its expanded shape)."""
    source = mask[tuple(slice(0, 1) if st == 0 else slice(None) for st in mask.stride())]
    return source.to(dtype or mask.dtype).contiguous().expand(mask.shape)


def _mask_operand(mask: torch.Tensor | None, q, k) -> tuple[torch.Tensor, dict]:
    """The mask as the kernel reads it and the facts it is specialised on: a view of the user's
    tensor wherever its key axis has stride 1 or 0 (0: one value per query row)."""
    if mask is None:
        return q.new_zeros((1, 1, 1, 1), dtype=torch.float32), {}
    mask = mask.expand(*q.shape[:3], k.shape[2])
    if mask.dtype == torch.bool:
        mask, facts = mask.view(torch.uint8), {"mask": "boolean", "mask_dtype": "uint8"}
    else:
        if mask.dtype not in MASK_DTYPES:  # float64: the reference adds it as fp32 too
            mask = _compact(mask, torch.float32)
        facts = {"mask": "additive", "mask_dtype": MASK_DTYPES[mask.dtype]}
    if mask.shape[-1] == 1:  # one key: any stride reads the same element
        mask = mask.as_strided(mask.shape, (*mask.stride()[:-1], 1))
    elif mask.stride(-1) not in (0, 1):
        mask = _compact(mask)
    return mask, facts | {"mask_key_stride": min(mask.stride(-1), 1)}


def _unit_inner(t: torch.Tensor) -> torch.Tensor:
    """``t`` if its last axis is contiguous (the kernels load rows as vectors), else a copy."""
    t = t.detach()
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


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
    config: Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` as ``reference.exact_attention`` computes them; ``config`` (the tuner's)
    overrides the installed or default one."""
    reason = _contract(q, k, v, mask)
    if reason is not None:
        raise KernelError(reason)
    target = _target(q.device.type, q.device.index)
    space = _space(target)
    sig = _signature(q, k, v, mask, causal, window)
    config = dict(config) if config is not None else config_for(space, target, sig)[0]
    bad = space.keep(config, target, sig)
    if bad is not None:
        raise KernelError(f"config {config} cannot run here: {bad}; pass another or none")
    mask_arg, facts = _mask_operand(mask, q, k)
    spec = Spec(q.shape[-1], v.shape[-1], DTYPES[q.dtype], **facts)
    q, k, v = (_unit_inner(t) for t in (q, k, v))
    batch, heads, n_q, _ = q.shape
    out = q.new_empty(batch, heads, n_q, v.shape[-1])
    lse = q.new_empty(batch, heads, n_q, dtype=torch.float32)
    key = {**asdict(spec), **config}
    if target.is_gpu:
        import tvm_ffi

        function = cache.kernel_function("tvm.exact.cuda", key, target, _cuda_kernel, spec, config)
        with tvm_ffi.use_torch_stream():  # launch on torch's current stream
            function(q, k, v, mask_arg, out, lse, scale, int(causal), max(window, 0), fill)
        return out, lse
    function = cache.kernel_function("tvm.exact.cpu", key, target, _cpu_kernel, spec, config)
    block = config["key_tiles"] * config["cols"] * config["vec"]
    kv_batch, kv_heads, n_k, d = k.shape
    panels = q.new_empty(kv_batch, kv_heads, -(-n_k // block), d, block, dtype=torch.float32)
    function(q, k, v, panels, mask_arg, out, lse, scale, int(causal), max(window, 0), fill)
    return out, lse


TVM_EXACT = register_kernel(
    Kernel(
        variant="exact",
        device_type="cpu",
        name="tvm",
        forward=forward,
        supports=supports,
        priority=10,
    )
)
# Below Triton's kernel (priority 10): a fallback for inputs Triton declines, and a baseline.
TVM_EXACT_CUDA = register_kernel(
    Kernel(
        variant="exact",
        device_type="cuda",
        name="tvm",
        forward=forward,
        supports=supports,
        priority=1,
    )
)
