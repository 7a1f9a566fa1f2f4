"""Plain-torch 8-bit / 4-bit attention (SageAttention style, ALGORITHMS.md §6): the oracle the
quant kernels are tested against, and the fallback.

Same contract as ``reference/exact.py`` (shapes, GQA, masks, ``causal``, ``window``, fill,
fully-masked rows giving 0) and, per call:

- K is smoothed: the token mean of K per batch and kv head is subtracted. Every score of a row
  moves by the same ``q·mean``, so the softmax is unchanged; only the quantization error shrinks.
- Q is quantized per ``block_q`` rows, K per ``block_k`` rows: ``scale = max|x| / qmax`` with
  ``qmax`` 127 (INT8) or 7 (INT4, values kept in int8 storage). The softmax scale and ``log2 e``
  are folded into Q's scale, so ``int32(Q_q·K_qᵀ)·q_scale·k_scale`` is the score in log2 units.
- INT4 also smooths Q per block: the block mean's scores ``mean_q·Kᵀ`` go back in as a per-key
  bias computed in fp32 (a per-key term does change the softmax, so it must be added back).
- Online softmax in fp32 over key blocks; ``P·V`` in fp16 (``pv="fp16"``), bf16 (``"bf16"``),
  FP8 e4m3 (``"fp8"``: V scaled per channel to 448, P by 448), accumulated in fp32, or in
  integers (``"int8"``, the CPU's 8-bit P·V, see ``int8_values``): P of each key block taken
  against that block's own row max, ``round(255·2^(s − blockmax))`` in u8, its sums scaled by
  ``2^(blockmax − max)``; the row sums add the same rounded P, so rows stay weighted averages.
- Returns ``(B, H, N, Dv)`` in ``q.dtype``.
"""

from __future__ import annotations

import torch

from attnopt.codegen.reference.exact import structural_keep

LOG2E = 1.4426950408889634
QMAX = {8: 127, 4: 7}
FP8_MAX = 448.0  # largest finite float8 e4m3fn
PV_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PV_CHOICES = (*PV_DTYPES, "fp8", "int8")
BLOCK_Q, BLOCK_K = 128, 64
# Mask values are floored here before ``·log2 e``: finfo.min·log2 e overflows to -inf and would
# empty a row HF pads uniformly with finfo.min (softmax averages such a row).
_FLOOR = torch.finfo(torch.float32).min / 2


def smooth_k(k: torch.Tensor) -> torch.Tensor:
    """K minus its token mean per batch and kv head (``(B, Hkv, M, D)``), in fp32."""
    kf = k.float()
    return kf - kf.mean(dim=-2, keepdim=True)


def smooth_q_blocks(
    q: torch.Tensor, ks: torch.Tensor, block: int, score_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """INT4's Q smoothing: ``(q minus each block's token mean, the means' scores
    mean·Ksᵀ·score_scale (B, H, blocks, M))``, with ``ks`` the smoothed K ``(B, Hkv, M, D)``."""
    qf = q.float()
    n = qf.shape[-2]
    blocks = -(-n // block)
    pad = torch.zeros(*qf.shape[:2], blocks * block, qf.shape[-1], device=q.device)
    pad[:, :, :n] = qf
    counts = torch.full((blocks,), float(block), device=q.device)
    counts[-1] = n - (blocks - 1) * block
    means = pad.view(*qf.shape[:2], blocks, block, -1).sum(dim=-2) / counts[:, None]
    k_rep = ks.repeat_interleave(q.shape[1] // ks.shape[1], dim=1)
    bias = torch.matmul(means, k_rep.transpose(-2, -1)) * score_scale
    return qf - means.repeat_interleave(block, dim=-2)[:, :, :n], bias


def quantize_blocks(
    x: torch.Tensor, block: int, bits: int = 8, scale: float = 1.0, qmax: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-block quantization of ``x`` ``(B, H, N, D)`` along N (``block`` rows share
    one scale) to ``±qmax`` (default: the full range of ``bits``). Returns ``(values int8
    (B, H, N, D), scales fp32 (B, H, ceil(N / block)))`` with ``x·scale ≈ values·scales[...,
    row // block]``."""
    qmax = qmax or QMAX[bits]
    b, h, n, d = x.shape
    blocks = -(-n // block)
    padded = torch.zeros(b, h, blocks * block, d, dtype=torch.float32, device=x.device)
    padded[:, :, :n] = x.float() * scale
    tiles = padded.view(b, h, blocks, block, d)
    scales = tiles.abs().amax(dim=(-2, -1)) / qmax
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    values = torch.round(tiles / scales[..., None, None]).clamp_(-qmax, qmax)
    return values.view(b, h, -1, d)[:, :, :n].to(torch.int8), scales


def dequantize_blocks(values: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 ``values·scales`` with each scale spread over its ``block`` rows."""
    rows = scales.repeat_interleave(block, dim=-1)[..., : values.shape[-2]]
    return values.float() * rows[..., None]


def int_scores(qv: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """``qv·kvᵀ`` of int8 tensors with int32 accumulation (exact)."""
    return torch.matmul(qv.to(torch.int32), kv.to(torch.int32).transpose(-2, -1))


def int8_values(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """V for ``pv="int8"``: ``(values int8, scales, means)``, each ``(B, Hkv, 1, Dv)`` but the
    values. V minus its token mean per channel (added back after the normalisation: exact, as
    rows of P sum to 1) is quantized per channel to ±127."""
    vf = v.float()
    means = vf.mean(dim=-2, keepdim=True)
    centred = vf - means
    scales = centred.abs().amax(dim=-2, keepdim=True).clamp_min(1e-30) / 127
    values = torch.round(centred / scales).clamp_(-127, 127).to(torch.int8)
    return values, scales, means


def _pv(p: torch.Tensor, v: torch.Tensor, v_scale: torch.Tensor | None, pv: str) -> torch.Tensor:
    """``p·v`` with both rounded to the P·V dtype, accumulated in fp32."""
    if pv == "fp8":
        p8 = (p * FP8_MAX).to(torch.float8_e4m3fn).float()
        return torch.matmul(p8, v) * (v_scale / FP8_MAX)
    dtype = PV_DTYPES[pv]
    return torch.matmul(p.to(dtype).float(), v)


def quant_attention(
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
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    k_qmax: int | None = None,
) -> torch.Tensor:
    """Quantized attention following the module docstring, one key block at a time; ``k_qmax``
    narrows K's range (63 where the integer GEMM would saturate, see ``eager/quant.py``)."""
    if bits not in QMAX or pv not in PV_CHOICES:
        raise ValueError(f"bits must be 8 or 4 and pv one of {PV_CHOICES}; got {bits}, {pv!r}")
    group = q.shape[1] // k.shape[1]
    n, m = q.shape[-2], k.shape[-2]
    ks = smooth_k(k)
    qf = q.float()
    bias = None
    if bits == 4:  # Q smoothing per block, its scores added back per key
        qf, bias = smooth_q_blocks(qf, ks, block_q, scale * LOG2E)
        bias = bias.repeat_interleave(block_q, dim=-2)[:, :, :n]
    qv, q_scale = quantize_blocks(qf, block_q, bits, scale * LOG2E)
    kv, k_scale = quantize_blocks(ks, block_k, bits, qmax=k_qmax)
    kv = kv.repeat_interleave(group, dim=1)
    k_scale = k_scale.repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    v_scale = v_mean = None
    if pv == "int8":
        vf, v_scale, v_mean = (t.repeat_interleave(group, dim=1) for t in int8_values(v))
        vf = vf.float()
    elif pv == "fp8":
        v_scale = vf.abs().amax(dim=-2, keepdim=True).clamp_min(1e-12) / FP8_MAX
        vf = (vf / v_scale).to(torch.float8_e4m3fn).float()
    else:
        vf = vf.to(PV_DTYPES[pv]).float()
    q_rows = q_scale.repeat_interleave(block_q, dim=-1)[..., :n, None]
    keep = structural_keep(n, m, causal, window, q.device) if causal or window > 0 else None
    fill2 = fill if fill == float("-inf") else max(fill, _FLOOR) * LOG2E

    shape = (*q.shape[:2], n)
    m_i = torch.full(shape, float("-inf"), device=q.device)
    l_i = torch.zeros(shape, device=q.device)
    acc = torch.zeros(*shape, v.shape[-1], device=q.device)
    for j, start in enumerate(range(0, m, block_k)):
        stop = min(start + block_k, m)
        s = int_scores(qv, kv[:, :, start:stop]).float() * q_rows * k_scale[..., j, None, None]
        if bias is not None:
            s = s + bias[..., start:stop]
        if mask is not None:
            part = mask[..., start:stop]
            if part.dtype == torch.bool:
                s = s.masked_fill(~part, fill2)
            else:
                s = s + part.float().clamp_min(_FLOOR) * LOG2E
        if keep is not None:
            s = s.masked_fill(~keep[:, start:stop], float("-inf"))
        block_max = s.amax(dim=-1)
        m_new = torch.maximum(m_i, block_max)
        m_sub = _finite(m_new)
        alpha = torch.exp2(m_i - m_sub)
        if pv == "int8":  # u8 P against the block's own max, its sums scaled back
            p = torch.floor(torch.exp2(s - _finite(block_max)[..., None]) * 255 + 0.5)
            beta = torch.exp2(block_max - m_sub)
            l_i = l_i * alpha + beta * p.sum(dim=-1)
            part = torch.matmul(p, vf[:, :, start:stop]) * v_scale
            acc = acc * alpha[..., None] + beta[..., None] * part
        else:
            p = torch.exp2(s - m_sub[..., None])
            l_i = l_i * alpha + p.sum(dim=-1)
            acc = acc * alpha[..., None] + _pv(p, vf[:, :, start:stop], v_scale, pv)
        m_i = m_new
    out = acc / l_i.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    if v_mean is not None:  # rows with no visible key stay 0
        out = torch.where(l_i[..., None] > 0, out + v_mean, out)
    return out.to(q.dtype)


def _finite(m: torch.Tensor) -> torch.Tensor:
    """A running max with ``-inf`` (no visible key yet) read as 0, so ``s − m`` stays -inf."""
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)
