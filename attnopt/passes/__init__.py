"""Rewrite passes, one file per variant, registered by name in ``PASSES``."""

from attnopt.passes import exact  # noqa: F401  (registers "exact")
from attnopt.passes.base import PASSES, Replacement, register_pass

__all__ = ["PASSES", "Replacement", "register_pass"]
