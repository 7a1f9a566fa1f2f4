"""What a pass is: ``applies(site, target)`` says why not, ``replacement(site)`` says what to call.

Passes never import a front end: a ``Replacement`` names the op and its static attributes (or,
for approximate variants with weights of their own, the module to call), and each front end's
splicer turns it into nodes of its own graph.

A new variant is one file in ``passes/`` with a class registered by ``@register_pass``: its
``name``, ``approximate``, its ``knobs`` (each a tuple of choices, the first the default; the
variant search reads them as its space) and the two methods below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from attnopt.codegen.layout import HeadsLayout, to_heads
from attnopt.codegen.reference.exact import exact_attention
from attnopt.rewriter.site import AttentionSite
from attnopt.targets import Target


@dataclass(frozen=True)
class Replacement:
    """Call ``op`` (a ``namespace::name`` custom op) on the site's q, k, v, mask and ``attrs``;
    or, when ``module`` is set, call that module on ``(q, k, v, mask)`` instead.

    ``linear(weight, bias)``, when set, builds the layer that replaces the site's projections:
    the front end finds the linear layers producing q, k, v and reading the output
    (``rewriter/projections.py``), and the site is then measured from their inputs to the
    output projection's output, or says why they were kept."""

    op: str
    attrs: dict = field(default_factory=dict)
    module: nn.Module | None = None
    linear: Callable[[torch.Tensor, torch.Tensor | None], nn.Module] | None = None


class Pass(Protocol):
    name: str
    approximate: bool
    knobs: dict[str, tuple]

    def applies(self, site: AttentionSite, target: Target) -> str | None:
        """None if the pass can rewrite the site, else the reason it cannot."""

    def replacement(self, site: AttentionSite, **knobs: Any) -> Replacement:
        """The op call that replaces the site, for the given knob values (defaults if absent)."""


PASSES: dict[str, Pass] = {}


def register_pass(cls: type) -> type:
    """Class decorator: instantiate and register under ``cls.name``."""
    if not hasattr(cls, "knobs"):
        cls.knobs = {}
    PASSES[cls.name] = cls()
    return cls


def default_knobs(p: Pass) -> dict[str, Any]:
    return {name: choices[0] for name, choices in p.knobs.items()}


def check_knob(p: Pass, name: str, value: Any) -> str | None:
    """None if ``value`` is a valid setting of ``p``'s knob ``name``, else why not. A knob whose
    choices are names takes one of them, a switch (choices ``False, True``) a bool; an integer
    knob any integer ≥ 1 (≥ 0 when 0 is among its choices) that the pass's own ``check_knob``
    (if any) accepts."""
    if name not in p.knobs:
        return f"{p.name} has no knob {name!r} (knobs: {', '.join(sorted(p.knobs)) or 'none'})"
    choices = p.knobs[name]
    if all(isinstance(c, bool) for c in choices):
        return None if isinstance(value, bool) else f"{p.name} {name}={value!r}; expected a bool"
    if all(isinstance(c, str) for c in choices):
        if value not in choices:
            return f"{p.name} {name}={value!r}; choose one of {', '.join(choices)}"
        return None
    lowest = 0 if 0 in choices else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        return f"{p.name} {name}={value!r}; expected an integer >= {lowest}"
    own = getattr(p, "check_knob", None)
    return own(name, value) if own is not None else None


def site_attrs(site: AttentionSite) -> dict:
    """The static facts of a site every replacement needs (the exact op's attributes)."""
    return {
        "scale": float(site.scale),
        "causal": site.causal,
        "window": int(site.window),
        "fill": float(site.fill),
        "kv_group": int(site.kv_group),
    }


class SiteModule(nn.Module):
    """Base of approximate replacements with weights: takes the site's q, k, v, mask in the
    site's layout, computes ``attend`` on the kernels' 4-D layout, and gives the output back.

    While ``transfer`` is a list (``attnopt.calibrate`` sets it), each call also appends the
    MSE between its output and the exact softmax attention of the same inputs: the attention
    transfer loss of ALGORITHMS.md §3.

    A module with ``observes = True`` settles choices of its own (conv_basis: which heads) on
    the calibration batches: the budget calls ``watch(True)``, runs the batches, then ``fit``.
    """

    observes = False

    def watch(self, on: bool) -> None:
        """Start (or stop) recording what ``fit`` needs from the calibration calls."""

    def fit(self, site_budget: dict[str, float]) -> tuple[str | None, list[dict]]:
        """Settle within ``site_budget``; returns why nothing fits (None if it does) and the
        per-part figures the report shows (one dict per head for conv_basis)."""
        return None, []

    def __init__(self, attrs: dict) -> None:
        super().__init__()
        self.attrs = dict(attrs)
        self.transfer: list[torch.Tensor] | None = None

    def attend(self, heads: HeadsLayout) -> torch.Tensor:
        raise NotImplementedError

    def _exact(self, heads: HeadsLayout) -> torch.Tensor:
        flags = {key: self.attrs[key] for key in ("scale", "causal", "window", "fill")}
        with torch.no_grad():
            out, _ = exact_attention(heads.q, heads.k, heads.v, heads.mask, **flags)
        return out

    def teacher(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        """What the original site computes from the same inputs (exact softmax attention)."""
        heads = to_heads(q, k, v, mask, self.attrs["kv_group"])
        return self._exact(heads).reshape(heads.out_shape).to(q.dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        heads = to_heads(q, k, v, mask, self.attrs["kv_group"])
        out = self.attend(heads)
        if self.transfer is not None:
            self.transfer.append(F.mse_loss(out.float(), self._exact(heads).float()))
        return out.reshape(heads.out_shape).to(q.dtype)
