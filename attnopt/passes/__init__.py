"""Rewrite passes, one file per variant, registered by name in ``PASSES``."""

from attnopt.passes import (  # noqa: F401  (each module registers its variants)
    conv_basis,
    exact,
    linear,
    prefix_ntk,
    quant,
    tensor,
)
from attnopt.passes.base import PASSES, Replacement, SiteModule, register_pass

__all__ = ["PASSES", "Replacement", "SiteModule", "register_pass"]
