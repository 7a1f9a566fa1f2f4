"""``attnopt.prefix_ntk``: NTK-attention prefixes as parameter-efficient fine-tuning.

Each chosen site gets trainable ``Z, z`` (ALGORITHMS.md §5): a site whose keys already start
with an input-independent prefix has that prefix replaced (``Z, z`` fitted to it on the first
call, as the ``prefix_ntk`` pass does); any other site gets ``Z = z = 0``, so the model computes
what it did until they are trained. Every other parameter is frozen; ``Z, z`` appear in
``named_parameters`` (``graph_module.attnopt_site_<i>.Z``) for the user's optimiser.

The prefix terms reach the output scaled by ``e^{-max(lse, 0)}`` (the input keys' softmax mass),
so ``Z, z`` have to grow large: with Adam, a learning rate near 3e-2, not the 1e-3 of weights
(``examples/prefix_ntk_finetune.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from attnopt.api import OptimizedModule, _base_report, _check_model, _detect
from attnopt.errors import AttnoptError
from attnopt.frontends.export.capture import Inputs, check_outputs
from attnopt.frontends.fx.rewrite import SITE_PREFIX, finish, splice
from attnopt.passes.base import Replacement
from attnopt.passes.prefix_ntk import refusal, site_module


def prefix_ntk(
    model: nn.Module,
    example_inputs: Any,
    *,
    sites: Iterable[int | str] | None = None,
    feature_dim: int = 0,
) -> OptimizedModule:
    """``model`` with trainable ``Z, z`` (feature dim ``feature_dim``; 0: the head dim) at the
    attention ``sites`` (indices into the report's sites, or their locations; default all that
    can carry them), and every base weight frozen (``requires_grad=False``)."""
    _check_model(model)
    inputs = Inputs.of(example_inputs)
    with torch.no_grad():
        check_outputs(model(*inputs.args, **inputs.kwargs))
    captured, view, found = _detect(model, inputs)
    report = _base_report(model, captured, found, "-")
    wanted = None if sites is None else set(sites)
    known = set(range(len(found.sites))) | {s.location for s in found.sites}
    if wanted is not None and not wanted <= known:
        raise AttnoptError(
            f"unknown site(s) {sorted(map(str, wanted - known))}; the model has "
            f"{len(found.sites)} site(s): {[s.location for s in found.sites]}"
        )
    gm = captured.gm
    for index, (site, site_report) in enumerate(zip(found.sites, report.sites, strict=True)):
        if wanted is not None and not {index, site.location} & wanted:
            site_report.status, site_report.reason = "skipped", "not among the chosen sites"
            continue
        reason = refusal(site)
        if reason is not None:
            if wanted is not None:
                raise AttnoptError(f"site {index} ({site.location}) cannot carry Z, z: {reason}")
            site_report.status, site_report.reason = "skipped", reason
            continue
        module = site_module(site, feature_dim)
        splice(gm, view, site, Replacement(op="attnopt::prefix_ntk", module=module))
        site_report.status, site_report.variant = "rewritten", "prefix_ntk"
        site_report.config = f"feature_dim={feature_dim}, prefix_len={site.prefix_len or 0}"
    if not report.rewritten:
        raise AttnoptError("no attention site of this model can carry Z, z; see the report")
    finish(gm)
    for name, param in gm.named_parameters():
        param.requires_grad_(name.startswith(SITE_PREFIX))
    return OptimizedModule(gm, report)
