"""prefix_ntk against exact attention over the concatenated keys as the prefix grows.

    python benchmarks/bench_prefix_ntk.py --threads 1                  # CPU, prefix 1k..64k
    python benchmarks/bench_prefix_ntk.py --prefixes 1024 4096 65536 --device cuda

For each prefix length ``p``: ``n`` queries attend to ``[P_K; K]`` (``p`` prefix tokens plus
``n`` input tokens, causal over the input part). ``exact`` is ``F.scaled_dot_product_attention``
over all ``p + n`` keys (its default backend; the prefix visible to every query as a bool mask).
``prefix_ntk`` is the rewritten site's module (``PrefixNTKSite``: exact attention over the ``n``
input keys plus the ``Z, z`` terms), with ``Z, z`` fitted on one set of random queries and the
error (cos, rel_l1 against the exact output) measured on another. Random prefixes and queries:
the error says how the fit behaves, not what a trained prefix gives. Median of timed runs
(``torch.utils.benchmark``), best of ``--rounds`` turns; the ratio is exact / prefix_ntk.

    python benchmarks/bench_prefix_ntk.py --module-only --rounds 3

times the module alone (``Z, z`` unfitted, no exact baseline) at every prefix length in
interleaved turns, so a shared machine's load falls on all lengths alike: is the time flat?
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from attnopt.passes.prefix_ntk import PrefixNTKSite
from attnopt.validate import ErrorSums


def median_ms(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
        best = min(best, timer.blocked_autorange(min_run_time=0.3).median * 1e3)
    return best


def row(p: int, args, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(p)
    h, n, d = args.heads, args.n, args.d

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    pk, pv = rand(1, h, p, d), rand(1, h, p, d)
    k, v = torch.cat([pk, rand(1, h, n, d)], dim=2), torch.cat([pv, rand(1, h, n, d)], dim=2)
    q_fit, q = rand(1, h, n, d), rand(1, h, n, d)
    scale = d**-0.5
    attrs = {"scale": scale, "causal": True, "window": 0, "fill": float("-inf"), "kv_group": 1}
    module = PrefixNTKSite(attrs, p, h, d, d, args.feature_dim).to(device)
    keep = torch.ones(n, p + n, dtype=torch.bool, device=device).tril(p)
    with torch.no_grad():
        module(q_fit, k, v, None)  # the first call fits Z, z
        exact = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
        sums = ErrorSums()
        sums.add(module(q, k, v, None), exact)
        metrics = sums.metrics()
        t_exact = median_ms(
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale),
            args.rounds,
        )
        t_ntk = median_ms(lambda: module(q, k, v, None), args.rounds)
    return {"prefix": p, "exact_ms": t_exact, "ntk_ms": t_ntk, **metrics}


def module_only(args, device: torch.device) -> None:
    """Each round times the module at every prefix length in turn (prints ms per round)."""
    h, n, d = args.heads, args.n, args.d
    attrs = {"scale": d**-0.5, "causal": True, "window": 0, "fill": float("-inf"), "kv_group": 1}
    calls = {}
    for p in args.prefixes:
        module = PrefixNTKSite(attrs, p, h, d, d, args.feature_dim).to(device)
        module.fitted.fill_(True)
        q, k, v = (torch.randn(1, h, m, d, device=device) for m in (n, p + n, p + n))
        calls[p] = (module, q, k, v)
    print(f"{'prefix':>7} " + " ".join(f"{'round ' + str(r):>8}" for r in range(args.rounds)))
    times = {p: [] for p in calls}
    with torch.no_grad():
        for _ in range(args.rounds):
            for p, (module, q, k, v) in calls.items():
                times[p].append(median_ms(lambda m=module, a=(q, k, v): m(*a, None), 1))
    for p, row_ms in times.items():
        print(f"{p:>7} " + " ".join(f"{t:>8.2f}" for t in row_ms))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prefixes", type=int, nargs="+", default=[1024 << i for i in range(7)])
    parser.add_argument("--n", type=int, default=512, help="queries (and input keys)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--feature-dim", type=int, default=0, help="d' (0: the head dim)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--module-only", action="store_true", help="time prefix_ntk alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"device={args.device} threads={torch.get_num_threads()} n={args.n} heads={args.heads} "
        f"d={args.d} d'={args.feature_dim or args.d} fp32, causal over the input keys"
    )
    if args.module_only:
        module_only(args, device)
        return
    print(f"{'prefix':>7} {'exact ms':>9} {'ntk ms':>8} {'ratio':>6} {'cos':>7} {'rel_l1':>7}")
    for p in args.prefixes:
        r = row(p, args, device)
        ratio = r["exact_ms"] / r["ntk_ms"]
        print(
            f"{p:>7} {r['exact_ms']:>9.2f} {r['ntk_ms']:>8.2f} {ratio:>6.1f} "
            f"{r['cos']:>7.4f} {r['rel_l1']:>7.4f}"
        )


if __name__ == "__main__":
    main()
