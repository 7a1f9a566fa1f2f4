"""TIR expression helpers shared by the TVM kernels: a vector ``exp2``, horizontal reductions.

Only kernel builders import this module (on their first compile), so it may import TVM at the top;
``import attnopt`` never reaches it. Every helper returns an expression, so a vectorized loop
around it stays one vector statement (a ``name = expr`` binding inside a vectorized loop would
become a mutable scalar and break vectorization).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

# Keeps an allocation an LLVM ``alloca`` whatever its size, so register tiles indexed by
# constants after unrolling are promoted to vector registers (TVM otherwise moves buffers over
# 1 KiB, and every "local" one, to heap workspaces that LLVM cannot promote).
STACK = {"disable_lower_builtin": True}

# Minimax polynomial of 2^r on [-1/2, 1/2] (lowest degree first): relative error 2.3e-7 when
# evaluated in fp32, about two ulps, far inside the 1e-5 the exact kernels are held to.
EXP2_COEFFS = (
    1.0000001192092896,
    0.6931469440460205,
    0.24022120237350464,
    0.05550713092088699,
    0.009675541892647743,
    0.001327647129073739,
)
# 2^t is flushed to 0 below this: it keeps the result normal (subnormals stall x86 FMAs) and
# sends the -inf of excluded keys to exactly 0.
EXP2_MIN = -125.0


def exp2(t):
    """``2^t`` for ``t <= 0`` (or ``-inf``): round, polynomial, exponent bits added as integers.

    Intermediates are ``Let`` bindings: as a tree the polynomial repeats its argument at every
    step, and TVM's simplifier then spends seconds on each of the kernel's exponentials.
    """
    arg, clamped, whole, frac = (tirx.Var(name, "float32") for name in ("t", "c", "w", "f"))
    poly = T.float32(EXP2_COEFFS[-1])
    for coeff in reversed(EXP2_COEFFS[:-1]):
        poly = poly * frac + T.float32(coeff)
    bits = T.reinterpret("int32", poly) + T.shift_left(T.Cast("int32", whole), 23)
    value = T.Select(arg < T.float32(EXP2_MIN), T.float32(0.0), T.reinterpret("float32", bits))
    value = tirx.Let(frac, clamped - whole, value)
    # floor, not nearbyint: TVM's vectorizer handles floor only
    value = tirx.Let(whole, T.floor(clamped + T.float32(0.5)), value)
    value = tirx.Let(clamped, T.max(arg, T.float32(EXP2_MIN)), value)
    return tirx.Let(arg, t, value)


def lanes(buffer, *index, width: int):
    """The vector ``buffer[*index[:-1], start:start + width]`` (``start = index[-1]``) as an
    expression: a load with a ramp index."""
    *outer, start = index
    start = T.int32(start) if isinstance(start, int) else start
    return buffer[(*outer, tirx.Ramp(start, 1, width))]


def _halves(vec, width: int, combine):
    while width > 1:
        width //= 2
        low = tirx.Shuffle([vec], [tirx.IntImm("int32", i) for i in range(width)])
        high = tirx.Shuffle([vec], [tirx.IntImm("int32", i + width) for i in range(width)])
        vec = combine(low, high)
    return vec


def hmax(vec, width: int):
    """Max of a vector's lanes by halving shuffles (LLVM's reduce intrinsic scalarizes on x86)."""
    return _halves(vec, width, T.max)


def hsum(vec, width: int):
    """Sum of a vector's lanes by halving shuffles (a tree, not LLVM's ordered reduction)."""
    return _halves(vec, width, lambda a, b: a + b)


def transpose(vectors: list, width: int) -> list:
    """The ``width`` × ``width`` transpose of ``width`` vectors (rows) as ``width`` vectors, in
    log2(width) stages of two-input shuffles that swap off-diagonal blocks (one permute each)."""
    rows = list(vectors)
    step = width // 2
    while step:
        swapped = list(rows)
        for r in range(width):
            if r & step:
                continue
            low, high = rows[r], rows[r | step]
            keep_low = [c if not c & step else width + (c ^ step) for c in range(width)]
            keep_high = [c ^ step if not c & step else width + c for c in range(width)]
            swapped[r] = tirx.Shuffle([low, high], [tirx.IntImm("int32", i) for i in keep_low])
            swapped[r | step] = tirx.Shuffle(
                [low, high], [tirx.IntImm("int32", i) for i in keep_high]
            )
        rows = swapped
        step //= 2
    return rows


def concat(vectors: list, width: int):
    """One vector holding ``vectors`` (each ``width`` lanes) end to end."""
    return tirx.Shuffle(vectors, [tirx.IntImm("int32", i) for i in range(width * len(vectors))])


def heads_buffers(q, k, v, mask, o, lse, spec):
    """The buffers of the kernels' contract, declared inside a ``prim_func`` body:
    ``B, H, HK, N, M, Q, K, V, MASK, OUT, LSE = heads_buffers(q, k, v, mask, o, lse, spec)``.

    q ``(B, H, N, D)``, k ``(B, HK, M, D)``, v ``(B, HK, M, Dv)`` with any outer strides and a
    contiguous last dim (strided views need no copy); the mask with any shape that broadcasts
    and ``spec.mask_key_stride`` along keys; out and lse contiguous. Sizes are symbolic.
    """
    d64, dv64, unit = T.int64(spec.head_dim), T.int64(spec.value_dim), T.int64(1)
    B, H, HK, N, M = (T.int64() for _ in range(5))
    sq, sk, sv, sm = ([T.int64() for _ in range(3)] for _ in range(4))
    Q = T.match_buffer(q, (B, H, N, d64), spec.dtype, strides=(*sq, unit))
    K = T.match_buffer(k, (B, HK, M, d64), spec.dtype, strides=(*sk, unit))
    V = T.match_buffer(v, (B, HK, M, dv64), spec.dtype, strides=(*sv, unit))
    mask_shape = tuple(T.int64() for _ in range(4))
    key_stride = T.int64(spec.mask_key_stride)
    MASK = T.match_buffer(mask, mask_shape, spec.mask_dtype, strides=(*sm, key_stride))
    OUT = T.match_buffer(o, (B, H, N, dv64), spec.dtype)
    LSE = T.match_buffer(lse, (B, H, N), "float32")
    return B, H, HK, N, M, Q, K, V, MASK, OUT, LSE
