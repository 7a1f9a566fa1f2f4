"""Prefix-NTK attention on the Triton exact kernel: its ``(out, lse)`` over the input keys, then
the prefix terms (``codegen/eager/prefix_ntk.combine``). Same contract as
``codegen/reference/prefix_ntk.py``. The combination runs as torch ops after the kernel (one
more pass over the ``(B, H, N, Dv)`` output), not inside the kernel's epilogue."""

from __future__ import annotations

import torch

from attnopt.codegen.eager.prefix_ntk import combine
from attnopt.codegen.triton import exact as triton_exact


def prefix_ntk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    Z: torch.Tensor,
    z: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float,
    causal: bool = False,
    fill: float = float("-inf"),
) -> torch.Tensor:
    out, lse = triton_exact.forward(q, k, v, mask, scale=scale, causal=causal, fill=fill)
    return combine(out, lse, fq.float(), Z, z).to(q.dtype)
