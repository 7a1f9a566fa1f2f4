"""Plain-torch exact attention: the oracle every exact kernel is tested against, and the fallback.

Contract shared by every exact kernel (reference, Triton, TVM):

- ``q``: ``(B, H, N, D)``; ``k``: ``(B, Hkv, M, D)``; ``v``: ``(B, Hkv, M, Dv)``, ``H % Hkv == 0``
  (query head ``h`` reads kv head ``h // (H // Hkv)``). Any strides, including 0 (expanded).
- ``mask``: ``None``; a float tensor of shape ``(B, H, N, M)`` added to the scaled scores; or a
  bool tensor of that shape, True where a key may be attended, False replaced by ``fill``.
  Masks usually arrive expanded from a broadcast shape (stride 0): read them, never copy.
- ``causal``: query ``i`` sees key ``j`` only if ``j <= i + (M - N)`` (bottom-right aligned,
  which is the usual top-left alignment when ``N == M``).
- ``window``: if > 0, query ``i`` sees key ``j`` only if ``|i + (M - N) - j| < window``
  (with ``causal`` that is the last ``window`` keys up to the diagonal).
- Rows whose keys are all excluded give 0 output and ``-inf`` log-sum-exp, never NaN.
- Returns ``(out, lse)``: ``out`` ``(B, H, N, Dv)`` in ``q.dtype``; ``lse`` ``(B, H, N)`` fp32,
  the natural-log log-sum-exp of each row of the final scores.
"""

from __future__ import annotations

import torch


def structural_keep(
    n: int, m: int, causal: bool, window: int, device: torch.device
) -> torch.Tensor:
    """The (n, m) bool matrix of pairs allowed by the causal / window flags."""
    rows = torch.arange(n, device=device)[:, None] + (m - n)
    cols = torch.arange(m, device=device)[None, :]
    keep = torch.ones(n, m, dtype=torch.bool, device=device)
    if causal:
        keep &= cols <= rows
    if window > 0:
        keep &= (rows - cols).abs() < window
    return keep


def key_range(n: int, m: int, causal: bool, window: int) -> tuple[int, int]:
    """``[first, last)``: the keys some query may see under the causal / window flags (a decode
    kernel splits only these; a window's, not the whole cache)."""
    if window <= 0:
        return 0, m
    offset = m - n
    last = m if causal else min(m, offset + n - 1 + window)
    return max(0, offset - window + 1), last


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float,
    causal: bool = False,
    window: int = 0,
    fill: float = float("-inf"),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention in fp32, following the contract in this module's docstring."""
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    kf = k.float().repeat_interleave(group, dim=1) if group > 1 else k.float()
    vf = v.float().repeat_interleave(group, dim=1) if group > 1 else v.float()
    scores = torch.matmul(q.float(), kf.transpose(-2, -1)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, fill)
        else:
            scores = scores + mask.float()
    n, m = q.shape[-2], k.shape[-2]
    if causal or window > 0:
        keep = structural_keep(n, m, causal, window, q.device)
        scores = scores.masked_fill(~keep, float("-inf"))
    # Shift by the row max (0 for rows with nothing visible): a row whose every score is the
    # same huge negative value (HF's finfo.min padding) must still average V, not sum it.
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    probs = weights / total.clamp_min(torch.finfo(torch.float32).tiny)
    lse = (row_max + total.log()).squeeze(-1)
    out = torch.matmul(probs, vf)
    return out.to(q.dtype), lse
