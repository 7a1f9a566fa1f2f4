"""The configs kernels launch with: tuned ones installed by ``optimize()``, else the default.

Kernels call ``config_for(space, target, sig)`` on every launch, so this module stays a dict
lookup: it never opens the tuning database (``store.py`` does, once, in ``optimize()``).
"""

from __future__ import annotations

from attnopt.autotune.space import Config, ConfigSpace
from attnopt.codegen.registry import forget_choices
from attnopt.codegen.signature import KernelSignature
from attnopt.targets import Target


def bucket(length: int) -> int:
    """Sequence lengths are tuned in powers of two: the next power of two >= length."""
    return 1 << max(0, int(length) - 1).bit_length()


def runtime_key(space: ConfigSpace, target: Target, sig: KernelSignature) -> tuple:
    """What a tuned config is looked up by at launch time."""
    return (
        space.kernel,
        target.name,
        sig.dtype,
        sig.head_dim,
        sig.mask_kind,
        sig.kv_group > 1,
        bucket(sig.n),
        bucket(sig.m),
    )


_INSTALLED: dict[tuple, tuple[Config, str]] = {}


def install(space: ConfigSpace, target: Target, sig: KernelSignature, config: Config, source: str):
    """Make ``config`` the one launched for this key; ``source`` says where it came from."""
    _INSTALLED[runtime_key(space, target, sig)] = (dict(config), source)
    forget_choices()  # a kernel's ``supports`` may answer otherwise with this config


def config_for(space: ConfigSpace, target: Target, sig: KernelSignature) -> tuple[Config, str]:
    """The config to launch with and where it came from (``tuned:<storage>`` or ``default``)."""
    found = _INSTALLED.get(runtime_key(space, target, sig))
    if found is not None:
        return found
    return space.default(target, sig), "default"
