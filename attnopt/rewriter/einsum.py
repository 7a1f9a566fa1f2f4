"""Which einsum equations are batched matrix products, shared by every front end."""

from __future__ import annotations


def einsum_as_matmul(equation: str) -> tuple | None:
    """Permutations (a, b, out) so that ``einsum == permute(a) @ permute(b)`` then ``out``.

    None when the equation is not a batched matrix product. A permutation that is the identity
    is returned as None.
    """
    if "->" not in equation or "..." in equation:
        return None
    inputs, out = equation.split("->")
    parts = inputs.split(",")
    if len(parts) != 2:
        return None
    a, c = parts
    if any(len(set(s)) != len(s) for s in (a, c, out)):
        return None
    batch = [x for x in out if x in a and x in c]
    contracted = [x for x in a if x in c and x not in out]
    free_a = [x for x in a if x not in c]
    free_c = [x for x in c if x not in a]
    if len(contracted) != 1 or len(free_a) != 1 or len(free_c) != 1:
        return None
    if set(a) != set(batch) | {*contracted, *free_a} or set(c) != set(batch) | {
        *contracted,
        *free_c,
    }:
        return None
    order_a = batch + free_a + contracted
    order_c = batch + contracted + free_c
    order_mm = batch + free_a + free_c
    if set(out) != set(order_mm) or out.index(free_a[0]) > out.index(free_c[0]):
        return None

    def perm(src: str, order: list) -> tuple | None:
        p = tuple(src.index(x) for x in order)
        return None if p == tuple(range(len(p))) else p

    return perm(a, order_a), perm(c, order_c), perm("".join(order_mm), list(out))
