"""``attnopt.calibrate``: attention transfer for the approximate sites of an optimized model.

Only the approximate sites' own weights (feature maps, mixing weights) train; every other
parameter is frozen for the duration and left bit-identical. Each site's loss is the MSE between
its output and exact softmax attention of the same inputs (ALGORITHMS.md §3); the losses of all
sites are summed. The weights stay in ``named_parameters`` for the user's own fine-tuning.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from attnopt.errors import AttnoptError
from attnopt.frontends.export.capture import Inputs
from attnopt.passes.base import SiteModule
from attnopt.validate import ErrorSums


def site_modules(optimized: nn.Module) -> dict[str, SiteModule]:
    """The approximate sites' modules of an optimized model, by qualified name."""
    return {name: m for name, m in optimized.named_modules() if isinstance(m, SiteModule)}


def site_errors(optimized: nn.Module, batches: Iterable) -> dict[str, dict[str, float]]:
    """Each approximate site's metrics (cos, rel_l1, rmse, max_error) against exact attention
    of the same inputs, over ``batches``."""
    sums = {name: ErrorSums() for name in site_modules(optimized)}

    def hook(name):
        return lambda module, args, out: sums[name].add(out, module.teacher(*args))

    hooks = [m.register_forward_hook(hook(n)) for n, m in site_modules(optimized).items()]
    try:
        with torch.no_grad():
            for batch in (Inputs.of(b) for b in batches):
                optimized(*batch.args, **batch.kwargs)
    finally:
        for handle in hooks:
            handle.remove()
    return {name: s.metrics() for name, s in sums.items()}


def calibrate(
    optimized: nn.Module,
    batches: Iterable,
    *,
    steps: int = 200,
    lr: float = 1e-2,
) -> list[float]:
    """Train the approximate sites' weights for ``steps`` steps, cycling over ``batches`` (any
    iterable of example inputs); returns the summed transfer loss of each step."""
    sites = site_modules(optimized)
    trainable = [p for m in sites.values() for p in m.parameters()]
    if not trainable:
        raise AttnoptError(
            "no approximate site with trainable weights in this model; optimize it with "
            "variants such as ('linear', 'exact') and feature_map hedgehog, or 'hybrid'"
        )
    data = [Inputs.of(b) for b in batches]
    if not data:
        raise AttnoptError("batches is empty; give at least one batch of example inputs")
    own = {id(p) for p in trainable}
    frozen = [p for p in optimized.parameters() if id(p) not in own and p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=lr)
    losses = []
    try:
        for p in frozen:
            p.requires_grad_(False)
        for module in sites.values():
            module.transfer = []
        for step in range(steps):
            batch = data[step % len(data)]
            optimized(*batch.args, **batch.kwargs)
            loss = sum(part for m in sites.values() for part in m.transfer)
            for module in sites.values():
                module.transfer = []
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for module in sites.values():
            module.transfer = None
        for p in frozen:
            p.requires_grad_(True)
    return losses
