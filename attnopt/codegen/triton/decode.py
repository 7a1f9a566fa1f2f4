"""Triton split-KV (flash-decoding) forward of the ``exact`` variant for 1 to 16 queries.

Decoding has too few queries to fill a GPU with query tiles, so the key range is split across
programs instead: a program takes one kv head, the query rows of every query head that reads it
(GQA without repeating K/V: ``group × n`` rows share each K/V tile load) and one slice of the
keys, and writes a partial ``(out, lse)`` per row; a second small kernel merges the slices with
the log-sum-exp merge of ALGORITHMS.md §1, generalised to ``S`` parts
(``L = max + log Σ exp(L_s − max)``, ``o = Σ exp(L_s − L)·o_s``). Empty slices (outside the
causal or window band) carry ``-inf`` and weigh 0; rows with no visible key give 0 and ``-inf``.

The contract, masks, score units, band rule (``_diagonals``/``_band_tiles``), tile loads and
inner loop (``_fwd_tiles``) are the exact kernel's (``triton/exact.py``); only the grid, the row
mapping and the merge are new. The backward is the exact kernel's: it needs only ``(out, lse)``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from attnopt.autotune.runtime import bucket
from attnopt.autotune.space import Config, ConfigSpace
from attnopt.codegen.reference.exact import key_range
from attnopt.codegen.registry import Kernel, register_kernel
from attnopt.codegen.signature import KernelSignature
from attnopt.codegen.triton import exact
from attnopt.codegen.triton.exact import _band_tiles, _diagonals, _fwd_tiles, _load_tile
from attnopt.targets import Target

MAX_QUERIES = 16  # decoding and speculative verification; longer calls use the exact kernel
MAX_ROWS = 64  # query rows (group × n) one program holds; more are spread over row blocks


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _split_kernel(
    Q,
    K,
    V,
    Mask,
    PartOut,
    PartLse,
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
    n_q,
    n_k,
    group,
    key_base,
    split_keys,
    score_scale,
    fill,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    Q_ROWS: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    EXP_UNIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per (key slice, kv head × row block, batch): rows are (query head of the kv
    head's group, query) pairs; keys ``key_base + split·split_keys`` onwards, ``split_keys`` of
    them. Writes the slice's normalised ``out`` and natural-log ``lse`` of each row."""
    split = tl.program_id(0)
    splits = tl.num_programs(0)
    row_blocks = tl.cdiv(group * n_q, BLOCK_M)
    kv_h = tl.program_id(1) // row_blocks
    rows = tl.program_id(1) % row_blocks * BLOCK_M + tl.arange(0, BLOCK_M)
    b = tl.program_id(2).to(tl.int64)
    live = rows < group * n_q
    offs_m = rows % n_q  # the query index: the band and the mask rows follow it
    h = kv_h * group + tl.minimum(rows // n_q, group - 1)  # padding rows reread a real head
    q_ptr = Q + b * stride_qb + h[:, None] * stride_qh
    k_ptr = K + b * stride_kb + kv_h * stride_kh
    v_ptr = V + b * stride_vb + kv_h * stride_vh
    mask_ptr = Mask + b * stride_mb + h[:, None] * stride_mh
    q = _load_tile(q_ptr, offs_m, tl.arange(0, BLOCK_D), stride_qn, stride_qd, n_q, D, False)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    diag_lo, diag_hi = _diagonals(n_q, n_k, IS_CAUSAL, WINDOW)
    tiles = _band_tiles(0, n_k, diag_lo, diag_hi, Q_ROWS, BLOCK_N)
    first = key_base + split * split_keys
    for stage in tl.static_range(3):  # the band's stages, cut to this slice
        lo = tl.minimum(tl.maximum(tiles[stage], first), first + split_keys)
        hi = tl.minimum(tl.maximum(tiles[stage + 1], first), first + split_keys)
        acc, l_i, m_i = _fwd_tiles(
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

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), m_i * (exact.LN2 * EXP_UNIT) + tl.log(l_safe))
    kv_heads = tl.num_programs(1) // row_blocks
    part = ((b * kv_heads * group + h) * n_q + offs_m) * splits + split
    tl.store(PartLse + part, lse, mask=live)
    offs_dv = tl.arange(0, BLOCK_DV)
    inside = live[:, None] & (offs_dv[None, :] < DV)
    tl.store(PartOut + part[:, None] * DV + offs_dv[None, :], acc / l_safe[:, None], mask=inside)


@triton.jit
def _merge_kernel(
    PartOut,
    PartLse,
    Out,
    Lse,
    splits,
    DV: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """One program per (batch, head, query) row: the log-sum-exp merge of its slices."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    lse = tl.load(PartLse + row * splits + offs_s, mask=offs_s < splits, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # every slice empty: weights all 0
    weight = tl.exp(lse - top)
    total = tl.sum(weight, 0)
    inside = (offs_s[:, None] < splits) & (offs_dv[None, :] < DV)
    parts = tl.load(
        PartOut + (row * splits + offs_s[:, None]) * DV + offs_dv[None, :], mask=inside, other=0.0
    )
    seen = total > 0.0
    total = tl.where(seen, total, 1.0)
    out = tl.sum(parts * weight[:, None], 0) / total
    tl.store(Out + row * DV + offs_dv, out.to(Out.dtype.element_ty), mask=offs_dv < DV)
    tl.store(Lse + row, tl.where(seen, top + tl.log(total), float("-inf")))


# ----------------------------------------------------------------------------- config space

PARAMS = {
    "BLOCK_N": (16, 32, 64, 128),
    "splits": (1, 2, 4, 8, 16, 32, 64),  # key slices per (kv head, row block)
    "num_warps": (1, 2, 4, 8),
    "num_stages": (1, 2, 3),
}
INTERPRETER_CONFIG = {"BLOCK_N": 32, "splits": 2, "num_warps": 4, "num_stages": 1}
MIN_SLICE_TILES = 4  # the default keeps a slice at least this many key tiles long
WAVES = 2  # the default aims at this many programs per SM


def _block_m(group: int, n_q: int) -> int:
    """Rows a program holds: the whole group's queries, padded to a dot's minimum of 16."""
    return max(16, min(MAX_ROWS, triton.next_power_of_2(group * n_q)))


def _keep(config: Config, target: Target, sig: KernelSignature) -> str | None:
    """None, or why ``config`` cannot launch (or would spill or idle) on ``target`` for ``sig``."""
    if not target.is_gpu:
        return f"target {target.name!r} is not a GPU"
    if sig.n > MAX_QUERIES:
        return f"{sig.n} queries: the split-KV kernel serves at most {MAX_QUERIES}"
    if max(sig.head_dim, sig.value_dim or 0) > exact.MAX_HEAD_DIM:
        return f"head dim above {exact.MAX_HEAD_DIM}"
    keys = max(16, bucket(sig.m))
    if config["BLOCK_N"] > keys:
        return f"BLOCK_N={config['BLOCK_N']} is longer than the padded cache ({keys})"
    if config["splits"] * config["BLOCK_N"] > keys:
        return f"{config['splits']} slices of {config['BLOCK_N']} keys exceed the cache ({keys})"
    tile = dict(config, BLOCK_M=_block_m(sig.kv_group, sig.n))
    smem, registers = exact._footprint(tile, sig, backward=False)
    if smem > target.smem_per_block:
        return f"needs ~{smem // 1024} KiB shared memory, {target.name!r} has less"
    if registers > exact.MAX_REGISTERS:
        return f"needs ~{registers} registers per thread (limit {exact.MAX_REGISTERS})"
    return None


def _default(target: Target, sig: KernelSignature) -> Config:
    """64-key tiles, and as many slices as fill ``WAVES`` programs per SM without making a
    slice shorter than ``MIN_SLICE_TILES`` tiles."""
    return dict(_default_items(target, sig))


@functools.lru_cache(maxsize=1024)  # every decode step asks: keep it a dict lookup
def _default_items(target: Target, sig: KernelSignature) -> tuple:
    return tuple(_pick_default(target, sig).items())


def _pick_default(target: Target, sig: KernelSignature) -> Config:
    if not target.is_gpu:
        return dict(INTERPRETER_CONFIG)
    rows = sig.heads // max(1, sig.kv_group) * -(-sig.kv_group * sig.n // MAX_ROWS)
    for block_n, warps in ((64, 4), (32, 4), (16, 2)):
        wanted = WAVES * target.sm_count / max(1, sig.batch * rows)
        longest = max(1, sig.m // (MIN_SLICE_TILES * block_n))
        splits = max(s for s in PARAMS["splits"] if s <= max(1, min(wanted, longest)))
        config = {"BLOCK_N": block_n, "splits": splits, "num_warps": warps, "num_stages": 2}
        if _keep(config, target, sig) is None:
            return config
    return {"BLOCK_N": 16, "splits": 1, "num_warps": 2, "num_stages": 1}


FORWARD_SPACE = ConfigSpace("triton.decode.forward", PARAMS, _keep, _default)


# ----------------------------------------------------------------------------- launcher


def supports(q, k, v, mask, causal: bool, window: int) -> str | None:
    """The exact kernel's contract, for calls of at most ``MAX_QUERIES`` queries."""
    if q.dim() == 4 and q.shape[2] > MAX_QUERIES:
        return f"{q.shape[2]} queries: the split-KV kernel serves at most {MAX_QUERIES}"
    return exact.supports(q, k, v, mask, causal, window)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` as ``reference.exact_attention`` computes them; ``config`` (the tuner's)
    overrides the installed or default one."""
    mask = exact._checked_mask(q, k, v, mask)
    batch, heads, n_q, _ = q.shape
    kv_heads, n_k, dv = k.shape[1], k.shape[2], v.shape[-1]
    out = q.new_empty(batch, heads, n_q, dv)
    lse = q.new_empty(batch, heads, n_q, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    if n_k == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    config = config or exact._config(FORWARD_SPACE, q, k, v, mask, causal, window)
    block_n, group = config["BLOCK_N"], heads // kv_heads
    first, last = key_range(n_q, n_k, causal, window)
    first = first // block_n * block_n
    split_keys = triton.cdiv(triton.cdiv(max(1, last - first), config["splits"]), block_n)
    split_keys *= block_n
    splits = triton.cdiv(max(1, last - first), split_keys)
    part_out = q.new_empty(batch, heads, n_q, splits, dv, dtype=torch.float32)
    part_lse = q.new_empty(batch, heads, n_q, splits, dtype=torch.float32)
    block_m = _block_m(group, n_q)
    mask_ptr, *mask_strides = exact._mask_args(mask, q)
    grid = (splits, kv_heads * triton.cdiv(group * n_q, block_m), batch)
    _split_kernel[grid](
        q,
        k,
        v,
        mask_ptr,
        part_out,
        part_lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *mask_strides,
        key_base=first,
        split_keys=split_keys,
        **exact._shared_args(q, k, v, mask, scale, causal, window, fill),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        Q_ROWS=triton.next_power_of_2(n_q),
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    _merge_kernel[(batch * heads * n_q,)](
        part_out,
        part_lse,
        out,
        lse,
        splits,
        DV=dv,
        BLOCK_S=triton.next_power_of_2(splits),
        BLOCK_DV=exact._pow2(dv),
    )
    return out, lse


TRITON_DECODE = register_kernel(
    Kernel(
        variant="exact",
        device_type="cuda",
        name="triton_decode",
        forward=forward,
        backward=exact.backward,
        supports=supports,
        priority=11,  # above the exact kernel, for the calls it takes
    )
)
