"""What a kernel needs to know about a site: shapes and flags, never graph nodes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelSignature:
    """The static facts a kernel is specialised and tuned on.

    ``n``/``m`` are query/key lengths (the tuner buckets them in powers of two); ``mask_kind`` is
    ``none``, ``causal``, ``additive``, ``boolean`` or ``sliding_window``.
    """

    head_dim: int
    dtype: str
    mask_kind: str = "none"
    kv_group: int = 1
    n: int = 1024
    m: int = 1024
    heads: int = 8
    batch: int = 1
    value_dim: int | None = None

    @classmethod
    def of(
        cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_kind: str
    ) -> KernelSignature:
        """The signature of a call in the kernels' 4-D layout."""
        return cls(
            head_dim=q.shape[-1],
            dtype=str(q.dtype).removeprefix("torch."),
            mask_kind=mask_kind,
            kv_group=q.shape[1] // k.shape[1],
            n=q.shape[-2],
            m=k.shape[-2],
            heads=q.shape[1],
            batch=q.shape[0],
            value_dim=v.shape[-1],
        )
