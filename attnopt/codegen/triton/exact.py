"""Triton FlashAttention-2 for the ``exact`` variant: forward, backward, config space, launchers.

Follows the contract in ``codegen/reference/exact.py``: q ``(B, H, N, D)``, k/v ``(B, Hkv, M, D)``
read through the kv head ``h // (H // Hkv)``, any strides (0 included), bottom-right causal,
``window``, additive or boolean masks read tile by tile, fully-masked rows giving 0 and ``-inf``.
One kernel per pass (forward, delta, dk/dv, dq), specialised by compile-time flags. Which key
tiles a query tile visits, and which of them need masking, is ``_band_tiles``; the backward's
dk/dv pass uses the same helper with the band mirrored.

Score units: without a mask, scores are in log2 units (``log2 e`` folded into the scale, ``exp2``
directly). With a mask they stay in natural units and ``exp2`` gets ``(s - max)·log2 e``: masks
carry values like ``finfo.min`` that overflow to ``-inf`` once multiplied by ``log2 e``, which
would turn a row that softmax averages uniformly (HF padding: every key at ``finfo.min``) into an
empty one.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from attnopt.autotune.runtime import bucket, config_for
from attnopt.autotune.space import Config, ConfigSpace
from attnopt.codegen.registry import Kernel, register_kernel
from attnopt.codegen.signature import KernelSignature
from attnopt.errors import KernelError
from attnopt.targets import Target, detect_cuda, resolve

LOG2E = tl.constexpr(1.4426950408889634)  # kernels read globals only as constexpr; .value in Python
LN2 = tl.constexpr(0.6931471805599453)
MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Triton picks compiler or interpreter when a function is decorated, its own library included,
# so kernels run on CPU only if TRITON_INTERPRET=1 was set before triton was first imported.
INTERPRETED = bool(triton.knobs.runtime.interpret) and not isinstance(tl.zeros, JITFunction)


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _diagonals(n_q, n_k, IS_CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """The band ``lo <= key - query <= hi`` the causal and window flags allow."""
    offset = n_k - n_q
    lo = -(n_q + n_k)
    hi = n_q + n_k
    if WINDOW > 0:
        lo = offset - WINDOW + 1
        hi = offset + WINDOW - 1
    if IS_CAUSAL:
        hi = offset
    return lo, hi


@triton.jit
def _band_tiles(
    start, n_cols, diag_lo, diag_hi, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr
):
    """Column tiles that rows ``start .. start + BLOCK_ROWS`` visit under the band.

    Returns ``lo <= full_lo <= full_hi``: tiles in ``[lo, full_lo)`` and ``[full_hi, hi)`` need the
    band and bounds masks, tiles in ``[full_lo, full_hi)`` lie wholly inside both. Tiles outside
    ``[lo, hi)`` hold no allowed pair and are skipped (the upper triangle when causal).
    """
    last = start + BLOCK_ROWS - 1
    lo = tl.maximum(start + diag_lo, 0) // BLOCK_COLS * BLOCK_COLS
    hi = tl.maximum(tl.minimum(last + diag_hi + 1, n_cols), lo)
    full_lo = (tl.maximum(last + diag_lo, lo) + BLOCK_COLS - 1) // BLOCK_COLS * BLOCK_COLS
    full_lo = tl.minimum(full_lo, (hi + BLOCK_COLS - 1) // BLOCK_COLS * BLOCK_COLS)
    full_hi = tl.minimum(start + diag_hi + 1, n_cols) // BLOCK_COLS * BLOCK_COLS
    full_hi = tl.maximum(full_hi, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _load_tile(
    ptr, rows, cols, stride_r, stride_c, n_rows, N_COLS: tl.constexpr, CHECK_ROWS: tl.constexpr
):
    """A ``rows × cols`` tile, zero outside the tensor; rows checked only where tiles overhang."""
    inside = cols[None, :] < N_COLS
    if CHECK_ROWS:
        inside = inside & (rows[:, None] < n_rows)
    ptrs = ptr + rows[:, None] * stride_r + cols[None, :] * stride_c
    return tl.load(ptrs, mask=inside, other=0.0)


@triton.jit
def _scores(
    qk,
    q_idx,
    k_idx,
    n_q,
    n_k,
    diag_lo,
    diag_hi,
    mask_ptr,
    stride_mn,
    stride_mm,
    score_scale,
    fill,
    HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    STRUCTURED: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Scaled scores of one tile with the site's masks; ``q_idx``/``k_idx`` broadcast to the tile
    (queries down and keys across in the forward and dq passes, transposed in dk/dv)."""
    s = qk * score_scale
    if HAS_MASK:
        inside = (q_idx < n_q) & (k_idx < n_k)
        vals = tl.load(mask_ptr + q_idx * stride_mn + k_idx * stride_mm, mask=inside, other=0)
        s = tl.where(vals, s, fill) if MASK_IS_BOOL else s + vals.to(tl.float32)
    if MASKED:
        keep = (q_idx < n_q) & (k_idx < n_k)
        if STRUCTURED:
            band = k_idx - q_idx
            keep = keep & (band >= diag_lo) & (band <= diag_hi)
        s = tl.where(keep, s, float("-inf"))
    return s


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_tiles(
    acc,
    l_i,
    m_i,
    q,
    offs_m,
    lo,
    hi,
    k_ptr,
    v_ptr,
    mask_ptr,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_mn,
    stride_mm,
    n_q,
    n_k,
    diag_lo,
    diag_hi,
    score_scale,
    fill,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EXP_UNIT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    STRUCTURED: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over key tiles ``[lo, hi)``: the inner loop of FlashAttention-2."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_ptr, offs_n, offs_d, stride_kn, stride_kd, n_k, D, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = _scores(
            qk,
            offs_m[:, None],
            offs_n[None, :],
            n_q,
            n_k,
            diag_lo,
            diag_hi,
            mask_ptr,
            stride_mn,
            stride_mm,
            score_scale,
            fill,
            HAS_MASK,
            MASK_IS_BOOL,
            STRUCTURED,
            MASKED,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
        p = tl.exp2((s - m_sub[:, None]) * EXP_UNIT)
        alpha = tl.exp2((m_i - m_sub) * EXP_UNIT)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptr, offs_n, offs_dv, stride_vn, stride_vd, n_k, DV, MASKED)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    Mask,
    Out,
    Lse,
    FQ,
    PZ,
    Pz,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_fb,
    stride_fh,
    stride_fn,
    stride_fd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_mn,
    stride_mm,
    n_q,
    n_k,
    group,
    score_scale,
    fill,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    EXP_UNIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    DF: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """One program per (query tile, head, batch): ``out`` and natural-log ``lse`` of its rows
    (``lse`` over the keys only). ``HAS_PREFIX``: the prefix terms ``φ(q)ᵀZ``, ``φ(q)ᵀz`` of
    prefix_ntk join numerator and denominator before the division (``_prefix_epilogue``)."""
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    heads = tl.num_programs(1)
    b = tl.program_id(2).to(tl.int64)
    kv_h = h // group
    q_ptr = Q + b * stride_qb + h * stride_qh
    k_ptr = K + b * stride_kb + kv_h * stride_kh
    v_ptr = V + b * stride_vb + kv_h * stride_vh
    mask_ptr = Mask + b * stride_mb + h * stride_mh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(q_ptr, offs_m, tl.arange(0, BLOCK_D), stride_qn, stride_qd, n_q, D, True)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    diag_lo, diag_hi = _diagonals(n_q, n_k, IS_CAUSAL, WINDOW)
    tiles = _band_tiles(start_m, n_k, diag_lo, diag_hi, BLOCK_M, BLOCK_N)
    for stage in tl.static_range(3):  # masked edge, unmasked middle, masked edge
        acc, l_i, m_i = _fwd_tiles(
            acc,
            l_i,
            m_i,
            q,
            offs_m,
            tiles[stage],
            tiles[stage + 1],
            k_ptr,
            v_ptr,
            mask_ptr,
            stride_kn,
            stride_kd,
            stride_vn,
            stride_vd,
            stride_mn,
            stride_mm,
            n_q,
            n_k,
            diag_lo,
            diag_hi,
            score_scale,
            fill,
            D,
            DV,
            BLOCK_N,
            BLOCK_D,
            BLOCK_DV,
            EXP_UNIT,
            HAS_MASK,
            MASK_IS_BOOL,
            IS_CAUSAL or WINDOW > 0,
            stage != 1,
            DOT_PRECISION,
        )

    empty = l_i == 0.0  # every key excluded: 0 output, -inf lse
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), m_i * (LN2 * EXP_UNIT) + tl.log(l_safe))
    row = (b * heads + h) * n_q
    tl.store(Lse + row + offs_m, lse, mask=offs_m < n_q)
    offs_dv = tl.arange(0, BLOCK_DV)
    if HAS_PREFIX:
        fq_ptr = FQ + b * stride_fb + h * stride_fh
        out = _prefix_epilogue(
            acc, l_i, m_i * (LN2 * EXP_UNIT), fq_ptr, PZ + h * DF * DV, Pz + h * DF, offs_m,
            offs_dv, stride_fn, stride_fd, n_q, DF, DV, BLOCK_F, DOT_PRECISION,
        )  # fmt: skip
    else:
        out = acc / l_safe[:, None]
    out_ptrs = Out + (row + offs_m[:, None]) * DV + offs_dv[None, :]
    inside = (offs_m[:, None] < n_q) & (offs_dv[None, :] < DV)
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=inside)


@triton.jit
def _prefix_epilogue(
    acc,
    l_i,
    c,
    fq_ptr,
    z_mat_ptr,
    z_vec_ptr,
    offs_m,
    offs_dv,
    stride_fn,
    stride_fd,
    n_q,
    DF: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_F: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """prefix_ntk's epilogue (ALGORITHMS.md §5): ``(acc·e^{c−c'} + e^{−c'}·φᵀZ) / (ℓ·e^{c−c'}
    + e^{−c'}·max(φᵀz, 0))`` with ``c`` the row max (natural units) and ``c' = max(c, 0)``, so
    no exponent is positive; a row with no visible key (``c = −inf``) reads the prefix alone.
    ``Z`` ``(DF, DV)`` and ``z`` ``(DF,)`` are this head's, fp32 and contiguous."""
    offs_f = tl.arange(0, BLOCK_F)
    fq = _load_tile(fq_ptr, offs_m, offs_f, stride_fn, stride_fd, n_q, DF, True)
    z_mat = _load_tile(z_mat_ptr, offs_f, offs_dv, DV, 1, DF, DV, True)
    z_vec = tl.load(z_vec_ptr + offs_f, mask=offs_f < DF, other=0.0)
    numerator = tl.dot(fq, z_mat, input_precision=DOT_PRECISION)
    mass = tl.maximum(tl.sum(fq * z_vec[None, :], 1), 0.0)
    shift = tl.maximum(c, 0.0)
    inside = tl.exp(c - shift)  # 0 where c = -inf
    outside = tl.exp(-shift)
    numerator = acc * inside[:, None] + numerator * outside[:, None]
    denominator = tl.maximum(l_i * inside + mass * outside, 1.1754943508222875e-38)
    return numerator / denominator[:, None]


# ----------------------------------------------------------------------------- backward


@triton.jit
def _delta_kernel(
    Out,
    dOut,
    Delta,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    stride_gb,
    stride_gh,
    stride_gn,
    stride_gd,
    n_q,
    DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """``delta = rowsum(dO · O)``: the softmax-gradient term both backward passes subtract."""
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o_ptr = Out + b * stride_ob + h * stride_oh
    g_ptr = dOut + b * stride_gb + h * stride_gh
    o = _load_tile(o_ptr, offs_m, offs_dv, stride_on, stride_od, n_q, DV, True)
    do = _load_tile(g_ptr, offs_m, offs_dv, stride_gn, stride_gd, n_q, DV, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = (b * tl.num_programs(1) + h) * n_q
    tl.store(Delta + row + offs_m, delta, mask=offs_m < n_q)


@triton.jit
def _row_stats(lse_ptr, delta_ptr, offs_m, n_q, EXP_UNIT: tl.constexpr):
    """A query tile's lse in score units (``+inf`` for empty rows, so their p is 0) and delta."""
    lse = tl.load(lse_ptr + offs_m, mask=offs_m < n_q, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse * (LOG2E / EXP_UNIT))
    delta = tl.load(delta_ptr + offs_m, mask=offs_m < n_q, other=0.0)
    return lse, delta


@triton.jit
def _dkdv_tiles(
    dk,
    dv,
    k,
    v,
    offs_n,
    lo,
    hi,
    q_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    renorm_ptr,
    mask_ptr,
    stride_qn,
    stride_qd,
    stride_gn,
    stride_gd,
    stride_mn,
    stride_mm,
    n_q,
    n_k,
    diag_lo,
    diag_hi,
    score_scale,
    fill,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EXP_UNIT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    STRUCTURED: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Add one query head's query tiles ``[lo, hi)`` to a key tile's dv and (unscaled) dk."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_ptr, offs_m, offs_d, stride_qn, stride_qd, n_q, D, MASKED)
        do = _load_tile(do_ptr, offs_m, offs_dv, stride_gn, stride_gd, n_q, DV, MASKED)
        lse, delta = _row_stats(lse_ptr, delta_ptr, offs_m, n_q, EXP_UNIT)
        renorm = tl.load(renorm_ptr + offs_m, mask=offs_m < n_q, other=0.0)
        s_t = _scores(
            tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION),
            offs_m[None, :],
            offs_n[:, None],
            n_q,
            n_k,
            diag_lo,
            diag_hi,
            mask_ptr,
            stride_mn,
            stride_mm,
            score_scale,
            fill,
            HAS_MASK,
            MASK_IS_BOOL,
            STRUCTURED,
            MASKED,
        )
        p_t = tl.exp2((s_t - lse[None, :]) * EXP_UNIT) * renorm[None, :]
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q,
    K,
    V,
    Mask,
    dOut,
    Lse,
    Delta,
    Renorm,
    dK,
    dV,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_mn,
    stride_mm,
    stride_gb,
    stride_gh,
    stride_gn,
    stride_gd,
    n_q,
    n_k,
    group,
    score_scale,
    sm_scale,
    fill,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    EXP_UNIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per (key tile, kv head, batch); it loops over the ``group`` query heads that
    share the kv head, so GQA needs no atomics and no per-query-head dk/dv buffers."""
    start_n = tl.program_id(0) * BLOCK_N
    kv_h = tl.program_id(1)
    kv_heads = tl.num_programs(1)
    b = tl.program_id(2).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ptr = K + b * stride_kb + kv_h * stride_kh
    v_ptr = V + b * stride_vb + kv_h * stride_vh
    k = _load_tile(k_ptr, offs_n, offs_d, stride_kn, stride_kd, n_k, D, True)
    v = _load_tile(v_ptr, offs_n, offs_dv, stride_vn, stride_vd, n_k, DV, True)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    diag_lo, diag_hi = _diagonals(n_q, n_k, IS_CAUSAL, WINDOW)
    tiles = _band_tiles(start_n, n_q, -diag_hi, -diag_lo, BLOCK_N, BLOCK_M)  # band mirrored
    for g in range(group):
        h = kv_h * group + g
        row = (b * kv_heads * group + h) * n_q
        for stage in tl.static_range(3):
            dk, dv = _dkdv_tiles(
                dk,
                dv,
                k,
                v,
                offs_n,
                tiles[stage],
                tiles[stage + 1],
                Q + b * stride_qb + h * stride_qh,
                dOut + b * stride_gb + h * stride_gh,
                Lse + row,
                Delta + row,
                Renorm + row,
                Mask + b * stride_mb + h * stride_mh,
                stride_qn,
                stride_qd,
                stride_gn,
                stride_gd,
                stride_mn,
                stride_mm,
                n_q,
                n_k,
                diag_lo,
                diag_hi,
                score_scale,
                fill,
                D,
                DV,
                BLOCK_M,
                BLOCK_D,
                BLOCK_DV,
                EXP_UNIT,
                HAS_MASK,
                MASK_IS_BOOL,
                IS_CAUSAL or WINDOW > 0,
                stage != 1,
                DOT_PRECISION,
            )

    out_row = (b * kv_heads + kv_h) * n_k + offs_n[:, None]
    keys = offs_n[:, None] < n_k
    tl.store(
        dK + out_row * D + offs_d[None, :],
        (dk * sm_scale).to(dK.dtype.element_ty),
        mask=keys & (offs_d[None, :] < D),
    )
    tl.store(
        dV + out_row * DV + offs_dv[None, :],
        dv.to(dV.dtype.element_ty),
        mask=keys & (offs_dv[None, :] < DV),
    )


@triton.jit
def _dq_tiles(
    dq,
    rowsum,
    q,
    do,
    lse,
    delta,
    offs_m,
    lo,
    hi,
    k_ptr,
    v_ptr,
    mask_ptr,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_mn,
    stride_mm,
    n_q,
    n_k,
    diag_lo,
    diag_hi,
    score_scale,
    fill,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EXP_UNIT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    STRUCTURED: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Add key tiles ``[lo, hi)`` to a query tile's (unscaled) dq and to the rows' sum of p."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_ptr, offs_n, offs_d, stride_kn, stride_kd, n_k, D, MASKED)
        v = _load_tile(v_ptr, offs_n, offs_dv, stride_vn, stride_vd, n_k, DV, MASKED)
        s = _scores(
            tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION),
            offs_m[:, None],
            offs_n[None, :],
            n_q,
            n_k,
            diag_lo,
            diag_hi,
            mask_ptr,
            stride_mn,
            stride_mm,
            score_scale,
            fill,
            HAS_MASK,
            MASK_IS_BOOL,
            STRUCTURED,
            MASKED,
        )
        p = tl.exp2((s - lse[:, None]) * EXP_UNIT)
        rowsum += tl.sum(p, 1)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq, rowsum


@triton.jit
def _dq_kernel(
    Q,
    K,
    V,
    Mask,
    dOut,
    Lse,
    Delta,
    dQ,
    Renorm,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_mn,
    stride_mm,
    stride_gb,
    stride_gh,
    stride_gn,
    stride_gd,
    n_q,
    n_k,
    group,
    score_scale,
    sm_scale,
    fill,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    EXP_UNIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per (query tile, head, batch), visiting the key tiles the forward visited.

    ``p = exp(s - lse)`` sums to 1 over a row unless ``lse`` lost its low bits: a row whose every
    key carries a finite ``finfo.min`` has ``lse = finfo.min + log(l)``, which rounds to
    ``finfo.min``. The row sum comes free here, so dq is divided by it and ``Renorm`` keeps its
    inverse for the dk/dv pass.
    """
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    heads = tl.num_programs(1)
    b = tl.program_id(2).to(tl.int64)
    kv_h = h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(
        Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qn, stride_qd, n_q, D, True
    )
    do = _load_tile(
        dOut + b * stride_gb + h * stride_gh,
        offs_m,
        tl.arange(0, BLOCK_DV),
        stride_gn,
        stride_gd,
        n_q,
        DV,
        True,
    )
    row = (b * heads + h) * n_q
    lse, delta = _row_stats(Lse + row, Delta + row, offs_m, n_q, EXP_UNIT)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    rowsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    diag_lo, diag_hi = _diagonals(n_q, n_k, IS_CAUSAL, WINDOW)
    tiles = _band_tiles(start_m, n_k, diag_lo, diag_hi, BLOCK_M, BLOCK_N)
    for stage in tl.static_range(3):
        dq, rowsum = _dq_tiles(
            dq,
            rowsum,
            q,
            do,
            lse,
            delta,
            offs_m,
            tiles[stage],
            tiles[stage + 1],
            K + b * stride_kb + kv_h * stride_kh,
            V + b * stride_vb + kv_h * stride_vh,
            Mask + b * stride_mb + h * stride_mh,
            stride_kn,
            stride_kd,
            stride_vn,
            stride_vd,
            stride_mn,
            stride_mm,
            n_q,
            n_k,
            diag_lo,
            diag_hi,
            score_scale,
            fill,
            D,
            DV,
            BLOCK_N,
            BLOCK_D,
            BLOCK_DV,
            EXP_UNIT,
            HAS_MASK,
            MASK_IS_BOOL,
            IS_CAUSAL or WINDOW > 0,
            stage != 1,
            DOT_PRECISION,
        )

    renorm = 1.0 / tl.where(rowsum == 0.0, 1.0, rowsum)  # empty rows: p and dq are 0
    tl.store(Renorm + row + offs_m, renorm, mask=offs_m < n_q)
    inside = (offs_m[:, None] < n_q) & (offs_d[None, :] < D)
    tl.store(
        dQ + (row + offs_m[:, None]) * D + offs_d[None, :],
        (dq * (sm_scale * renorm[:, None])).to(dQ.dtype.element_ty),
        mask=inside,
    )


# ----------------------------------------------------------------------------- config space

PARAMS = {
    "BLOCK_M": (16, 32, 64, 128),
    "BLOCK_N": (16, 32, 64, 128),
    "num_warps": (2, 4, 8),
    "num_stages": (1, 2, 3, 4),
}
MAX_REGISTERS = 255  # per thread, the hardware limit; beyond it a kernel spills
INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
# Tried in order by the default; the first that ``keep`` accepts wins (FA-2's own choices first).
PREFERRED = {
    "forward": (
        (128, 64, 4, 3),
        (128, 64, 8, 3),
        (128, 32, 4, 3),
        (64, 64, 4, 3),
        (64, 32, 4, 2),
        (32, 64, 4, 3),
        (32, 32, 4, 2),
        (16, 64, 4, 3),  # decoding: a query tile of at most 16 rows
        (16, 32, 4, 2),
        (16, 16, 2, 1),
    ),
    "backward": (
        (32, 128, 8, 3),
        (32, 64, 8, 3),
        (32, 64, 4, 3),
        (16, 64, 4, 2),
        (16, 32, 8, 2),
        (16, 16, 2, 1),
    ),
}


def _pow2(dim: int) -> int:
    """The register width of a head dim: a power of two, at least 16 (the smallest dot)."""
    return max(16, triton.next_power_of_2(dim))


def _footprint(config: Config, sig: KernelSignature, backward: bool) -> tuple[int, int]:
    """Estimated shared-memory bytes and 32-bit registers per thread of one program.

    The forward owns a ``BLOCK_M`` query tile and streams ``BLOCK_N`` key/value tiles through
    ``num_stages`` buffers. In the backward a program owns ``BLOCK_N`` rows (keys for dk/dv,
    queries for dq) with two fp32 accumulators and streams ``BLOCK_M`` tiles, as in FA-2, with
    their lse, delta and renorm rows. Shared memory matches what the compiler allots for sm_90
    (an upper bound with 2 warps); the register weights are fitted to ptxas counts of sm_90
    builds (fp16, head dims 64 and 128): configs above ``MAX_REGISTERS`` spilled over 64 bytes.
    """
    elem = 4 if sig.dtype == "float32" else 2
    operand = elem / 4  # registers per 16- or 32-bit element
    mask_elem = {"additive": elem, "boolean": 1}.get(sig.mask_kind, 0)
    d, dv = _pow2(sig.head_dim), _pow2(sig.value_dim or sig.head_dim)
    own, step = config["BLOCK_M"], config["BLOCK_N"]
    stages = config["num_stages"]
    if backward:
        own, step = step, own
        smem = elem * (own + stages * step) * (d + dv) + 16 * stages * step
        words = (1 + operand) * own * (d + dv) + 4 * operand * step * (d + dv) + 3 * own * step
    else:
        smem = elem * (own * d + stages * step * (d + dv))
        words = own * dv + operand * own * d + 1.5 * own * step
    smem += mask_elem * stages * own * step
    return smem, int(words) // (32 * config["num_warps"])


def _keep(config: Config, target: Target, sig: KernelSignature, backward: bool) -> str | None:
    """None, or why ``config`` cannot launch (or would spill) on ``target`` for ``sig``."""
    if not target.is_gpu:
        return f"target {target.name!r} is not a GPU"
    if sig.dtype == "bfloat16" and (target.compute_capability or (0, 0)) < (8, 0):
        return f"bfloat16 needs compute capability 8.0, {target.name!r} has less"
    if max(sig.head_dim, sig.value_dim or 0) > MAX_HEAD_DIM:
        return f"head dim above {MAX_HEAD_DIM}"
    longest = max(16, bucket(max(sig.n, sig.m)))
    lengths = (longest, longest) if backward else (max(16, bucket(sig.n)), max(16, bucket(sig.m)))
    for name, length in zip(("BLOCK_M", "BLOCK_N"), lengths, strict=True):
        if config[name] > length:
            return f"{name}={config[name]} is longer than the padded sequence ({length})"
    smem, registers = _footprint(config, sig, backward)
    if smem > target.smem_per_block:
        limit = target.smem_per_block // 1024
        return f"needs ~{smem // 1024} KiB shared memory, {target.name!r} has {limit}"
    if registers > MAX_REGISTERS:
        return f"needs ~{registers} registers per thread (limit {MAX_REGISTERS})"
    return None


def _space(pass_name: str) -> ConfigSpace:
    """The config space of one pass: the shared knobs, its footprint rule and its default."""
    backward = pass_name == "backward"
    keep = functools.partial(_keep, backward=backward)

    def default(target: Target, sig: KernelSignature) -> Config:
        if not target.is_gpu:  # the interpreter: fewer, larger tiles run faster
            return dict(INTERPRETER_CONFIG)
        configs = [dict(zip(PARAMS, values, strict=True)) for values in PREFERRED[pass_name]]
        return next((c for c in configs if keep(c, target, sig) is None), configs[-1])

    return ConfigSpace(f"triton.exact.{pass_name}", PARAMS, keep, default)


FORWARD_SPACE = _space("forward")
BACKWARD_SPACE = _space("backward")


# ----------------------------------------------------------------------------- launchers


@functools.cache
def _target(device_type: str, index: int | None) -> Target:
    """The target launches on a device are configured for, read once per device."""
    return detect_cuda(index or 0) if device_type == "cuda" else resolve("cpu")


def _mask_kind(mask: torch.Tensor | None, causal: bool, window: int) -> str:
    if mask is not None:
        return "boolean" if mask.dtype == torch.bool else "additive"
    if window > 0:
        return "sliding_window"
    return "causal" if causal else "none"


def supports(q, k, v, mask, causal: bool, window: int) -> str | None:
    """None, or why this kernel cannot run these inputs (the registry then picks another)."""
    if q.device.type != "cuda" and not INTERPRETED:
        return "Triton needs a CUDA tensor (or TRITON_INTERPRET=1 set before attnopt is imported)"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v must share one of {DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}"
    if INTERPRETED and q.dtype == torch.bfloat16:  # triton-lang/triton#11584
        return "Triton's interpreter multiplies the raw bits of bfloat16 in tl.dot"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be 4-D (B, H, N, D) and (B, Hkv, M, D)"
    (batch, heads, _, d), (kv_batch, kv_heads, _, _) = q.shape, k.shape
    if kv_batch != batch or k.shape[-1] != d or v.shape[:3] != k.shape[:3] or heads % kv_heads:
        shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        return f"{shapes} break the contract (B, H, N, D), (B, Hkv, M, D), H % Hkv == 0"
    if max(d, v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dim {max(d, v.shape[-1])} is above {MAX_HEAD_DIM}"
    if mask is not None and mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        return f"mask must be bool or floating point, got {mask.dtype}"
    target = _target(q.device.type, q.device.index)
    old_gpu = (target.compute_capability or (0, 0)) < (8, 0)
    if q.device.type == "cuda" and q.dtype == torch.bfloat16 and old_gpu:
        return f"bfloat16 needs compute capability 8.0, {target.name!r} has less"
    return None


def _checked_mask(q, k, v, mask) -> torch.Tensor | None:
    """Raise on inputs outside the contract; the mask as a (B, H, N, M) view (never a copy)."""
    reason = supports(q, k, v, mask, False, 0)
    if reason is not None:
        raise KernelError(reason)
    if mask is None:
        return None
    shape = (*q.shape[:3], k.shape[2])
    try:
        return mask.expand(shape)
    except RuntimeError as err:
        raise KernelError(f"mask {tuple(mask.shape)} does not broadcast to {shape}") from err


def _config(space: ConfigSpace, q, k, v, mask, causal: bool, window: int) -> Config:
    sig = KernelSignature.of(q, k, v, _mask_kind(mask, causal, window))
    config, _ = config_for(space, _target(q.device.type, q.device.index), sig)
    return config


def _shared_args(q, k, v, mask, scale: float, causal: bool, window: int, fill: float) -> dict:
    """Scalars and compile-time flags every pass of one call takes, by kernel argument name."""
    fp32_dot = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return dict(
        n_q=q.shape[2],
        n_k=k.shape[2],
        group=q.shape[1] // k.shape[1],
        score_scale=scale if mask is not None else scale * LOG2E.value,
        fill=fill,
        D=q.shape[-1],
        DV=v.shape[-1],
        BLOCK_D=_pow2(q.shape[-1]),
        BLOCK_DV=_pow2(v.shape[-1]),
        IS_CAUSAL=causal,
        WINDOW=window,
        HAS_MASK=mask is not None,
        MASK_IS_BOOL=mask is not None and mask.dtype == torch.bool,
        EXP_UNIT=LOG2E.value if mask is not None else 1.0,
        DOT_PRECISION=fp32_dot if q.dtype == torch.float32 else "tf32",
    )


def _mask_args(mask: torch.Tensor | None, q: torch.Tensor) -> tuple:
    """The mask pointer and strides; without a mask, q stands in (HAS_MASK compiles reads out)."""
    return (q, 0, 0, 0, 0) if mask is None else (mask, *mask.stride())


def _prefix_args(q, v, prefix) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``φ(q)`` (fp32, any strides), ``Z``, ``z`` (fp32, contiguous) of a prefix; without one, q
    stands in for all three (``HAS_PREFIX`` compiles their reads out)."""
    if prefix is None:
        return q, q, q
    fq, z_mat, z_vec = prefix
    heads, dim = q.shape[1], fq.shape[-1]
    if fq.shape != (*q.shape[:3], dim) or z_mat.shape != (heads, dim, v.shape[-1]):
        raise KernelError(
            f"prefix terms φ(q) {tuple(fq.shape)}, Z {tuple(z_mat.shape)} do not fit q "
            f"{tuple(q.shape)}, v {tuple(v.shape)}: want (B, H, N, D') and (H, D', Dv)"
        )
    if z_vec.shape != (heads, dim) or dim > MAX_HEAD_DIM:
        raise KernelError(f"z {tuple(z_vec.shape)} must be (H, D') = ({heads}, {dim}), D' <= 256")
    return fq.float(), z_mat.float().contiguous(), z_vec.float().contiguous()


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float,
    causal: bool = False,
    window: int = 0,
    fill: float = float("-inf"),
    config: Config | None = None,
    prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` as ``reference.exact_attention`` computes them; ``config`` (the tuner's)
    overrides the installed or default one. ``prefix``: ``(φ(q), Z, z)`` of prefix_ntk
    (``codegen/reference/prefix_ntk.py``), added in the epilogue; ``lse`` stays the keys'."""
    mask = _checked_mask(q, k, v, mask)
    fq, z_mat, z_vec = _prefix_args(q, v, prefix)
    batch, heads, n_q, _ = q.shape
    out = q.new_empty(batch, heads, n_q, v.shape[-1])
    lse = q.new_empty(batch, heads, n_q, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    config = config or _config(FORWARD_SPACE, q, k, v, mask, causal, window)
    mask_ptr, *mask_strides = _mask_args(mask, q)
    _fwd_kernel[(triton.cdiv(n_q, config["BLOCK_M"]), heads, batch)](
        q,
        k,
        v,
        mask_ptr,
        out,
        lse,
        fq,
        z_mat,
        z_vec,
        *q.stride(),
        *fq.stride(),
        *k.stride(),
        *v.stride(),
        *mask_strides,
        **_shared_args(q, k, v, mask, scale, causal, window, fill),
        HAS_PREFIX=prefix is not None,
        DF=fq.shape[-1],
        BLOCK_F=_pow2(fq.shape[-1]),
        BLOCK_M=config["BLOCK_M"],
        BLOCK_N=config["BLOCK_N"],
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return out, lse


def backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    causal: bool = False,
    window: int = 0,
    fill: float = float("-inf"),
    config: Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of ``forward``; no mask gradient (the op uses the reference for that)."""
    mask = _checked_mask(q, k, v, mask)
    batch, heads, n_q, _ = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    dq, dk, dv = (t.new_empty(t.shape) for t in (q, k, v))  # contiguous, whatever t's strides
    if dq.numel() == 0 or dk.numel() == 0:  # no queries or no keys: nothing flows back
        return dq.zero_(), dk.zero_(), dv.zero_()
    config = config or _config(BACKWARD_SPACE, q, k, v, mask, causal, window)
    own, step = config["BLOCK_N"], config["BLOCK_M"]
    shared = _shared_args(q, k, v, mask, scale, causal, window, fill)
    lse = lse.contiguous()
    delta, renorm = torch.empty_like(lse), torch.empty_like(lse)
    _delta_kernel[(triton.cdiv(n_q, own), heads, batch)](
        out,
        grad_out,
        delta,
        *out.stride(),
        *grad_out.stride(),
        n_q,
        DV=shared["DV"],
        BLOCK_M=own,
        BLOCK_DV=shared["BLOCK_DV"],
    )
    mask_ptr, *mask_strides = _mask_args(mask, q)
    inputs = (q, k, v, mask_ptr, grad_out, lse, delta)
    strides = (*q.stride(), *k.stride(), *v.stride(), *mask_strides, *grad_out.stride())
    launch = dict(num_warps=config["num_warps"], num_stages=config["num_stages"], **shared)
    _dq_kernel[(triton.cdiv(n_q, own), heads, batch)](  # first: it writes renorm
        *inputs, dq, renorm, *strides, sm_scale=scale, BLOCK_M=own, BLOCK_N=step, **launch
    )
    _dkdv_kernel[(triton.cdiv(n_k, own), kv_heads, batch)](
        *inputs, renorm, dk, dv, *strides, sm_scale=scale, BLOCK_M=step, BLOCK_N=own, **launch
    )
    return dq, dk, dv


TRITON_EXACT = register_kernel(
    Kernel(
        variant="exact",
        device_type="cuda",
        name="triton",
        forward=forward,
        backward=backward,
        supports=supports,
        priority=10,
    )
)
