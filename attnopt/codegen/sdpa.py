"""torch's own ``scaled_dot_product_attention`` as a kernel, for the calls it expresses exactly.

On CPU it is the fast path for small problems, where a compiled kernel's thread-pool handoff
costs more than it saves (see ``tvm/exact.py`` ``MIN_WORK``), and a better fallback than the
reference everywhere its semantics match: no mask or an additive one, causal only when n == m
(or n == 1: one bottom-right query sees every key), no window, bool masks only with a -inf fill.
It returns no log-sum-exp (``None``): the op needs it only for a kernel's own backward, and this
kernel has none.

GQA decode (one query per head, ``g`` query heads per key/value head) runs as ``g`` queries of
each key/value head: one pass over the cache per kv head instead of ``g`` (``enable_gqa`` reads it
once per query head). On this CPU (2 threads, 8:2 heads, d 64) that was 2.4x at 2k keys and 2.7x at
8k against ``enable_gqa=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnopt.codegen.registry import Kernel, register_kernel


def supports(q, k, v, mask, causal: bool, window: int) -> str | None:
    causal = causal and q.shape[-2] > 1  # one query, bottom-right aligned: it sees every key
    if window:
        return "SDPA has no sliding window"
    if causal and q.shape[-2] != k.shape[-2]:
        return "SDPA's is_causal is top-left aligned; this call is causal with n != m"
    if causal and mask is not None:
        return "SDPA takes either is_causal or a mask"
    if mask is not None and mask.dtype == torch.bool:
        return "bool masks go to kernels that keep fully masked rows at 0 and honour the fill"
    if q.dtype not in (torch.float32, torch.float64) or q.dtype != k.dtype:
        return f"{q.dtype} on {q.device.type}: left to the compiled kernels"
    return None


def _folded_decode(q, k, v, mask, scale: float) -> torch.Tensor | None:
    """One GQA query per head as the group's queries of its kv head, or None when it does not
    apply (query heads of one group are consecutive, as ``repeat_interleave`` lays them out)."""
    batch, heads, n_q, _ = q.shape
    kv_heads = k.shape[1]
    if n_q != 1 or heads == kv_heads:
        return None
    if mask is not None and mask.dim() >= 3 and mask.shape[-3] != 1:
        if mask.stride(-3) != 0:
            return None  # it differs per query head: the group cannot share one row
        mask = mask.narrow(-3, 0, 1)  # expanded over heads: one head stands for all
    folded = q.reshape(batch, kv_heads, heads // kv_heads, q.shape[-1])
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, scale=scale)
    return out.reshape(batch, heads, 1, v.shape[-1])


def forward(q, k, v, mask, *, scale: float, causal: bool, window: int, fill: float):
    """``(out, None)`` for the calls ``supports`` accepts."""
    del window, fill  # excluded by supports()
    causal = causal and q.shape[-2] > 1  # one query sees every key (bottom-right alignment)
    out = _folded_decode(q, k, v, mask, scale)
    if out is None:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )  # fmt: skip
    if mask is not None:  # rows the mask removes entirely: 0, as every exact kernel gives
        dead = torch.isneginf(mask).all(dim=-1, keepdim=True)
        if bool(dead.any()):
            out = out.masked_fill(dead, 0.0)
    return out, None


register_kernel(
    Kernel(
        variant="exact",
        device_type="cpu",
        name="sdpa",
        forward=forward,
        supports=supports,
        priority=5,
    )
)
