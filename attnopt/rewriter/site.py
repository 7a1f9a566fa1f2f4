"""AttentionSite: the one description of an attention region every later stage reads."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from attnopt.codegen.signature import KernelSignature
from attnopt.rewriter.canonicalize import TracedOperand


@dataclass(frozen=True)
class MaskTerm:
    """One mask applied to the scores: ``additive`` (value × multiplier is added), ``keep`` (a
    bool tensor; pairs where it is False take the site's fill value) or ``drop`` (pairs where
    it is True take the fill value)."""

    operand: TracedOperand
    kind: str
    multiplier: float = 1.0
    #: (reshape giving the layout the mask is applied in, reshape back to the scores' layout),
    #: when the model views the scores differently around the mask (OPT/BART-style 3-D bmm)
    relayout: tuple[str, str] | None = None


@dataclass
class AttentionSite:
    """``out = softmax(scale·Q·Kᵀ + masks)·V`` found in a graph, with what replacing it needs.

    ``q``/``k``/``v`` are graph values (view node ids plus a permutation) in the layout the
    op takes: ``q (*Lq, N, D)``, ``k``/``v`` ``(*Lk, M, D)`` with matmul broadcasting, and
    ``kv_group`` query heads per kv head when repeated K/V were looked through.
    """

    location: str
    q: TracedOperand
    k: TracedOperand
    v: TracedOperand
    scale: float
    output: str  # view node whose value the site produces
    nodes: list[str]  # view nodes the site replaces
    scores_shape: tuple
    q_shape: tuple
    v_shape: tuple
    dtype: str | None
    output_dtype: str | None
    masks: list[MaskTerm] = field(default_factory=list)
    causal: bool = False
    window: int = 0
    fill: float = -math.inf
    kv_group: int = 1
    dropout_p: float = 0.0
    output_perm: tuple | None = None
    is_cross: bool = False
    #: tokens of an input-independent prefix the keys and values start with (``[P_K; K]``)
    prefix_len: int | None = None
    source: str = "matmul"  # "matmul" (decomposed) or "sdpa" (an existing fused call)
    k_shape_lead: tuple = ()  # leading dims of k as the op receives it
    #: "standard", or "tensor": attention over key pairs (ALGORITHMS.md §4), where ``k``/``v``
    #: are the first key and value sets, ``k2``/``v2`` the second and ``pair_len`` their length
    kind: str = "standard"
    k2: TracedOperand | None = None
    v2: TracedOperand | None = None
    pair_len: Any = None

    #: ``shape`` nodes outside the site reading the shape of a value of the scores' shape
    #: (ONNX's ``expand_as(scores)``): the front end recomputes them from q and k
    shape_reads: list[str] = field(default_factory=list)

    @property
    def mask_kind(self) -> str:
        kinds = []
        if self.causal:
            kinds.append("causal")
        if self.window:
            kinds.append("sliding_window")
        if any(t.kind == "additive" for t in self.masks):
            kinds.append("additive")
        if any(t.kind in ("keep", "drop") for t in self.masks):
            kinds.append("boolean")
        return "+".join(kinds) or "none"

    @property
    def heads(self) -> Any:
        lead = self.scores_shape[:-2]
        return lead[-1] if lead else 1

    @property
    def kv_heads(self) -> Any:
        k_lead = self.k_shape_lead
        if self.kv_group > 1:
            return k_lead[-1] if k_lead else 1
        if k_lead and k_lead[-1] == 1 and self.heads != 1:
            return 1
        return self.heads

    @property
    def batch(self) -> Any:
        lead = self.scores_shape[:-2]
        return math.prod(lead[:-1]) if len(lead) > 1 else 1

    @property
    def q_len(self) -> Any:
        return self.scores_shape[-2]

    @property
    def kv_len(self) -> Any:
        return self.scores_shape[-1]

    @property
    def head_dim(self) -> Any:
        return self.q_shape[-1]

    def describe(self) -> str:
        """A one-line signature for reports: ``B×H×N×M×D``, heads, dtype, flags."""
        dims = "×".join(str(s) for s in self.scores_shape[:-2])
        heads = f"{self.heads}q/{self.kv_heads}kv heads"
        kind = "cross" if self.is_cross else "self"
        if self.kind == "tensor":
            return (
                f"[{dims}] tensor n={self.q_len} m1={self.kv_len} m2={self.pair_len} "
                f"d={self.head_dim} scale={self.scale:.4g} {self.dtype}"
            )
        return (
            f"[{dims}] n={self.q_len} m={self.kv_len} d={self.head_dim} {heads} "
            f"scale={self.scale:.4g} {self.dtype} {kind}"
            + (f" prefix={self.prefix_len}" if self.prefix_len else "")
        )

    def signature(self, example_shapes: dict | None = None) -> KernelSignature:
        """The kernel signature at the capture's example sizes (symbols given as their hint)."""

        def concrete(size: Any, default: int) -> int:
            if isinstance(size, int):
                return size
            if example_shapes and str(size) in example_shapes:
                return int(example_shapes[str(size)])
            return default

        return KernelSignature(
            head_dim=concrete(self.head_dim, 64),
            dtype=self.dtype or "float32",
            mask_kind=self.mask_kind,
            kv_group=self.kv_group if self.kv_group > 1 else 1,
            n=concrete(self.q_len, 1024),
            m=concrete(self.kv_len, 1024),
            heads=concrete(self.heads, 8),
            batch=concrete(self.batch, 1),
            value_dim=concrete(self.v_shape[-1], 64),
        )


@dataclass(frozen=True)
class NearMiss:
    """A region that looked like attention but broke a rule, so it was left alone."""

    location: str
    rule: str
    node: str
