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


def plan(sites: list[AttentionSite], variants: tuple[str, ...], target: Target) -> list[Choice]:
    """For each site, the first allowed pass that applies, with the reasons the others did not."""
    unknown = [v for v in variants if v not in PASSES]
    if unknown:
        known = ", ".join(sorted(PASSES))
        raise AttnoptError(f"unknown variant(s) {unknown}; available now: {known}")
    choices = []
    for site in sites:
        reasons, chosen = [], None
        for name in variants:
            why_not = PASSES[name].applies(site, target)
            if why_not is None:
                chosen = PASSES[name]
                break
            reasons.append(f"{name}: {why_not}")
        choices.append(Choice(site, chosen, reasons))
    return choices
