"""TVM split-KV decode (1 to 16 queries against a long cache) of the ``exact`` variant, for CPUs.

The exact CPU kernel transposes K into panels on every call, which a decode step cannot repay
(``exact.MIN_QUERIES``). This kernel reads K and V rows in place, once per call: a task of TVM's
pool takes one (batch, kv head, key slice) and every query row that reads the kv head (the
``group × n`` rows of GQA share each K/V row load; K/V are never repeated). Scores are dot
products along d (vectors of ``vec`` lanes, then a horizontal sum); P·V is the register-tiled
outer product of the exact kernel. A second parallel loop merges each row's slices with the
log-sum-exp merge of ALGORITHMS.md §1 (``L = max + log Σ exp(L_s − max)``), so a short batch ×
kv-head grid still spreads over every core.

Contract, masks, bottom-right causal, window and score units are those of ``tvm/exact.py``, whose
band and score helpers (``_visible``, ``_inside_band``, ``_score``) this kernel calls. Shapes are
symbolic: one compiled function per (head dims, dtype, mask kind, tile knobs, target).
"""

from __future__ import annotations

import functools
from dataclasses import asdict

import torch

from attnopt.autotune.runtime import config_for
from attnopt.autotune.space import Config, ConfigSpace
from attnopt.codegen.reference.exact import key_range
from attnopt.codegen.registry import Kernel, register_kernel
from attnopt.codegen.signature import KernelSignature
from attnopt.codegen.tvm import cache, exact
from attnopt.codegen.tvm.exact import (
    LN2,
    LOG2E,
    NEG_INF,
    Spec,
    _inside_band,
    _score,
    _visible,
)
from attnopt.errors import KernelError
from attnopt.targets import Target

MAX_QUERIES = 16  # longer calls repay the exact kernel's K panels


def _cpu_kernel(spec: Spec, config: Config):
    """The PrimFunc of one signature class and tile config; every shape in it is symbolic."""
    from tvm.script import tirx as T

    from attnopt.codegen.tvm.tirlib import STACK, exp2, heads_buffers, hmax, hsum, lanes

    d, dv, dtype = spec.head_dim, spec.value_dim, spec.dtype
    bn, rb, rows, vec = config["block_n"], config["row_block"], config["rows"], config["vec"]
    pw = config["pv_cols"] * vec  # value-dim width of a P·V register tile
    exp_unit = LOG2E if spec.mask != "none" else 1.0
    lse_unit = 1.0 if spec.mask != "none" else LN2
    dv64 = T.int64(dv)
    neg = T.float32(NEG_INF)

    def dot(q_s, r, k_buf, b, hk, key):
        """``q_s[r] · K[b, hk, key]`` as one expression: ``d / vec`` vector products summed as a
        tree (independent FMA chains, not one serial chain), then one horizontal sum."""
        terms = [
            lanes(q_s, r, c * vec, width=vec)
            * T.Cast(f"float32x{vec}", lanes(k_buf, b, hk, key, c * vec, width=vec))
            for c in range(d // vec)
        ]
        while len(terms) > 1:
            pairs = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)]
            terms = pairs + terms[len(terms) - len(terms) % 2 :]
        return hsum(terms[0], vec)

    def row_max(s_t, r):
        return hmax(
            functools.reduce(T.max, [lanes(s_t, r, c * vec, width=vec) for c in range(bn // vec)]),
            vec,
        )

    def row_sum(s_t, r):
        parts = [lanes(s_t, r, c * vec, width=vec) for c in range(bn // vec)]
        return hsum(functools.reduce(lambda x, y: x + y, parts), vec)

    def scores(s_t, q_s, K, MASK, b, hk, h, i, r, j0, j, n_keys, M, N, scale, causal, win, fill):
        """Row ``r``'s score of key ``j0 + j``; ``n_keys`` set: with the band and bounds checks."""
        key = T.min(j0 + j, M - 1)
        s = _score(spec, dot(q_s, r, K, b, hk, key), MASK, b, h, i, key, scale, fill)
        if n_keys is None:
            return s
        delta = T.Cast("int32", j0 - (i + M - N)) + j
        return T.Select(_visible(delta, j, n_keys, causal, win), s, neg)

    @T.macro
    def attend_rows(
        Q, K, V, MASK, PO, PL, H, HK, N, M, S, scale, causal, window, fill, key_base, split_keys,
        task, rblk,
    ):  # fmt: skip
        # bind the arguments once: a macro substitutes each expression at every use
        b: T.let = task // (HK * S)
        hk: T.let = task // S % HK
        sl: T.let = task % S
        group: T.let = H // HK
        r0: T.let = rblk * rb
        n_rows: T.let = T.min(T.int64(rb), group * N - r0)
        j_lo: T.let = key_base + sl * split_keys
        j_hi: T.let = T.min(M, j_lo + split_keys)
        n_blk: T.let = T.max(T.int64(0), (j_hi - j_lo + bn - 1) // bn)
        win: T.let = T.Cast("int32", T.min(window, N + M))
        q_s = T.alloc_buffer((rb, d), "float32", annotations=STACK)
        s_t = T.alloc_buffer((rb, bn), "float32", annotations=STACK)
        acc_o = T.alloc_buffer((rb, dv), "float32", annotations=STACK)
        m_run = T.alloc_buffer((rb,), "float32", annotations=STACK)
        l_run = T.alloc_buffer((rb,), "float32", annotations=STACK)
        alpha = T.alloc_buffer((rb,), "float32", annotations=STACK)
        for r in range(rb):  # padding rows repeat the last row; they are never written out
            rr: T.let = T.min(r0 + r, group * N - 1)
            for cv in range(d // vec):
                for c in T.vectorized(vec):
                    q_s[r, cv * vec + c] = T.Cast(
                        "float32", Q[b, hk * group + rr // N, rr % N, cv * vec + c]
                    )
            for cv in range(dv // vec):
                for c in T.vectorized(vec):
                    acc_o[r, cv * vec + c] = T.float32(0)
            m_run[r] = neg
            l_run[r] = T.float32(0)
        for jb in range(n_blk):
            j0: T.let = j_lo + jb * bn
            n_keys: T.let = T.Cast("int32", T.min(T.int64(bn), j_hi - j0))
            if _inside_band(j0, M - N, M - 1, j_hi, causal, window, bn):
                for g, j in T.grid(rb // rows, bn):  # rows × one key: independent dots
                    for r in T.unroll(rows):
                        rr: T.let = T.min(r0 + g * rows + r, group * N - 1)
                        s_t[g * rows + r, j] = scores(
                            s_t, q_s, K, MASK, b, hk, hk * group + rr // N, rr % N, g * rows + r,
                            j0, j, None, M, N, scale, causal, win, fill,
                        )  # fmt: skip
            else:
                for g, j in T.grid(rb // rows, bn):  # rows × one key: independent dots
                    for r in T.unroll(rows):
                        rr: T.let = T.min(r0 + g * rows + r, group * N - 1)
                        s_t[g * rows + r, j] = scores(
                            s_t, q_s, K, MASK, b, hk, hk * group + rr // N, rr % N, g * rows + r,
                            j0, j, n_keys, M, N, scale, causal, win, fill,
                        )  # fmt: skip
            # online softmax: new running max, rescale factor, P = 2^(S - max), row sums
            for r in range(rb):
                m_new: T.let = T.max(m_run[r], row_max(s_t, r))
                m_safe: T.let = T.Select(m_new == neg, T.float32(0), m_new)
                alpha[r] = exp2((m_run[r] - m_safe) * T.float32(exp_unit))
                for cv in range(bn // vec):
                    for c in T.vectorized(vec):
                        s_t[r, cv * vec + c] = exp2(
                            (s_t[r, cv * vec + c] - m_safe) * T.float32(exp_unit)
                        )
                l_run[r] = l_run[r] * alpha[r] + row_sum(s_t, r)
                m_run[r] = m_new
            # O = α·O + P V, register tiles of rows × pw
            for g in range(rb // rows):
                for db in range(dv // pw):
                    acc = T.alloc_buffer((rows, pw), "float32", annotations=STACK)
                    for r, cv in T.grid(rows, pw // vec):
                        for c in T.vectorized(vec):
                            acc[r, cv * vec + c] = (
                                acc_o[g * rows + r, db * pw + cv * vec + c] * alpha[g * rows + r]
                            )
                    for j in range(n_keys):
                        for r in T.unroll(rows):
                            for cv in T.unroll(pw // vec):
                                for c in T.vectorized(vec):
                                    acc[r, cv * vec + c] = acc[r, cv * vec + c] + s_t[
                                        g * rows + r, j
                                    ] * T.Cast("float32", V[b, hk, j0 + j, db * pw + cv * vec + c])
                    for r, cv in T.grid(rows, pw // vec):
                        for c in T.vectorized(vec):
                            acc_o[g * rows + r, db * pw + cv * vec + c] = acc[r, cv * vec + c]
        for r in range(n_rows):
            rr: T.let = r0 + r
            total: T.let = l_run[r]
            inv: T.let = T.Select(total > T.float32(0), T.float32(1) / total, T.float32(0))
            for cv in range(dv // vec):
                for c in T.vectorized(vec):
                    PO[b, hk * group + rr // N, rr % N, sl, cv * vec + c] = (
                        acc_o[r, cv * vec + c] * inv
                    )
            PL[b, hk * group + rr // N, rr % N, sl] = T.Select(
                total > T.float32(0), m_run[r] * T.float32(lse_unit) + T.log(total), neg
            )

    @T.macro
    def merge_row(PO, PL, OUT, LSE, H, N, S, row):
        b: T.let = row // (H * N)
        h: T.let = row // N % H
        i: T.let = row % N
        stat = T.alloc_buffer((2,), "float32", annotations=STACK)  # max lse, sum of weights
        acc = T.alloc_buffer((dv,), "float32", annotations=STACK)
        stat[0] = neg
        for s in range(S):
            stat[0] = T.max(stat[0], PL[b, h, i, s])
        top: T.let = T.Select(stat[0] == neg, T.float32(0), stat[0])
        stat[1] = T.float32(0)
        for cv in range(dv // vec):
            for c in T.vectorized(vec):
                acc[cv * vec + c] = T.float32(0)
        for s in range(S):
            weight: T.let = T.exp(PL[b, h, i, s] - top)
            stat[1] = stat[1] + weight
            for cv in range(dv // vec):
                for c in T.vectorized(vec):
                    acc[cv * vec + c] = acc[cv * vec + c] + weight * PO[b, h, i, s, cv * vec + c]
        total: T.let = stat[1]
        inv: T.let = T.Select(total > T.float32(0), T.float32(1) / total, T.float32(0))
        for cv in range(dv // vec):
            for c in T.vectorized(vec):
                OUT[b, h, i, cv * vec + c] = T.Cast(dtype, acc[cv * vec + c] * inv)
        LSE[b, h, i] = T.Select(total > T.float32(0), top + T.log(total), neg)

    @T.prim_func
    def kernel(
        q: T.handle,
        k: T.handle,
        v: T.handle,
        mask: T.handle,
        po: T.handle,
        pl: T.handle,
        o: T.handle,
        lse: T.handle,
        scale: T.float32,
        causal: T.int64,
        window: T.int64,
        fill: T.float32,
        key_base: T.int64,
        split_keys: T.int64,
    ):
        T.func_attr({"tir.noalias": True})
        B, H, HK, N, M, Q, K, V, MASK, OUT, LSE = heads_buffers(q, k, v, mask, o, lse, spec)
        S = T.int64()
        PO = T.match_buffer(po, (B, H, N, S, dv64), "float32")
        PL = T.match_buffer(pl, (B, H, N, S), "float32")
        for task in T.parallel(B * HK * S):
            for rblk in range((H // HK * N + rb - 1) // rb):
                attend_rows(
                    Q, K, V, MASK, PO, PL, H, HK, N, M, S, scale, causal, window, fill, key_base,
                    split_keys, task, rblk,
                )  # fmt: skip
        for row in T.parallel(B * H * N):
            merge_row(PO, PL, OUT, LSE, H, N, S, row)

    return kernel


# ----------------------------------------------------------------------------- config space

PARAMS = {
    "block_n": (32, 64, 128),  # keys per softmax block
    "row_block": (1, 2, 4, 8, 16, 32),  # query rows a task keeps (the rest of its rows loop)
    "rows": (1, 2, 4, 8),  # query rows of a P·V register tile
    "vec": (4, 8, 16),  # fp32 lanes per vector
    "pv_cols": (1, 2, 4),  # value-dim vectors of a P·V register tile
    "splits": (1, 2, 4, 8, 16, 32),  # key slices per (batch, kv head): a runtime argument
}
TASKS_PER_THREAD = 2  # the default splits the keys until the pool has this many tasks per thread
MIN_SLICE = 256  # keys; shorter slices cost more in merging than they win in balance


def _keep(config: Config, target: Target, sig: KernelSignature) -> str | None:
    """None, or why ``config`` cannot run (or would spill registers) on ``target`` for ``sig``."""
    if target.is_gpu:
        return f"target {target.name!r} is a GPU; this is a CPU kernel"
    if sig.n > MAX_QUERIES:
        return f"{sig.n} queries: the decode kernel serves at most {MAX_QUERIES}"
    value_dim = sig.value_dim or sig.head_dim
    if max(sig.head_dim, value_dim) > exact.MAX_HEAD_DIM:
        return f"head dim {max(sig.head_dim, value_dim)} is above {exact.MAX_HEAD_DIM}"
    vec = config["vec"]
    if 32 * vec > max(target.vector_bits, 128):
        return f"vec={vec} needs {32 * vec}-bit vectors, {target.name!r} has fewer"
    if sig.head_dim % vec or value_dim % (config["pv_cols"] * vec) or config["block_n"] % vec:
        return f"head dims {sig.head_dim}/{value_dim} or block_n are not multiples of the vectors"
    if config["row_block"] % config["rows"]:
        return f"row_block={config['row_block']} is not a multiple of rows={config['rows']}"
    needed = config["rows"] * config["pv_cols"] + config["pv_cols"] + 1
    if needed > exact._registers(target):
        return f"rows × pv_cols needs {needed} vector registers, the target has fewer"
    return None


def _default(target: Target, sig: KernelSignature) -> Config:
    """Widest vectors that fit; rows per task to hold a GQA group's queries; enough key slices
    for ``TASKS_PER_THREAD`` tasks per thread, none shorter than ``MIN_SLICE`` keys."""
    return dict(_default_items(target, sig, torch.get_num_threads()))


@functools.lru_cache(maxsize=1024)  # every decode step asks: keep it a dict lookup
def _default_items(target: Target, sig: KernelSignature, threads: int) -> tuple:
    tasks = sig.batch * max(1, sig.heads // max(1, sig.kv_group))
    wanted = TASKS_PER_THREAD * threads / tasks
    longest = max(1, sig.m // MIN_SLICE)
    splits = max(s for s in PARAMS["splits"] if s <= max(1, min(wanted, longest)))
    row_block = min(r for r in PARAMS["row_block"] if r >= min(32, sig.kv_group * sig.n))
    configs = [
        {
            "block_n": 64,
            "row_block": row_block,
            "rows": min(4, row_block),
            "vec": vec,
            "pv_cols": pv_cols,
            "splits": splits,
        }
        for vec in (16, 8, 4)
        for pv_cols in (2, 1)
    ]
    return tuple(next((c for c in configs if _keep(c, target, sig) is None), configs[-1]).items())


FORWARD_SPACE = ConfigSpace("tvm.decode.cpu", PARAMS, _keep, _default)


# ----------------------------------------------------------------------------- dispatch

# Calls torch's SDPA can run stay with SDPA. Alone (``benchmarks/bench_attention.py --decode
# --rounds 3``, fp32) this kernel led SDPA on shared K/V (GQA 32:8, d 64: 1.5x at 512 keys, 3x at
# 8k; MQA 4-5x at 8k) and tied it on one kv head per query head (memory-bound). Inside a model,
# between torch's matmuls, TVM's thread pool and torch's OpenMP pool compete for the cores: four
# layers of projection + decode attention + projection (32:8 heads, d 64) ran at 0.94x / 1.03x
# of SDPA on 1 thread and 0.80-0.83x on 2 threads at 512, 2k and 8k keys. So SDPA keeps the calls
# it can express. Calls it cannot (bottom-right causal with n > 1, windows, bool masks) would
# otherwise run the reference, which this kernel beats at every size measured (4 queries × 16
# keys: 0.03 ms against 0.08), so they come here at any size.


def _sdpa_declines(q, k, v, mask, causal: bool, window: int) -> bool:
    from attnopt.codegen import sdpa

    return sdpa.supports(q, k, v, mask, causal, window) is not None


def supports(q, k, v, mask, causal: bool, window: int) -> str | None:
    """None, or why this kernel should not run these inputs (the registry then picks another)."""
    if q.device.type != "cpu":
        return "the decode kernel is a CPU kernel"
    try:
        reason = exact._contract(q, k, v, mask)
    except RuntimeError as err:  # a mask that does not broadcast
        return str(err)
    if reason is not None:
        return reason
    if q.shape[2] > MAX_QUERIES:
        return f"{q.shape[2]} queries: the decode kernel serves at most {MAX_QUERIES}"
    if not _sdpa_declines(q, k, v, mask, causal, window):
        return "torch's SDPA runs this call, and was faster inside a model (thread pools)"
    target = exact._target("cpu", None)
    sig = exact._signature(q, k, v, mask, causal, window)
    config, source = config_for(FORWARD_SPACE, target, sig)
    bad = _keep(config, target, sig)
    if bad is not None:
        return f"the {source} config {config} cannot run: {bad}"
    return None


@functools.cache
def _function(spec: Spec, tiles: tuple, target: Target):
    """The compiled kernel of a spec and tile knobs (``splits`` is a runtime argument)."""
    config = dict(tiles)
    key = {**asdict(spec), **config}
    return cache.kernel_function("tvm.decode.cpu", key, target, _cpu_kernel, spec, config)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
    reason = exact._contract(q, k, v, mask)
    if reason is None and q.device.type != "cpu":
        reason = "the decode kernel is a CPU kernel"
    if reason is None and q.shape[2] > MAX_QUERIES:
        reason = f"{q.shape[2]} queries: the decode kernel serves at most {MAX_QUERIES}"
    if reason is not None:
        raise KernelError(reason)
    target = exact._target("cpu", None)
    sig = exact._signature(q, k, v, mask, causal, window)
    config, source = (config, "given") if config else config_for(FORWARD_SPACE, target, sig)
    bad = _keep(config, target, sig) if source != "default" else None  # defaults are kept
    if bad is not None:
        raise KernelError(f"config {config} cannot run here: {bad}; pass another or none")
    mask_arg, facts = exact._mask_operand(mask, q, k)
    spec = Spec(q.shape[-1], v.shape[-1], exact.DTYPES[q.dtype], **facts)
    q, k, v = (exact._unit_inner(t) for t in (q, k, v))
    batch, heads, n_q, _ = q.shape
    block = config["block_n"]
    first, last = key_range(n_q, k.shape[2], causal, window)
    first = first // block * block
    span = max(1, last - first)
    split_keys = _cdiv(_cdiv(span, config["splits"]), block) * block
    slices = _cdiv(span, split_keys)
    part_out = q.new_empty(batch, heads, n_q, slices, v.shape[-1], dtype=torch.float32)
    part_lse = q.new_empty(batch, heads, n_q, slices, dtype=torch.float32)
    out = q.new_empty(batch, heads, n_q, v.shape[-1])
    lse = q.new_empty(batch, heads, n_q, dtype=torch.float32)
    tiles = tuple((name, value) for name, value in config.items() if name != "splits")
    _function(spec, tiles, target)(
        q, k, v, mask_arg, part_out, part_lse, out, lse, scale, int(causal), max(window, 0),
        fill, first, split_keys,
    )  # fmt: skip
    return out, lse


TVM_DECODE = register_kernel(
    Kernel(
        variant="exact",
        device_type="cpu",
        name="tvm_decode",
        forward=forward,
        supports=supports,
        priority=11,  # above the exact kernels, which decline decode calls or run them slower
    )
)
