"""A kernel's tunable configuration space, declared as data by the kernel file.

Kernel files build a ``ConfigSpace`` (parameter choices, a ``keep`` rule that says why a config
cannot run on a target/signature, and a default); the tuner prunes with ``keep`` before any trial.
This module never imports Optuna, so kernels can import it freely.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from attnopt.codegen.signature import KernelSignature
from attnopt.targets import Target

Config = dict[str, int]


@dataclass(frozen=True)
class ConfigSpace:
    """``params`` maps a knob to its choices; ``keep`` returns None or the reason to drop.

    ``variant`` names the attention variant the kernel computes; it is part of the tuning key.
    """

    kernel: str
    params: dict[str, tuple[int, ...]]
    keep: Callable[[Config, Target, KernelSignature], str | None]
    default: Callable[[Target, KernelSignature], Config]
    variant: str = "exact"

    def configs(self) -> Iterator[Config]:
        """Every combination of the choices, unpruned."""
        names = list(self.params)
        for values in itertools.product(*(self.params[n] for n in names)):
            yield dict(zip(names, values, strict=True))

    def valid(self, target: Target, sig: KernelSignature) -> list[Config]:
        """The configs that can launch on ``target`` for ``sig``."""
        return [c for c in self.configs() if self.keep(c, target, sig) is None]

    def choices(self, target: Target, sig: KernelSignature) -> dict[str, tuple[int, ...]]:
        """Each knob's values that occur in some valid config: what a tuner offers."""
        valid = self.valid(target, sig)
        return {
            name: tuple(v for v in values if any(c[name] == v for c in valid))
            for name, values in self.params.items()
        }
