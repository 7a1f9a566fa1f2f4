"""TVM chunked linear attention (ALGORITHMS.md §3, not gated) for CPUs, through LLVM.

Follows the contract in ``codegen/reference/linear.py``: the caller applies the feature map, so
the kernel takes φ(q), φ(k) and v, with GQA through the kv head ``h // (H // Hkv)``. One task per
(batch, head) on TVM's thread pool walks the sequence in chunks of ``chunk`` tokens, keeping the
state ``S = Σ φ(k) vᵀ`` (Dk × Dv) and the normaliser ``z = Σ φ(k)`` in fp32 on its stack:

    A = tril(Q_c K_cᵀ)      out_c = (Q_c S + A V_c) / (Q_c z + rowsum A + eps)
    S += K_cᵀ V_c           z += colsum K_c          (after the chunk's outputs)

Without ``causal`` the state sums every key first and ``out_c = Q_c S / (Q_c z + eps)``. Inner
loops are vectorised over the value dim, and over keys for ``Q_c K_cᵀ`` (from a transposed copy
of ``K_c``). Shapes are symbolic: one compiled kernel per (head dims, dtype, config, target).
Gated (GLA, causal only): gates ``log α`` beside the keys decay state and normaliser alike,
``S_t = Diag(α_t) S_{t−1} + φ(k_t) v_tᵀ``. In a chunk, ``b`` is the running sum of ``log α`` (in
log2 units); every exponent is a difference ``b_i − b_j`` with ``j ≤ i`` (or ``b_i`` against
the chunk start, or ``b_last − b_j``), so it is ≤ 0 and ``tirlib.exp2`` cannot overflow:

    A_ij = Σ_c q_ic k_jc 2^(b_ic − b_jc) (j ≤ i)      out_i = (Σ_c q_ic 2^b_ic S_c + A_i V_c) / (…)
    S ← 2^b_last ⊙ S + (k ⊙ 2^(b_last − b))ᵀ V_c     z likewise

Registered for the ``linear`` pass through ``codegen/linear_ops.py`` (``linear`` and ``gla``).
"""

from __future__ import annotations

import torch

from attnopt.autotune.runtime import config_for
from attnopt.autotune.space import Config, ConfigSpace
from attnopt.codegen.registry import Kernel, register_kernel
from attnopt.codegen.signature import KernelSignature
from attnopt.codegen.tvm import cache
from attnopt.codegen.tvm.exact import DTYPES, HALF_ISAS
from attnopt.errors import KernelError
from attnopt.targets import Target, resolve

MAX_DIM = 256  # the state (Dk × Dv fp32) and the chunk's tiles live on the task's stack
LOG2E = 1.4426950408889634


def _macros(dk: int, dv: int, chunk: int, vec: int):
    """``load_keys`` and ``absorb_keys``, shared by the plain and the gated kernel."""
    from tvm.script import tirx as T

    # K_c transposed and V_c of the keys from ``start``, in fp32, zero past the last key
    @T.macro
    def load_keys(K, V, kt, vs, b, hk, start, M):
        for j, c in T.grid(chunk, dk):
            kt[c, j] = T.if_then_else(
                start + j < M, T.Cast("float32", K[b, hk, T.min(start + j, M - 1), c]), T.float32(0)
            )
        for j, cv in T.grid(chunk, dv // vec):
            for c in T.vectorized(vec):
                vs[j, cv * vec + c] = T.if_then_else(
                    start + j < M,
                    T.Cast("float32", V[b, hk, T.min(start + j, M - 1), cv * vec + c]),
                    T.float32(0),
                )

    # S += K_cᵀ V_c and z += colsum K_c
    @T.macro
    def absorb_keys(state, norm, kt, vs):
        for c in range(dk):
            for j in range(chunk):
                norm[c] = norm[c] + kt[c, j]
                for cv in range(dv // vec):
                    for e in T.vectorized(vec):
                        state[c, cv * vec + e] = (
                            state[c, cv * vec + e] + kt[c, j] * vs[j, cv * vec + e]
                        )

    return load_keys, absorb_keys


def _kernel(dk: int, dv: int, dtype: str, config: Config):
    """The PrimFunc for head dims ``dk``/``dv`` and a config; every shape in it is symbolic."""
    from tvm.script import tirx as T

    from attnopt.codegen.tvm.tirlib import STACK

    chunk, vec = config["chunk"], config["vec"]
    dk64, dv64, unit = T.int64(dk), T.int64(dv), T.int64(1)
    load_keys, absorb_keys = _macros(dk, dv, chunk, vec)

    @T.prim_func
    def kernel(q: T.handle, k: T.handle, v: T.handle, o: T.handle, causal: T.int64, eps: T.float32):
        T.func_attr({"tir.noalias": True})
        B, H, HK, N, M = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        sq0, sq1, sq2 = T.int64(), T.int64(), T.int64()
        sk0, sk1, sk2 = T.int64(), T.int64(), T.int64()
        sv0, sv1, sv2 = T.int64(), T.int64(), T.int64()
        Q = T.match_buffer(q, (B, H, N, dk64), dtype, strides=(sq0, sq1, sq2, unit))
        K = T.match_buffer(k, (B, HK, M, dk64), dtype, strides=(sk0, sk1, sk2, unit))
        V = T.match_buffer(v, (B, HK, M, dv64), dtype, strides=(sv0, sv1, sv2, unit))
        OUT = T.match_buffer(o, (B, H, N, dv64), dtype)
        for bh in T.parallel(B * H):
            b: T.let = bh // H
            h: T.let = bh % H
            hk: T.let = h // (H // HK)
            state = T.alloc_buffer((dk, dv), "float32", annotations=STACK)
            norm = T.alloc_buffer((dk,), "float32", annotations=STACK)
            qs = T.alloc_buffer((chunk, dk), "float32", annotations=STACK)
            kt = T.alloc_buffer((dk, chunk), "float32", annotations=STACK)
            vs = T.alloc_buffer((chunk, dv), "float32", annotations=STACK)
            a = T.alloc_buffer((chunk, chunk), "float32", annotations=STACK)
            num = T.alloc_buffer((chunk, dv), "float32", annotations=STACK)
            den = T.alloc_buffer((chunk,), "float32", annotations=STACK)
            for c in range(dk):
                norm[c] = T.float32(0)
                for e in range(dv):
                    state[c, e] = T.float32(0)
            if causal == 0:
                for ck in range((M + chunk - 1) // chunk):
                    load_keys(K, V, kt, vs, b, hk, ck * chunk, M)
                    absorb_keys(state, norm, kt, vs)
            for cq in range((N + chunk - 1) // chunk):
                t0: T.let = cq * chunk
                for i, c in T.grid(chunk, dk):
                    qs[i, c] = T.if_then_else(
                        t0 + i < N,
                        T.Cast("float32", Q[b, h, T.min(t0 + i, N - 1), c]),
                        T.float32(0),
                    )
                for i, e in T.grid(chunk, dv):
                    num[i, e] = T.float32(0)
                for i in range(chunk):
                    den[i] = T.float32(0)
                if causal != 0:
                    load_keys(K, V, kt, vs, b, hk, t0, M)
                    # A = tril(Q_c K_cᵀ), then its rows into the numerator and denominator
                    for i, jv in T.grid(chunk, chunk // vec):
                        for j in T.vectorized(vec):
                            a[i, jv * vec + j] = T.float32(0)
                        for c in range(dk):
                            for j in T.vectorized(vec):
                                a[i, jv * vec + j] = (
                                    a[i, jv * vec + j] + qs[i, c] * kt[c, jv * vec + j]
                                )
                        for j in T.vectorized(vec):
                            a[i, jv * vec + j] = T.Select(
                                jv * vec + j <= i, a[i, jv * vec + j], T.float32(0)
                            )
                    for i in range(chunk):
                        for j in range(i + 1):
                            den[i] = den[i] + a[i, j]
                            for cv in range(dv // vec):
                                for e in T.vectorized(vec):
                                    num[i, cv * vec + e] = (
                                        num[i, cv * vec + e] + a[i, j] * vs[j, cv * vec + e]
                                    )
                # the state of the keys before the chunk (every key when not causal)
                for i in range(chunk):
                    for c in range(dk):
                        den[i] = den[i] + qs[i, c] * norm[c]
                        for cv in range(dv // vec):
                            for e in T.vectorized(vec):
                                num[i, cv * vec + e] = (
                                    num[i, cv * vec + e] + qs[i, c] * state[c, cv * vec + e]
                                )
                for i in range(T.min(T.int64(chunk), N - t0)):
                    for cv in range(dv // vec):
                        for e in T.vectorized(vec):
                            OUT[b, h, t0 + i, cv * vec + e] = T.Cast(
                                dtype, num[i, cv * vec + e] / (den[i] + eps)
                            )
                if causal != 0:
                    absorb_keys(state, norm, kt, vs)

    return kernel


def _gated_kernel(dk: int, dv: int, dtype: str, config: Config):
    """The causal gated PrimFunc (see the module docstring); shapes symbolic as in ``_kernel``."""
    from tvm.script import tirx as T

    from attnopt.codegen.tvm.tirlib import STACK, exp2

    chunk, vec = config["chunk"], config["vec"]
    dk64, dv64, unit = T.int64(dk), T.int64(dv), T.int64(1)
    load_keys, absorb_keys = _macros(dk, dv, chunk, vec)

    @T.prim_func
    def kernel(q: T.handle, k: T.handle, v: T.handle, g: T.handle, o: T.handle, eps: T.float32):
        T.func_attr({"tir.noalias": True})
        B, H, HK, N = T.int64(), T.int64(), T.int64(), T.int64()
        sq0, sq1, sq2 = T.int64(), T.int64(), T.int64()
        sk0, sk1, sk2 = T.int64(), T.int64(), T.int64()
        sv0, sv1, sv2 = T.int64(), T.int64(), T.int64()
        sg0, sg1, sg2 = T.int64(), T.int64(), T.int64()
        Q = T.match_buffer(q, (B, H, N, dk64), dtype, strides=(sq0, sq1, sq2, unit))
        K = T.match_buffer(k, (B, HK, N, dk64), dtype, strides=(sk0, sk1, sk2, unit))
        V = T.match_buffer(v, (B, HK, N, dv64), dtype, strides=(sv0, sv1, sv2, unit))
        G = T.match_buffer(g, (B, HK, N, dk64), dtype, strides=(sg0, sg1, sg2, unit))
        OUT = T.match_buffer(o, (B, H, N, dv64), dtype)
        for bh in T.parallel(B * H):
            b: T.let = bh // H
            h: T.let = bh % H
            hk: T.let = h // (H // HK)
            state = T.alloc_buffer((dk, dv), "float32", annotations=STACK)
            norm = T.alloc_buffer((dk,), "float32", annotations=STACK)
            qs = T.alloc_buffer((chunk, dk), "float32", annotations=STACK)
            kt = T.alloc_buffer((dk, chunk), "float32", annotations=STACK)
            bt = T.alloc_buffer((dk, chunk), "float32", annotations=STACK)
            vs = T.alloc_buffer((chunk, dv), "float32", annotations=STACK)
            a = T.alloc_buffer((chunk, chunk), "float32", annotations=STACK)
            num = T.alloc_buffer((chunk, dv), "float32", annotations=STACK)
            den = T.alloc_buffer((chunk,), "float32", annotations=STACK)
            decay = T.alloc_buffer((dk,), "float32", annotations=STACK)
            for c in range(dk):
                norm[c] = T.float32(0)
                for e in range(dv):
                    state[c, e] = T.float32(0)
            for cq in range((N + chunk - 1) // chunk):
                t0: T.let = cq * chunk
                for i, c in T.grid(chunk, dk):
                    qs[i, c] = T.if_then_else(
                        t0 + i < N,
                        T.Cast("float32", Q[b, h, T.min(t0 + i, N - 1), c]),
                        T.float32(0),
                    )
                load_keys(K, V, kt, vs, b, hk, t0, N)
                # b: the running sum of log α in the chunk, in log2 units (0 past the end)
                for c in range(dk):
                    for j in range(chunk):
                        bt[c, j] = T.if_then_else(
                            j > 0, bt[c, T.max(j - 1, 0)], T.float32(0)
                        ) + T.if_then_else(
                            t0 + j < N,
                            T.Cast("float32", G[b, hk, T.min(t0 + j, N - 1), c]) * T.float32(LOG2E),
                            T.float32(0),
                        )
                for i, e in T.grid(chunk, dv):
                    num[i, e] = T.float32(0)
                for i in range(chunk):
                    den[i] = T.float32(0)
                # A_ij = Σ_c q_ic k_jc 2^(b_ic − b_jc) for j ≤ i (the min keeps j > i finite)
                for i, jv in T.grid(chunk, chunk // vec):
                    for j in T.vectorized(vec):
                        a[i, jv * vec + j] = T.float32(0)
                    for c in range(dk):
                        for j in T.vectorized(vec):
                            a[i, jv * vec + j] = a[i, jv * vec + j] + qs[i, c] * kt[
                                c, jv * vec + j
                            ] * exp2(T.min(bt[c, i] - bt[c, jv * vec + j], T.float32(0)))
                    for j in T.vectorized(vec):
                        a[i, jv * vec + j] = T.Select(
                            jv * vec + j <= i, a[i, jv * vec + j], T.float32(0)
                        )
                for i in range(chunk):
                    for j in range(i + 1):
                        den[i] = den[i] + a[i, j]
                        for cv in range(dv // vec):
                            for e in T.vectorized(vec):
                                num[i, cv * vec + e] = (
                                    num[i, cv * vec + e] + a[i, j] * vs[j, cv * vec + e]
                                )
                # the state before the chunk, decayed to each query: q_ic 2^b_ic (in place;
                # exp2's Let bindings go to buffers, never into a T.let used twice)
                for i, c in T.grid(chunk, dk):
                    qs[i, c] = qs[i, c] * exp2(bt[c, i])
                for i in range(chunk):
                    for c in range(dk):
                        den[i] = den[i] + qs[i, c] * norm[c]
                        for cv in range(dv // vec):
                            for e in T.vectorized(vec):
                                num[i, cv * vec + e] = (
                                    num[i, cv * vec + e] + qs[i, c] * state[c, cv * vec + e]
                                )
                for i in range(T.min(T.int64(chunk), N - t0)):
                    for cv in range(dv // vec):
                        for e in T.vectorized(vec):
                            OUT[b, h, t0 + i, cv * vec + e] = T.Cast(
                                dtype, num[i, cv * vec + e] / (den[i] + eps)
                            )
                # S ← 2^b_last S + (k 2^(b_last − b))ᵀ V_c, and z alike
                for c, j in T.grid(dk, chunk):
                    kt[c, j] = kt[c, j] * exp2(bt[c, chunk - 1] - bt[c, j])
                for c in range(dk):
                    decay[c] = exp2(bt[c, chunk - 1])
                for c in range(dk):
                    norm[c] = norm[c] * decay[c]
                    for e in range(dv):
                        state[c, e] = state[c, e] * decay[c]
                absorb_keys(state, norm, kt, vs)

    return kernel


# ----------------------------------------------------------------------------- config space

PARAMS = {
    "chunk": (16, 32, 64, 128),  # tokens per chunk
    "vec": (4, 8, 16),  # fp32 lanes per vector
}


def _keep(config: Config, target: Target, sig: KernelSignature) -> str | None:
    """None, or why ``config`` cannot run on ``target`` for ``sig``."""
    if target.is_gpu:
        return f"target {target.name!r} is a GPU; this kernel is for CPUs"
    value_dim = sig.value_dim or sig.head_dim
    if max(sig.head_dim, value_dim) > MAX_DIM:
        return f"head dim {max(sig.head_dim, value_dim)} is above {MAX_DIM}"
    bits = 32 * config["vec"]
    if bits > max(target.vector_bits, 128):
        return f"vec={config['vec']} needs {bits}-bit vectors, {target.name!r} has fewer"
    if config["chunk"] % config["vec"] or value_dim % config["vec"]:
        return f"chunk and value dim must be multiples of vec={config['vec']}"
    return None


def _default(target: Target, sig: KernelSignature) -> Config:
    """Chunks of 64 tokens (ALGORITHMS.md's example) and the widest vectors that fit."""
    configs = [{"chunk": 64, "vec": vec} for vec in (16, 8, 4)]
    return next((c for c in configs if _keep(c, target, sig) is None), configs[-1])


SPACE = ConfigSpace("tvm.linear.cpu", PARAMS, _keep, _default, variant="linear")


# ----------------------------------------------------------------------------- launcher


def _target() -> Target:
    """Read on every call (cheap), so that ``ATTNOPT_CPU_TARGET`` can change it."""
    return resolve("cpu")


def _contract(q, k, v, causal: bool, log_alpha=None) -> str | None:
    """None, or how the inputs break the contract of ``reference/linear.py``."""
    if log_alpha is not None:
        if not causal:
            return "gated linear attention is causal"
        if log_alpha.shape != k.shape or log_alpha.dtype != k.dtype:
            return f"gates {tuple(log_alpha.shape)} must be like k {tuple(k.shape)}, same dtype"
    if q.device.type != "cpu":
        return f"the TVM linear kernel runs on CPU tensors, got {q.device.type}"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v must share one of {tuple(DTYPES)}, got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be 4-D (B, H, N, Dk) and (B, Hkv, M, Dk)"
    (batch, heads, n, dk), (kv_batch, kv_heads, m, _) = q.shape, k.shape
    if kv_batch != batch or k.shape[-1] != dk or v.shape[:3] != k.shape[:3] or heads % kv_heads:
        shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        return f"{shapes} break the contract (B, H, N, Dk), (B, Hkv, M, Dk), H % Hkv == 0"
    if causal and n != m:
        return f"causal linear attention needs as many keys as queries, got {m} and {n}"
    if 0 in (*q.shape, *k.shape, *v.shape):
        return "empty inputs"
    isas = HALF_ISAS.get(DTYPES[q.dtype], frozenset())
    if isas and not _target().cpu_features & isas:
        return f"{DTYPES[q.dtype]} on CPU needs one of {sorted(isas)} for vector conversions"
    return None


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    eps: float = 1e-6,
    config: Config | None = None,
    log_alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """``reference.linear_attention(q, k, v, causal=, eps=)``, or with gates ``log_alpha``
    ``reference.normalised_gla``; ``config`` overrides the default."""
    reason = _contract(q, k, v, causal, log_alpha)
    if reason is not None:
        raise KernelError(reason)
    target = _target()
    sig = KernelSignature.of(q, k, v, "causal" if causal else "none")
    config = dict(config) if config is not None else config_for(SPACE, target, sig)[0]
    bad = SPACE.keep(config, target, sig)
    if bad is not None:
        raise KernelError(f"config {config} cannot run here: {bad}; pass another or none")
    dk, dv, dtype = q.shape[-1], v.shape[-1], DTYPES[q.dtype]
    gated = log_alpha is not None
    key = {"head_dim": dk, "value_dim": dv, "dtype": dtype, "gated": gated, **config}
    build = _gated_kernel if gated else _kernel
    function = cache.kernel_function("tvm.linear.cpu", key, target, build, dk, dv, dtype, config)
    tensors = (q, k, v, log_alpha) if gated else (q, k, v)
    tensors = [t.detach() if t.stride(-1) == 1 else t.detach().contiguous() for t in tensors]
    out = q.new_empty(*q.shape[:3], dv)
    if gated:
        function(*tensors, out, eps)
    else:
        function(*tensors, out, int(causal), eps)
    return out


# ----------------------------------------------------------------------------- registration

MIN_TOKENS = 8192  # below this (batch·heads·n) a first compile costs more than the eager form


def _supports_linear(fq, fk, v, log_alpha, causal: bool) -> str | None:
    if fq.dim() == 4 and fq.shape[0] * fq.shape[1] * fq.shape[2] < MIN_TOKENS:
        return f"fewer than {MIN_TOKENS} query tokens over batch and heads: eager is cheaper"
    return _contract(fq, fk, v, causal, log_alpha)


def _forward_linear(fq, fk, v, log_alpha, *, causal: bool, chunk: int) -> torch.Tensor:
    """The ``linear_ops`` contract (the tuned or default chunk, not the pass's)."""
    del chunk  # the config space owns the chunk
    return forward(fq, fk, v, causal=causal, eps=1e-6, log_alpha=log_alpha)


TVM_LINEAR = register_kernel(
    Kernel(
        variant="linear",
        device_type="cpu",
        name="tvm",
        forward=_forward_linear,
        supports=_supports_linear,
        priority=10,
    )
)
