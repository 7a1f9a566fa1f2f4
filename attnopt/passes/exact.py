"""exact: every site becomes one ``attnopt::attention`` call (fused online-softmax kernels)."""

from __future__ import annotations

from attnopt.passes.base import Replacement, register_pass, site_attrs
from attnopt.rewriter.site import AttentionSite
from attnopt.targets import Target


@register_pass
class ExactPass:
    name = "exact"
    approximate = False
    knobs: dict[str, tuple] = {}

    def applies(self, site: AttentionSite, target: Target) -> str | None:
        if site.kind == "tensor":
            return "tensor attention over key pairs: allow variant 'tensor' (its fused kernel)"
        if site.dropout_p > 0:
            return f"dropout p={site.dropout_p} in training is not reproduced by the fused op"
        return None

    def replacement(self, site: AttentionSite, **knobs) -> Replacement:
        return Replacement(op="attnopt::attention", attrs=site_attrs(site))
