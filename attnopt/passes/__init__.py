"""Rewrite passes, one file per variant, registered by name in ``PASSES``."""

from attnopt.passes import exact, linear, tensor  # noqa: F401  (register "exact", "linear", "gla", "hybrid", "tensor")
from attnopt.passes.base import PASSES, Replacement, SiteModule, register_pass

__all__ = ["PASSES", "Replacement", "SiteModule", "register_pass"]
