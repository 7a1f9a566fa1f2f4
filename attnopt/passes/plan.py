"""Pick a pass per site from the variants the user allows, in their order of preference."""

from __future__ import annotations

from dataclasses import dataclass

from attnopt.errors import AttnoptError
from attnopt.passes.base import PASSES, Pass
from attnopt.rewriter.site import AttentionSite
from attnopt.targets import Target


@dataclass
class Choice:
    site: AttentionSite
    chosen: Pass | None
    reasons: list[str]


def check_variants(variants: tuple[str, ...]) -> list[Pass]:
    unknown = [v for v in variants if v not in PASSES]
    if unknown:
        known = ", ".join(sorted(PASSES))
        raise AttnoptError(f"unknown variant(s) {unknown}; available now: {known}")
    return [PASSES[v] for v in variants]


def applicable(
    site: AttentionSite, variants: tuple[str, ...], target: Target
) -> tuple[list[Pass], list[str]]:
    """The allowed passes that apply to ``site`` in preference order, and why the others not."""
    passes, reasons = [], []
    for p in check_variants(variants):
        why_not = p.applies(site, target)
        if why_not is None:
            passes.append(p)
        else:
            reasons.append(f"{p.name}: {why_not}")
    return passes, reasons


def plan(sites: list[AttentionSite], variants: tuple[str, ...], target: Target) -> list[Choice]:
    """For each site, the first allowed pass that applies, with the reasons the others did not."""
    check_variants(variants)
    choices = []
    for site in sites:
        passes, reasons = applicable(site, variants, target)
        choices.append(Choice(site, passes[0] if passes else None, reasons))
    return choices
