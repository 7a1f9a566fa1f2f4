"""quant: 8-bit / 4-bit attention, SageAttention style (ALGORITHMS.md §6).

Q and K are quantized per block (K smoothed first) and ``QKᵀ`` runs on integers, ``P·V`` in
fp16 or FP8; no weights, so nothing to calibrate. It applies to every site the exact op does
(causal, windows, masks, GQA). The budget holds it to its own defaults, ``cos ≥ 0.995`` and
``rel_l1 ≤ 0.03`` per site, unless the user names the metrics.

``quant_projections=True`` also replaces the linear layers that produce q, k, v and read the
attention output (found in the graph) by LLM.int8()-style layers (``Int8Linear``); the site is
then measured and kept or reverted as a whole, from the projections' inputs to the output
projection's output.
"""

from __future__ import annotations

from typing import Any

import torch

from attnopt.codegen.eager.int8_linear import Int8Linear
from attnopt.codegen.layout import HeadsLayout
from attnopt.codegen.quant_ops import quant_forward
from attnopt.passes.base import Replacement, SiteModule, register_pass, site_attrs
from attnopt.rewriter.site import AttentionSite
from attnopt.targets import Target


class QuantSite(SiteModule):
    """One rewritten site: the quantized attention of its q, k, v with the site's flags."""

    def __init__(self, attrs: dict, bits: int, pv: str) -> None:
        super().__init__(attrs)
        self.bits, self.pv = int(bits), str(pv)

    def attend(self, heads: HeadsLayout) -> torch.Tensor:
        flags = {key: self.attrs[key] for key in ("scale", "causal", "window", "fill")}
        return quant_forward(
            heads.q, heads.k, heads.v, heads.mask, bits=self.bits, pv=self.pv, **flags
        )


@register_pass
class QuantPass:
    name = "quant"
    approximate = True
    knobs: dict[str, tuple] = {
        "bits": (8, 4),
        "pv": ("fp16", "bf16", "fp8", "int8"),
        "quant_projections": (False, True),
    }
    budget = {"cos": 0.995, "rel_l1": 0.03}

    def applies(self, site: AttentionSite, target: Target) -> str | None:
        if site.dropout_p > 0:
            return f"dropout p={site.dropout_p} in training"
        return None

    def replacement(self, site: AttentionSite, **knobs: Any) -> Replacement:
        chosen = {name: knobs.get(name, choices[0]) for name, choices in self.knobs.items()}
        module = QuantSite(site_attrs(site), chosen["bits"], chosen["pv"])
        linear = Int8Linear if chosen["quant_projections"] else None
        return Replacement(op="attnopt::quant", attrs=chosen, module=module, linear=linear)
