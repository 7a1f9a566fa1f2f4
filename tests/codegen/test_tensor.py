"""Tensor attention: the naive einsum oracle against the definition written as loops, the fused
blocked form against the oracle (fp32 to 1e-5, causal, windowed, odd sizes, blocks smaller
than the sequence), and the polynomial approximation's error falling with its degree."""

import contextlib
import math

import pytest
import torch

from attnopt.codegen.eager import tensor as eager
from attnopt.codegen.reference import tensor as ref


@contextlib.contextmanager
def intra_op_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def inputs(b=1, h=2, n=13, m1=13, m2=13, d=4, dv=5, seed=0, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen) * spread
    k1 = torch.randn(b, h, m1, d, generator=gen)
    k2 = torch.randn(b, h, m2, d, generator=gen)
    v1 = torch.randn(b, h, m1, dv, generator=gen)
    v2 = torch.randn(b, h, m2, dv, generator=gen)
    return q, k1, k2, v1, v2


def by_loops(q, k1, k2, v1, v2, scale, causal, window):
    """ALGORITHMS.md §4 written out pair by pair (N == M), in float64."""
    q, k1, k2, v1, v2 = (t.double() for t in (q, k1, k2, v1, v2))
    b, h, n, _ = q.shape
    out = torch.zeros(b, h, n, v1.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                num, den = 0.0, 0.0
                for j in range(k1.shape[-2]):
                    for l in range(k2.shape[-2]):  # noqa: E741
                        if causal and (j > i or l > i):
                            continue
                        if window and (abs(i - j) >= window or abs(i - l) >= window):
                            continue
                        w = math.exp(
                            scale * float((q[bi, hi, i] * k1[bi, hi, j] * k2[bi, hi, l]).sum())
                        )
                        num = num + w * v1[bi, hi, j] * v2[bi, hi, l]
                        den += w
                out[bi, hi, i] = num / den
    return out


@pytest.mark.parametrize(("causal", "window"), [(False, 0), (True, 0), (True, 3)])
def test_naive_matches_definition(causal, window):
    args = inputs(h=1, n=5, m1=5, m2=5)
    expected = by_loops(*args, 0.7, causal, window)
    assert (
        rel(ref.tensor_attention(*args, scale=0.7, causal=causal, window=window), expected) < 1e-6
    )


@pytest.mark.parametrize(
    ("causal", "window", "sizes"),
    [
        (False, 0, (13, 13, 13)),
        (False, 0, (9, 11, 7)),  # cross: other key counts
        (True, 0, (13, 13, 13)),
        (True, 4, (21, 21, 21)),
        (False, 5, (13, 13, 13)),  # two-sided window
    ],
)
def test_fused_matches_naive(causal, window, sizes):
    n, m1, m2 = sizes
    args = inputs(n=n, m1=m1, m2=m2)
    expected = ref.tensor_attention(*args, scale=0.5, causal=causal, window=window)
    fused = eager.tensor_attention(
        *args, scale=0.5, causal=causal, window=window, block_q=4, block_k=3
    )
    assert rel(fused, expected) < 1e-5


def test_fused_keeps_large_scores_finite():
    args = inputs(spread=30.0)
    expected = ref.tensor_attention(*args, scale=1.0, causal=True)
    fused = eager.tensor_attention(*args, scale=1.0, causal=True, block_q=4, block_k=3)
    assert torch.isfinite(fused).all()
    assert rel(fused, expected) < 1e-5


@pytest.mark.parametrize(
    ("causal", "window", "sizes"),
    [
        (False, 0, (17, 19, 23)),
        (True, 0, (9, 6, 6)),  # n > m: the first rows see no key and give 0
        (True, 5, (19, 23, 23)),  # bottom-right aligned window
        (False, 4, (15, 15, 15)),
    ],
)
def test_fused_default_key_blocks_from_the_tile_bound(causal, window, sizes):
    n, m1, m2 = sizes
    args = inputs(n=n, m1=m1, m2=m2)
    expected = ref.tensor_attention(*args, scale=0.5, causal=causal, window=window)
    fused = eager.tensor_attention(
        *args, scale=0.5, causal=causal, window=window, block_q=5, tile_elems=300
    )
    assert torch.isfinite(fused).all()
    assert rel(fused, expected) < 1e-5


def test_fused_redoes_a_tile_whose_scores_pass_the_first_tiles_max():
    """The first key1 block's scores are small and later ones up to hundreds above them: the
    shift taken from the first block would overflow ``exp`` unless the tile is redone."""
    q, k1, k2, v1, v2 = inputs(n=8, m1=12, m2=8)
    k1 = torch.cat([k1[..., :3, :] * 0.01, k1[..., 3:, :] * 20.0], dim=-2)
    args = (q, k1, k2 * 3.0, v1, v2)
    scores = torch.einsum("bhid,bhjd,bhld->bhijl", q, args[1], args[2])
    assert scores[..., 3:, :].amax() - scores[..., :3, :].amax() > 100
    expected = ref.tensor_attention(*args, scale=1.0)
    fused = eager.tensor_attention(*args, scale=1.0, block_q=4, block_k=3)
    assert torch.isfinite(fused).all()
    assert rel(fused, expected) < 1e-5


def test_fused_rows_whose_first_key_block_is_masked_keep_very_negative_scores():
    """Every score is hundreds below 0 and, with a window, some rows see no key of their block's
    first key1 tile: their shift must come from their own pairs, not a default of 0."""
    q, k1, k2, v1, v2 = inputs(n=12, m1=12, m2=12)
    args = (q.abs() * 40, k1.abs() * 6, -k2.abs() * 6, v1, v2)
    expected = ref.tensor_attention(*args, scale=1.0, causal=True, window=3)
    assert torch.einsum("bhid,bhjd,bhld->bhijl", *args[:3]).amax() < -100
    fused = eager.tensor_attention(*args, scale=1.0, causal=True, window=3, block_q=4, block_k=2)
    assert rel(fused, expected) < 1e-5


def test_fused_never_builds_more_than_a_tile():
    """Counted, not timed: no op of the fused form, forward or backward, returns more elements
    than ``tile_elems`` (the naive form's scores alone have ``B·H·n·m²``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in result if isinstance(result, (tuple, list)) else [result]:
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return result

    # 12 batch·heads × 16 query rows × 24 keys pass the bound: they go in groups of 5
    args = inputs(b=3, h=4, n=24, m1=24, m2=24)
    leaves = [t.clone().requires_grad_() for t in args]
    # one thread: the dispatch mode sees this thread's ops only; the tiling is the same
    with intra_op_threads(1), Largest():  # the backward too: it recomputes the tiles
        out = eager.tensor_attention(*leaves, scale=0.5, causal=True, tile_elems=2048)
        out.sum().backward()
    values_with_ones = 12 * 24 * (5 + 1)  # the largest input-sized copy
    assert values_with_ones < Largest.numel <= 2048 < 12 * 24**3
    assert rel(out, ref.tensor_attention(*args, scale=0.5, causal=True)) < 1e-5


def test_fused_query_blocks_in_worker_threads_match_one_thread():
    """With several intra-op threads the query blocks go to that many Python threads (one
    intra-op thread each): forward and gradients as on one thread, and the caller's thread
    count is left as it was."""
    args = inputs(b=2, n=19, m1=17, m2=19)
    results = []
    for count in (1, 3):
        leaves = [t.clone().requires_grad_() for t in args]
        with intra_op_threads(count):
            out = eager.tensor_attention(*leaves, scale=0.5, causal=True, window=6, block_q=4)
            out.square().sum().backward()
            assert torch.get_num_threads() == count
        results.append([out.detach()] + [t.grad for t in leaves])
    expected = ref.tensor_attention(*args, scale=0.5, causal=True, window=6)
    assert rel(results[1][0], expected) < 1e-5
    for one, three in zip(*results, strict=True):
        assert rel(three, one) < 1e-6
    with intra_op_threads(3), torch.inference_mode():  # the workers write inference tensors
        out = eager.tensor_attention(*args, scale=0.5, causal=True, window=6, block_q=4)
    assert rel(out, expected) < 1e-5


def test_fused_training_saves_no_tiles_for_backward():
    """What autograd keeps between forward and backward: the inputs, the output and one
    log-sum-exp per query, not the ``B·H·n·m²`` probabilities of the tiles."""
    args = [t.requires_grad_() for t in inputs(n=16, m1=16, m2=16)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.numel()) or t, lambda t: t
    ):
        out = eager.tensor_attention(*args, scale=0.5, causal=True, block_q=4, tile_elems=256)
    allowed = sum(t.numel() for t in args) + out.numel() + out[..., 0].numel()
    assert 0 < sum(saved) <= allowed < 2 * 16**3


@pytest.mark.parametrize(
    ("causal", "window", "sizes", "blocks"),
    [
        (True, 4, (9, 9, 9), {"block_q": 4}),
        (False, 0, (10, 7, 11), {"block_q": 3, "tile_elems": 200}),  # groups of batch·heads
        (True, 0, (9, 6, 6), {"block_q": 4, "block_k": 2}),  # n > m: rows with no pair
    ],
)
def test_fused_gradients_match_the_naive_einsum(causal, window, sizes, blocks):
    n, m1, m2 = sizes
    args = inputs(b=2, n=n, m1=m1, m2=m2)
    grads = []
    for fn, kw in ((ref.tensor_attention, {}), (eager.tensor_attention, blocks)):
        leaves = [t.clone().requires_grad_() for t in args]
        out = fn(*leaves, scale=0.5, causal=causal, window=window, **kw)
        out.square().sum().backward()
        grads.append([t.grad for t in leaves])
    for expected, fused in zip(*grads, strict=True):
        assert torch.isfinite(fused).all()
        assert rel(fused, expected) < 1e-5


@pytest.mark.parametrize(("causal", "window"), [(False, 0), (True, 0), (True, 4)])
def test_polynomial_error_falls_with_degree(causal, window):
    args = inputs(n=16, m1=16, m2=16, spread=0.1)
    expected = ref.tensor_attention(*args, scale=0.5, causal=causal, window=window)
    errors = [
        rel(
            ref.polynomial_tensor_attention(
                *args, scale=0.5, degree=g, causal=causal, window=window
            ),
            expected,
        )
        for g in (1, 2, 3, 4)
    ]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-4


def test_polynomial_features_give_taylor_series():
    q, k1, k2, _, _ = inputs(n=3, m1=3, m2=3)
    u1 = ref.polynomial_features(q, 3, 0.5)
    u2, u3 = ref.polynomial_features(k1, 3), ref.polynomial_features(k2, 3)
    x = 0.5 * torch.einsum("bhid,bhjd,bhld->bhijl", q, k1, k2)
    taylor = 1 + x + x**2 / 2 + x**3 / 6
    assert rel(torch.einsum("bhir,bhjr,bhlr->bhijl", u1, u2, u3), taylor) < 1e-5


def test_dispatch_runs_a_registered_kernel_with_gradients():
    from attnopt.codegen.tensor_ops import tensor_forward

    args = [t.requires_grad_() for t in inputs(n=7, m1=7, m2=7)]
    out = tensor_forward(*args, scale=0.5, causal=True)
    assert rel(out, ref.tensor_attention(*args, scale=0.5, causal=True)) < 1e-5
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in args)
