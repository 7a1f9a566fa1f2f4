"""The CPU ``quant`` kernel: INT8 ``QKᵀ`` on the CPU's integer dot-product units, through
``torch._int_mm`` (oneDNN: AVX-512 VNNI or AMX-INT8 where the CPU has them, ``vpmaddubsw`` on
AVX2), and a softmax blocked by query rows.

Same contract as ``codegen/reference/quant.py`` and its quantization (``quantize_blocks``,
``smooth_k``). Per (batch, head) and block of ``block_q`` query rows, one integer GEMM gives the
scores of every key the block may see (the causal / window band, as the exact kernels' tiles:
masks are applied only on the band's edge strips), then a one-pass softmax in fp32 (the row
holds all its keys, so no rescaling) and ``P·V`` in 16 bits (fp32 accumulation in oneDNN, the
result rounded once to 16 bits; FP8 is emulated: CPUs have no FP8 units).

On CPUs without VNNI or AMX, oneDNN's s8·s8 GEMM runs ``vpmaddubsw`` on ``(a + 128)`` (u8) and
``b`` (s8), whose int16 pair sums saturate past ``2·255·63``: there K (the ``b`` operand) is
quantized to ±63 instead of ±127, read from the target (``Target.int_dot``), so the GEMM stays
exact.

The fused TVM kernel (``codegen/tvm/quant.py``) is selected above this one; this kernel runs
what it declines (INT4, ``pv="fp8"``, small calls and decoding steps, TVM not installed).
"""

from __future__ import annotations

import os

import torch

from attnopt.codegen.reference.quant import (
    FP8_MAX,
    LOG2E,
    PV_DTYPES,
    QMAX,
    quantize_blocks,
    smooth_k,
    smooth_q_blocks,
)
from attnopt.targets import detect_cpu

_FLOOR = torch.finfo(torch.float32).min / 2  # masks floored as in the reference
_TINY = torch.finfo(torch.float32).tiny


def _band(s: int, e: int, m: int, offset: int, causal: bool, window: int) -> tuple[int, ...]:
    """For query rows ``[s, e)``: keys ``[lo, hi)`` any row may see, and ``lo <= full_lo <=
    full_hi <= hi`` with keys in ``[full_lo, full_hi)`` visible to every row (no mask needed)."""
    lo, hi = 0, m
    full_lo, full_hi = 0, m
    if window > 0:
        lo = max(0, s + offset - window + 1)
        full_lo = e - 1 + offset - window + 1
        hi = min(m, e - 1 + offset + window)
        full_hi = s + offset + window
    if causal:
        hi = min(hi, e + offset)
        full_hi = min(full_hi, s + offset + 1)
    hi = max(hi, lo)
    full_lo = min(max(full_lo, lo), hi)
    full_hi = min(max(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


def _edges(scores, s, e, lo, full_lo, full_hi, hi, offset, causal, window) -> None:
    """-inf where the causal / window band excludes a pair, only on the edge strips."""
    rows = torch.arange(s, e)[:, None] + offset
    for a, b in ((lo, full_lo), (full_hi, hi)):
        if b <= a:
            continue
        cols = torch.arange(a, b)[None, :]
        out = torch.zeros(e - s, b - a, dtype=torch.bool)
        if causal:
            out |= cols > rows
        if window > 0:
            out |= (rows - cols).abs() >= window
        scores[:, a - lo : b - lo].masked_fill_(out, float("-inf"))


def quant_attention_cpu(
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
    block_q: int = 128,
    block_k: int = 64,
    k_qmax: int | None = None,
) -> torch.Tensor:
    """Quantized attention with integer GEMMs (see the module docstring); ``k_qmax`` None picks
    K's range for this machine's integer dot product (``saturation_safe_qmax``)."""
    batch, heads, n, _ = q.shape
    kv_heads, m = k.shape[1], k.shape[-2]
    group = heads // kv_heads
    offset = m - n
    ks = smooth_k(k)
    qf = q.float()
    (qv, bias), q_scale = _quantize_q(qf, ks, scale, bits, block_q)
    kv, k_scale = quantize_blocks(ks, block_k, bits, qmax=k_qmax or k_range(bits))
    k_cols = k_scale.repeat_interleave(block_k, dim=-1)[..., :m]  # (B, Hkv, M)
    k_t = kv.transpose(-2, -1)  # column-major (D, M) views: oneDNN's preferred B operand
    v16, v_scale = _pv_operand(v, pv)
    fill = fill if fill == float("-inf") else max(fill, _FLOOR) * LOG2E
    out = torch.empty(batch, heads, n, v.shape[-1], dtype=torch.float32)
    for b in range(batch):
        for h in range(heads):
            hk = h // group
            for j, s in enumerate(range(0, n, block_q)):
                e = min(s + block_q, n)
                lo, full_lo, full_hi, hi = _band(s, e, m, offset, causal, window)
                if hi <= lo:
                    out[b, h, s:e] = 0
                    continue
                # int32 · fp32 promotes: dequantized in the pass that converts
                acc = torch._int_mm(qv[b, h, s:e], k_t[b, hk, :, lo:hi]) * (
                    k_cols[b, hk, lo:hi] * q_scale[b, h, j]
                )
                if bias is not None:
                    acc.add_(bias[b, h, j, lo:hi])
                if mask is not None:
                    part = mask[b, h, s:e, lo:hi]
                    if part.dtype == torch.bool:
                        acc.masked_fill_(~part, fill)
                    else:
                        acc.add_(part.float().clamp_min(_FLOOR).mul_(LOG2E))
                if causal or window > 0:
                    _edges(acc, s, e, lo, full_lo, full_hi, hi, offset, causal, window)
                row_max = acc.amax(dim=-1, keepdim=True)
                row_max.masked_fill_(torch.isinf(row_max), 0.0)
                p = acc.sub_(row_max).exp2_()
                total = p.sum(dim=-1, keepdim=True).clamp_min_(_TINY)
                if v16.dtype == torch.bfloat16:  # fp32's range: divide the output, not P
                    pv_out = torch.matmul(p.to(v16.dtype), v16[b, hk, lo:hi]).float()
                    out[b, h, s:e] = pv_out.div_(total)
                    continue
                # normalised before rounding: rows of P then sum to ≤ 1, so an fp16 product
                # stays within V's range (fp16 sums of thousands of keys would overflow)
                p.div_(total)
                if v_scale is None:
                    out[b, h, s:e] = torch.matmul(p.to(v16.dtype), v16[b, hk, lo:hi]).float()
                else:  # FP8 emulated: P by 448 and V per channel rounded to e4m3, fp32 product
                    p8 = p.mul_(FP8_MAX).to(torch.float8_e4m3fn).float()
                    blk = torch.matmul(p8, v16[b, hk, lo:hi])
                    out[b, h, s:e] = blk.mul_(v_scale[b, hk] / FP8_MAX)
    return out.to(q.dtype)


# ISA caps (``ONEDNN_MAX_CPU_ISA``) under which oneDNN's int8 GEMM has no VNNI/AMX
_NO_VNNI_CAPS = ("SSE41", "AVX", "AVX2")
AVX2_K_QMAX = 63


def k_range(bits: int) -> int:
    """K's quantization range on this machine: ±63 where the int8 GEMM saturates int16 pair
    sums (no VNNI/AMX on the target, or oneDNN capped below them), the full range otherwise."""
    dot = detect_cpu().int_dot
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _NO_VNNI_CAPS
    if bits == 8 and (dot is None or dot[1] in _NO_VNNI_CAPS or capped):
        return AVX2_K_QMAX
    return QMAX[bits]


def _quantize_q(qf, ks, scale: float, bits: int, block_q: int):
    """``((values, bias or None), scales)``: Q quantized per block with ``scale·log2 e``; INT4
    first subtracts each block's mean and returns its scores ``mean·Ksᵀ`` as ``bias``
    ``(B, H, blocks, M)`` (log2 units), as the reference does."""
    bias = None
    if bits == 4:
        qf, bias = smooth_q_blocks(qf, ks, block_q, scale * LOG2E)
    values, scales = quantize_blocks(qf, block_q, bits, scale * LOG2E)
    return (values, bias), scales


def _pv_operand(v: torch.Tensor, pv: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """V in the P·V dtype; for FP8, V scaled per channel to 448 (rounded to e4m3, held in
    fp32) and the scales."""
    if pv != "fp8":
        return v.to(PV_DTYPES[pv]), None
    vf = v.float()
    v_scale = vf.abs().amax(dim=-2).clamp_min(1e-12) / FP8_MAX  # (B, Hkv, Dv)
    v8 = (vf / v_scale[..., None, :]).to(torch.float8_e4m3fn)
    return v8.float(), v_scale


def supports(q, k, v, mask, causal: bool, window: int, bits: int, pv: str) -> str | None:
    if q.device.type != "cpu":
        return "CPU kernel"
    if bits not in QMAX:
        return f"bits={bits}"
    if pv not in (*PV_DTYPES, "fp8"):
        return f"pv={pv!r}: the reference runs it"
    if not hasattr(torch, "_int_mm"):
        return "this torch has no torch._int_mm"
    return None
