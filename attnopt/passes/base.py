"""What a pass is: ``applies(site, target)`` says why not, ``replacement(site)`` says what to call.

Passes never import a front end: a ``Replacement`` names the op and its static attributes, and
each front end's splicer turns it into nodes of its own graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from attnopt.rewriter.site import AttentionSite
from attnopt.targets import Target


@dataclass(frozen=True)
class Replacement:
    """Call ``op`` (a ``namespace::name`` custom op) on the site's q, k, v, mask and ``attrs``."""

    op: str
    attrs: dict = field(default_factory=dict)


class Pass(Protocol):
    name: str
    approximate: bool

    def applies(self, site: AttentionSite, target: Target) -> str | None:
        """None if the pass can rewrite the site, else the reason it cannot."""

    def replacement(self, site: AttentionSite) -> Replacement:
        """The op call that replaces the site."""


PASSES: dict[str, Pass] = {}


def register_pass(cls: type) -> type:
    """Class decorator: instantiate and register under ``cls.name``."""
    PASSES[cls.name] = cls()
    return cls
