"""Pick a pass per site from the variants the user allows, in their order of preference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attnopt.errors import AttnoptError
from attnopt.passes.base import PASSES, Pass, check_knob
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


def site_knobs(
    knobs: dict | None, variants: tuple[str, ...], locations: list[str]
) -> list[dict[str, dict]]:
    """Per site, the knob values the user fixed, ``{variant: {knob: value}}``.

    ``knobs`` maps a variant name to its knob values at every site, or a site (its index in the
    report, or its location such as ``"blocks.0"``) to ``{variant: {knob: value}}`` there; a
    site's own values win over its variant's."""
    every: dict[str, dict] = {}
    per_site: list[dict[str, dict]] = [{} for _ in locations]
    for key, value in (knobs or {}).items():
        if isinstance(key, str) and key in PASSES:
            every[key] = _checked(key, value, variants, "")
            continue
        if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(locations):
            index = key
        elif isinstance(key, str) and key in locations:
            index = locations.index(key)
        else:
            raise AttnoptError(
                f"knobs key {key!r} is neither a variant ({', '.join(sorted(PASSES))}) nor a "
                f"site (an index below {len(locations)} or one of {locations})"
            )
        if not isinstance(value, dict):
            raise AttnoptError(f"knobs[{key!r}] must map variants to knob values, not {value!r}")
        where = f" at site {locations[index]}"
        per_site[index] = {v: _checked(v, kv, variants, where) for v, kv in value.items()}
    return [
        {v: {**every.get(v, {}), **mine.get(v, {})} for v in {*every, *mine}} for mine in per_site
    ]


def _checked(variant: str, values: Any, variants: tuple[str, ...], where: str) -> dict:
    if variant not in variants:
        raise AttnoptError(
            f"knobs for {variant!r}{where}, which is not among variants {tuple(variants)}"
        )
    if not isinstance(values, dict):
        raise AttnoptError(f"knobs for {variant!r}{where} must be a dict, not {values!r}")
    for name, value in values.items():
        why = check_knob(PASSES[variant], name, value)
        if why is not None:
            raise AttnoptError(f"knobs{where}: {why}")
    return dict(values)
