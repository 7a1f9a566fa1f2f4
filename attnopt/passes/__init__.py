"""Rewrite passes, one file per variant, registered by name in ``PASSES``."""

from attnopt.passes import (  # noqa: F401  (register "exact", "conv_basis", "linear", "gla", "hybrid")
    conv_basis,
    exact,
    linear,
)
from attnopt.passes.base import PASSES, Replacement, SiteModule, register_pass

__all__ = ["PASSES", "Replacement", "SiteModule", "register_pass"]
