"""Rewrite passes, one file per variant, registered by name in ``PASSES``."""

from attnopt.passes import exact, linear, prefix_ntk  # noqa: F401  (register the variants)
from attnopt.passes.base import PASSES, Replacement, SiteModule, register_pass

__all__ = ["PASSES", "Replacement", "SiteModule", "register_pass"]
