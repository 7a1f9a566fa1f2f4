"""torch's own ``scaled_dot_product_attention`` as a kernel, for the calls it expresses exactly.

On CPU it is the fast path for small problems, where a compiled kernel's thread-pool handoff
costs more than it saves (see ``tvm/exact.py`` ``MIN_WORK``), and a better fallback than the
reference everywhere its semantics match: no mask or an additive one, causal only when n == m
(or n == 1: one bottom-right query sees every key), no window, bool masks only with a -inf fill.
It returns no log-sum-exp (``None``): the op needs it only for a kernel's own backward, and this
kernel has none.
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


def forward(q, k, v, mask, *, scale: float, causal: bool, window: int, fill: float):
    """``(out, None)`` for the calls ``supports`` accepts."""
    del window, fill  # excluded by supports()
    causal = causal and q.shape[-2] > 1  # one query sees every key (bottom-right alignment)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
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
