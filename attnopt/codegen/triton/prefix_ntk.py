"""Prefix-NTK attention on the Triton exact kernel: exact attention over the input keys with the
prefix terms ``φ(q)ᵀZ``, ``φ(q)ᵀz`` added to numerator and denominator in the kernel's epilogue,
before its one division (no second pass over the output). Same contract as
``codegen/reference/prefix_ntk.py``."""

from __future__ import annotations

import torch

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
    prefix = (fq, Z, z)
    out, _ = triton_exact.forward(
        q, k, v, mask, scale=scale, causal=causal, fill=fill, prefix=prefix
    )
    return out
