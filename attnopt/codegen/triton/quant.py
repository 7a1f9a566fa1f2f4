"""Triton kernels for the ``quant`` variant (ALGORITHMS.md §6): the quantization step and the
attention, forward only (the variant has no weights to train).

Follows ``codegen/reference/quant.py``. ``_quantize_kernel`` turns one block of rows of Q or K
into int8 and its scale (K's token mean subtracted first; INT4 Q also subtracts its block mean,
whose scores go back in as a per-key bias). ``_attn_kernel`` is the exact kernel's forward with
the tile walk, band and masks reused from ``triton/exact.py`` (``_diagonals``, ``_band_tiles``,
``_load_tile``, ``_scores``): one query block is one quantization block (``BLOCK_M = block_q``)
and one key tile is one (``BLOCK_N = block_k``), so each tile's dequantization is one scalar;
``tl.dot`` on int8 accumulates in int32. ``P·V`` in fp16 or, on targets with FP8 tensor cores
(``target.has_tensor_cores("fp8")``), in e4m3 with V scaled per channel and P by 448.

Score units as in the exact kernel: log2 e is folded into Q's scale, except with a mask, where
scores stay natural and ``exp2`` takes ``(s - max)·log2 e`` (masks carry ``finfo.min``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnopt.codegen.reference.quant import FP8_MAX, LOG2E, QMAX, smooth_k
from attnopt.codegen.registry import Kernel, register_kernel
from attnopt.codegen.triton.exact import (
    INTERPRETED,
    MAX_HEAD_DIM,
    _band_tiles,
    _diagonals,
    _load_tile,
    _mask_args,
    _pow2,
    _scores,
    _target,
)
from attnopt.errors import KernelError

FP8_SCALE = tl.constexpr(FP8_MAX)  # kernels read globals only as constexpr
# (BLOCK_M = block_q, BLOCK_N = block_k, num_warps, num_stages): SageAttention's block sizes
DEFAULT_CONFIG = (128, 64, 8, 3)


@triton.jit
def _quantize_kernel(
    X,
    Mean,
    Values,
    Scales,
    RowMean,
    stride_xb,
    stride_xh,
    stride_xn,
    stride_xd,
    n,
    scale,
    QMAX_: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    SMOOTH_BLOCK: tl.constexpr,
):
    """One program per (block, head, batch): ``round((x - mean)·scale / s)`` with
    ``s = max|…| / QMAX_`` over the block; ``SMOOTH_BLOCK`` subtracts the block's own mean too
    and stores it in ``RowMean``."""
    blk = tl.program_id(0)
    h = tl.program_id(1)
    heads = tl.num_programs(1)
    b = tl.program_id(2).to(tl.int64)
    bh = b * heads + h
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    x = _load_tile(X + b * stride_xb + h * stride_xh, rows, cols, stride_xn, stride_xd, n, D, True)
    x = x.to(tl.float32)
    inside = (rows[:, None] < n) & (cols[None, :] < D)
    if HAS_MEAN:
        x = x - tl.load(Mean + bh * D + cols, mask=cols < D, other=0.0)[None, :]
    if SMOOTH_BLOCK:
        count = tl.minimum(n - blk * BLOCK, BLOCK)
        mean = tl.sum(tl.where(inside, x, 0.0), 0) / count
        tl.store(RowMean + (bh * tl.num_programs(0) + blk) * D + cols, mean, mask=cols < D)
        x = x - mean[None, :]
    x = tl.where(inside, x * scale, 0.0)
    s = tl.max(tl.max(tl.abs(x), 1), 0) / QMAX_
    s = tl.where(s > 0, s, 1.0)
    y = x / s
    y = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))  # round half away from zero
    y = tl.minimum(tl.maximum(y, -QMAX_), QMAX_)
    tl.store(Values + (bh * n + rows[:, None]) * D + cols[None, :], y.to(tl.int8), mask=inside)
    tl.store(Scales + bh * tl.num_programs(0) + blk, s)


@triton.jit
def _attn_tiles(
    acc,
    l_i,
    m_i,
    q,
    q_scale,
    offs_m,
    lo,
    hi,
    k_ptr,
    ks_ptr,
    v_ptr,
    bias_ptr,
    mask_ptr,
    stride_vn,
    stride_vd,
    stride_mn,
    stride_mm,
    n_q,
    n_k,
    diag_lo,
    diag_hi,
    fill,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EXP_UNIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    STRUCTURED: tl.constexpr,
    MASKED: tl.constexpr,
    FP8_PV: tl.constexpr,
):
    """Online softmax over key tiles ``[lo, hi)`` with int8 scores (``_fwd_tiles`` of the exact
    kernel, the dequantization folded into the score scale)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_ptr, offs_n, offs_d, D, 1, n_k, D, MASKED)
        qk = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
        k_scale = tl.load(ks_ptr + start_n // BLOCK_N)
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
            q_scale * k_scale,
            fill,
            HAS_MASK,
            MASK_IS_BOOL,
            STRUCTURED,
            MASKED,
        )
        if HAS_BIAS:
            s += tl.load(bias_ptr + offs_n, mask=offs_n < n_k, other=0.0)[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2((s - m_sub[:, None]) * EXP_UNIT)
        alpha = tl.exp2((m_i - m_sub) * EXP_UNIT)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptr, offs_n, offs_dv, stride_vn, stride_vd, n_k, DV, MASKED)
        if FP8_PV:  # P by 448 into e4m3's range
            p = p * FP8_SCALE
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, out_dtype=tl.float32)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_kernel(
    Q,
    QS,
    K,
    KS,
    V,
    VS,
    Bias,
    Mask,
    Out,
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
    fill,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    EXP_UNIT: tl.constexpr,
    FP8_PV: tl.constexpr,
):
    """One program per (query block, head, batch); q/k int8 contiguous, their scales per block."""
    blk = tl.program_id(0)
    start_m = blk * BLOCK_M
    h = tl.program_id(1)
    heads = tl.num_programs(1)
    b = tl.program_id(2).to(tl.int64)
    kv_heads = heads // group
    bh = b * heads + h
    bkv = b * kv_heads + h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(Q + bh * n_q * D, offs_m, tl.arange(0, BLOCK_D), D, 1, n_q, D, True)
    q_scale = tl.load(QS + bh * tl.num_programs(0) + blk)
    k_blocks = tl.cdiv(n_k, BLOCK_N)
    bias_ptr = Bias + (bh * tl.num_programs(0) + blk) * n_k

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    diag_lo, diag_hi = _diagonals(n_q, n_k, IS_CAUSAL, WINDOW)
    tiles = _band_tiles(start_m, n_k, diag_lo, diag_hi, BLOCK_M, BLOCK_N)
    for stage in tl.static_range(3):  # masked edge, unmasked middle, masked edge
        acc, l_i, m_i = _attn_tiles(
            acc,
            l_i,
            m_i,
            q,
            q_scale,
            offs_m,
            tiles[stage],
            tiles[stage + 1],
            K + bkv * n_k * D,
            KS + bkv * k_blocks,
            V + b * stride_vb + (h // group) * stride_vh,
            bias_ptr,
            Mask + b * stride_mb + h * stride_mh,
            stride_vn,
            stride_vd,
            stride_mn,
            stride_mm,
            n_q,
            n_k,
            diag_lo,
            diag_hi,
            fill,
            D,
            DV,
            BLOCK_N,
            BLOCK_D,
            BLOCK_DV,
            EXP_UNIT,
            HAS_BIAS,
            HAS_MASK,
            MASK_IS_BOOL,
            IS_CAUSAL or WINDOW > 0,
            stage != 1,
            FP8_PV,
        )
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # every key excluded: 0 output
    offs_dv = tl.arange(0, BLOCK_DV)
    out = acc / l_safe[:, None]
    if FP8_PV:
        out = out * (tl.load(VS + bkv * DV + offs_dv, mask=offs_dv < DV, other=0.0) / FP8_SCALE)
    inside = (offs_m[:, None] < n_q) & (offs_dv[None, :] < DV)
    out_ptrs = Out + (bh * n_q + offs_m[:, None]) * DV + offs_dv[None, :]
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=inside)


# ----------------------------------------------------------------------------- launchers


def quantize(
    x: torch.Tensor,
    block: int,
    bits: int,
    scale: float = 1.0,
    mean: torch.Tensor | None = None,
    smooth_block: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(values int8 (B, H, N, D) contiguous, scales (B, H, blocks), block means or None)``:
    ``x - mean`` (``mean`` ``(B, H, D)``, e.g. K's token mean) quantized per ``block`` rows."""
    batch, heads, n, d = x.shape
    blocks = triton.cdiv(n, block)
    values = torch.empty(batch, heads, n, d, dtype=torch.int8, device=x.device)
    scales = torch.empty(batch, heads, blocks, dtype=torch.float32, device=x.device)
    means = torch.empty(batch, heads, blocks, d, device=x.device) if smooth_block else None
    mean_arg = mean.float().contiguous() if mean is not None else scales
    _quantize_kernel[(blocks, heads, batch)](
        x,
        mean_arg,
        values,
        scales,
        means if means is not None else scales,
        *x.stride(),
        n,
        scale,
        QMAX_=QMAX[bits],
        D=d,
        BLOCK_D=_pow2(d),
        BLOCK=block,
        HAS_MEAN=mean is not None,
        SMOOTH_BLOCK=smooth_block,
    )
    return values, scales, means


def supports(q, k, v, mask, causal: bool, window: int, bits: int, pv: str) -> str | None:
    """None, or why this kernel cannot run these inputs (the reference then runs them)."""
    if q.device.type != "cuda" and not INTERPRETED:
        return "Triton needs a CUDA tensor (or TRITON_INTERPRET=1 set before attnopt is imported)"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[1] % k.shape[1]:
        return "q, k, v must be 4-D (B, H, N, D) and (B, Hkv, M, D), H % Hkv == 0"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dim above {MAX_HEAD_DIM}"
    if bits not in QMAX or pv not in ("fp16", "fp8"):
        return f"bits={bits}, pv={pv!r}: this kernel runs bits 8 or 4 with pv fp16 or fp8"
    target = _target(q.device.type, q.device.index)
    if pv == "fp8" and not target.has_tensor_cores("fp8"):
        return f"pv='fp8' needs FP8 tensor cores, which {target.name!r} lacks"
    if q.device.type == "cuda" and not target.has_tensor_cores("int8"):
        return f"{target.name!r} has no INT8 tensor cores"
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
    fill: float = float("-inf"),
    bits: int = 8,
    pv: str = "fp16",
    block_q: int = DEFAULT_CONFIG[0],
    block_k: int = DEFAULT_CONFIG[1],
) -> torch.Tensor:
    """The quantized attention ``reference.quant_attention`` computes (its block sizes give the
    tile sizes)."""
    reason = supports(q, k, v, mask, causal, window, bits, pv)
    if reason is not None:
        raise KernelError(reason)
    if mask is not None:
        shape = (*q.shape[:3], k.shape[2])
        try:
            mask = mask.expand(shape)
        except RuntimeError as err:
            raise KernelError(f"mask {tuple(mask.shape)} does not broadcast to {shape}") from err
    batch, heads, n_q, d = q.shape
    n_k, group = k.shape[2], q.shape[1] // k.shape[1]
    q_units = scale if mask is not None else scale * LOG2E
    kv, k_scale, _ = quantize(k, block_k, bits, mean=k.float().mean(dim=-2))
    qv, q_scale, q_means = quantize(q, block_q, bits, q_units, smooth_block=bits == 4)
    bias = None
    if q_means is not None:  # INT4: the block means' scores, per key, as the reference
        ks = smooth_k(k).repeat_interleave(group, dim=1)
        bias = (torch.matmul(q_means, ks.transpose(-2, -1)) * q_units).contiguous()
    v_in, v_scale = v.to(torch.float16), None
    if pv == "fp8":
        v_scale = v.float().abs().amax(dim=-2).clamp_min(1e-12) / FP8_MAX
        v_in = (v.float() / v_scale[..., None, :]).to(torch.float8_e4m3fn)
    out = torch.empty(batch, heads, n_q, v.shape[-1], dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    mask_ptr, *mask_strides = _mask_args(mask, q)
    config = DEFAULT_CONFIG if q.device.type == "cuda" else (block_q, block_k, 4, 1)
    _attn_kernel[(triton.cdiv(n_q, block_q), heads, batch)](
        qv,
        q_scale,
        kv,
        k_scale,
        v_in,
        v_scale if v_scale is not None else q_scale,
        bias if bias is not None else q_scale,
        mask_ptr,
        out,
        *v_in.stride(),
        *mask_strides,
        n_q,
        n_k,
        group,
        fill,
        D=d,
        DV=v.shape[-1],
        BLOCK_D=_pow2(d),
        BLOCK_DV=_pow2(v.shape[-1]),
        BLOCK_M=block_q,
        BLOCK_N=block_k,
        IS_CAUSAL=causal,
        WINDOW=window,
        HAS_BIAS=bias is not None,
        HAS_MASK=mask is not None,
        MASK_IS_BOOL=mask is not None and mask.dtype == torch.bool,
        EXP_UNIT=LOG2E if mask is not None else 1.0,
        FP8_PV=pv == "fp8",
        num_warps=config[2],
        num_stages=config[3],
    )
    return out


TRITON_QUANT = register_kernel(
    Kernel(
        variant="quant",
        device_type="cuda",
        name="triton",
        forward=forward,
        supports=supports,
        priority=10,
    )
)
