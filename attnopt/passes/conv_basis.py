"""conv_basis: causal attention as k causal FFT convolutions, chosen head by head
(ALGORITHMS.md §2).

The module first watches the calibration batches (``observing``): per head it recovers the
segment count ``k`` of the scores (tolerance ``tau``, cap ``k_max``), measures the conv-basis
output against exact attention, and checks whether the head's additive mask is a Toeplitz
position bias (ALiBi, relative bias). ``fit`` then keeps conv-basis on the heads whose
``k·log₂ n`` is at most ``n / MIN_GAIN`` and whose error fits the site budget; the other heads
of the site stay exact. Heads with a Toeplitz bias take their basis from the bias itself while
the content term ``scale·max‖q‖·max‖k‖`` stays within ``tau``. The bias's shift invariance is
checked on the calibration masks only (the per-call cost would be ``O(n²)``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from attnopt.codegen.eager.conv_basis import content_bound, conv_basis_attention
from attnopt.codegen.layout import HeadsLayout
from attnopt.passes.base import Replacement, SiteModule, register_pass, site_attrs
from attnopt.rewriter.site import AttentionSite
from attnopt.targets import Target
from attnopt.validate import ErrorSums, violations

MIN_GAIN = 4  # a head pays only if k·log₂ n ≤ n / MIN_GAIN (FFT work vs the n² scores)


def toeplitz_heads(mask: torch.Tensor) -> torch.Tensor:
    """Per head of a ``(B, H, n, n)`` additive mask: is its lower triangle a function of
    ``i − j`` alone, the same in every batch entry?"""
    lower = torch.ones(mask.shape[-2:], dtype=torch.bool, device=mask.device).tril()
    m = mask.float().masked_fill(~lower, 0.0)
    shifted = (m[..., 1:, 1:] - m[..., :-1, :-1]).abs().amax((-2, -1))
    same = (m - m[:1]).abs().amax((-2, -1))
    finite = torch.isfinite(mask.float().masked_fill(~lower, 0.0)).flatten(-2).all(-1)
    return ((shifted <= 1e-6) & (same <= 1e-6) & finite).all(0)


class ConvBasisSite(SiteModule):
    """One rewritten site: conv-basis on ``conv_heads``, exact softmax on the others."""

    observes = True

    def __init__(self, attrs: dict, heads: int, tau: float, k_max: int) -> None:
        super().__init__(attrs)
        self.tau, self.k_max = float(tau), int(k_max)
        self.register_buffer("conv_heads", torch.ones(heads, dtype=torch.bool), persistent=False)
        self.register_buffer("bias_heads", torch.zeros(heads, dtype=torch.bool), persistent=False)
        #: conv heads whose basis was the bias on every calibration call (set by ``fit``)
        self.register_buffer("bias_basis", torch.zeros(heads, dtype=torch.bool), persistent=False)
        self.fitted = False
        self._watch: dict[str, Any] | None = None

    def _full(self, heads: HeadsLayout):
        group = heads.q.shape[1] // heads.k.shape[1]
        k, v = heads.k, heads.v
        if group > 1:
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return heads.q, k, v, heads.mask

    def _conv(self, q, k, v, mask, pick: torch.Tensor, bias: torch.Tensor):
        sub = None if mask is None else mask[:, pick]
        return conv_basis_attention(
            q[:, pick],
            k[:, pick],
            v[:, pick],
            sub,
            scale=self.attrs["scale"],
            tau=self.tau,
            k_max=self.k_max,
            bias_heads=bias[pick],
        )

    def attend(self, heads: HeadsLayout) -> torch.Tensor:
        if heads.mask is not None and heads.mask.dtype == torch.bool:
            heads = HeadsLayout(
                heads.q,
                heads.k,
                heads.v,
                torch.zeros_like(heads.mask, dtype=torch.float32).masked_fill(
                    ~heads.mask, self.attrs["fill"]
                ),
                heads.out_shape,
            )
        if self._watch is not None:
            return self._observe(heads)
        q, k, v, mask = self._full(heads)
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=torch.float32, device=q.device)
        conv = self.conv_heads
        if bool(conv.any()):
            out[:, conv] = self._conv(q, k, v, mask, conv, self.bias_heads)[0]
        if not bool(conv.all()):
            rest = ~conv
            sub = None if mask is None else mask[:, rest].float() + _causal(q.shape[-2], q.device)
            out[:, rest] = F.scaled_dot_product_attention(
                q[:, rest].float(),
                k[:, rest].float(),
                v[:, rest].float(),
                attn_mask=sub,
                is_causal=sub is None,
                scale=self.attrs["scale"],
            )
        return out

    def _observe(self, heads: HeadsLayout) -> torch.Tensor:
        """Calibration: record each head's k, error and bias structure; give exact output."""
        q, k, v, mask = self._full(heads)
        watch, h, n = self._watch, q.shape[1], q.shape[-2]
        toeplitz = torch.zeros(h, dtype=torch.bool) if mask is None else toeplitz_heads(mask)
        everything = torch.ones(h, dtype=torch.bool)
        got, ks = self._conv(q, k, v, mask, everything, toeplitz)
        exact = self._exact(heads)
        watch["n"] = max(watch.get("n", 0), n)
        watch["k"] = torch.maximum(watch.get("k", ks.amax(0)), ks.amax(0))
        watch["toeplitz"] = watch.get("toeplitz", toeplitz) & toeplitz
        bound = content_bound(q, k, self.attrs["scale"]).amax(0).cpu()
        watch["content"] = torch.maximum(watch.get("content", bound), bound)
        sums = watch.setdefault("sums", [ErrorSums() for _ in range(h)])
        for head in range(h):
            sums[head].add(got[:, head], exact[:, head])
        return exact

    def watch(self, on: bool) -> None:
        """Start (or stop) recording calibration statistics."""
        self._watch = {} if on else None

    def fit(self, site_budget: dict[str, float]) -> tuple[str | None, list[dict]]:
        """Keep conv-basis on the heads that pay and fit the budget (from what ``watch`` saw);
        returns why no head qualifies (None if some do) and the per-head figures."""
        watch = self._watch or {}
        self._watch = None
        if "sums" not in watch:
            return "no calibration call reached this site", []
        n = watch["n"]
        from_bias = watch["toeplitz"] & (watch["content"] <= self.tau)
        rows, keep = [], []
        for head, sums in enumerate(watch["sums"]):
            metrics, k = sums.metrics(), int(watch["k"][head])
            why = None
            if k > self.k_max:
                why = f"k≥{k} > k_max={self.k_max} at tau={self.tau:g}"  # the search stops there
            elif k * math.log2(max(n, 2)) > n / MIN_GAIN:
                why = f"k={k}: k·log2 n={k * math.log2(n):.0f} > n/{MIN_GAIN}={n / MIN_GAIN:.0f}"
            else:
                broken = violations(metrics, site_budget)
                why = ", ".join(broken) or None
            keep.append(why is None)
            rows.append(
                {
                    "head": head,
                    "k": k,
                    "variant": "conv_basis" if why is None else "exact",
                    "basis": "bias" if bool(from_bias[head]) else "measured",
                    "rel_l1": metrics["rel_l1"],
                    "cos": metrics["cos"],
                    **({"reason": why} if why else {}),
                }
            )
        self.conv_heads.copy_(torch.tensor(keep))
        self.bias_heads.copy_(watch["toeplitz"])
        self.bias_basis.copy_(from_bias & torch.tensor(keep))
        self.fitted = True
        if not any(keep):
            return "no head qualifies: " + "; ".join(
                f"head {r['head']} {r['reason']}" for r in rows
            ), rows
        return None, rows


def _causal(n: int, device) -> torch.Tensor:
    return torch.full((n, n), float("-inf"), device=device).triu(1)


@register_pass
class ConvBasisPass:
    name = "conv_basis"
    approximate = True
    knobs: dict[str, tuple] = {"tau": (0.02, 0.005, 0.05, 0.1), "k_max": (16, 4, 64)}

    def applies(self, site: AttentionSite, target: Target) -> str | None:
        if site.dropout_p > 0:
            return f"dropout p={site.dropout_p} in training"
        if not site.causal:
            return "conv_basis needs causal self-attention; this site is not causal"
        if str(site.q_len) != str(site.kv_len):
            return f"causal with {site.q_len} queries and {site.kv_len} keys (needs n == m)"
        if site.window:
            return "sliding-window mask (a window site is served by 'local')"
        if not isinstance(site.heads, int):
            return "needs a static head count (heads are chosen one by one)"
        return None

    def replacement(self, site: AttentionSite, **knobs: Any) -> Replacement:
        chosen = {name: knobs.get(name, choices[0]) for name, choices in self.knobs.items()}
        module = ConvBasisSite(site_attrs(site), site.heads, chosen["tau"], chosen["k_max"])
        return Replacement(op="attnopt::conv_basis", attrs=chosen, module=module)
