"""The compiled-kernel cache: built once per key, reloaded from disk by later processes.

Compiles are counted by wrapping ``cache._compile``; each test starts from an empty directory.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from attnopt.codegen.signature import KernelSignature
from attnopt.codegen.tvm import cache
from attnopt.codegen.tvm import exact as tvm_exact
from attnopt.targets import detect_cpu

CHILD = """
import json, torch
from attnopt.codegen.tvm import cache, exact
q = torch.randn(1, 2, 16, 64)
exact.forward(q, q, q, scale=0.125, causal=True)
print(json.dumps(dict(cache.STATS)))
"""


@pytest.fixture
def compiles(tmp_path, monkeypatch):
    """An empty cache directory and the list of libraries compiled into it."""
    monkeypatch.setenv(cache.ENV, str(tmp_path))
    monkeypatch.setattr(cache, "_FUNCTIONS", {})
    built = []
    real = cache._compile

    def counting(func, target_json, path):
        built.append(path.name)
        real(func, target_json, path)

    monkeypatch.setattr(cache, "_compile", counting)
    return built


def _target_sig() -> tuple:
    return detect_cpu(), KernelSignature(head_dim=64, dtype="float32", mask_kind="causal")


def _run(config=None) -> torch.Tensor:
    q = torch.randn(1, 2, 16, 64, generator=torch.Generator().manual_seed(0))
    return tvm_exact.forward(q, q, q, scale=0.125, causal=True, config=config)[0]


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV, str(tmp_path))
    assert cache.cache_dir() == tmp_path / "tvm"


def test_second_load_does_not_recompile(compiles):
    first = _run()
    assert len(compiles) == 1
    assert (cache.cache_dir() / compiles[0]).exists()
    _run()  # in memory
    cache.clear_memory()
    loaded = cache.STATS["loaded"]
    second = _run()  # from disk
    assert len(compiles) == 1 and cache.STATS["loaded"] == loaded + 1
    assert torch.equal(first, second)


def test_other_config_or_shape_class(compiles):
    """A config pinned, since the default one follows the shape and the machine's threads."""
    config = tvm_exact.FORWARD_SPACE.default(*_target_sig())
    _run(config)
    _run(dict(config, block_m=24, rows=4))
    assert len(compiles) == 2 and compiles[0] != compiles[1]
    q = torch.randn(1, 3, 41, 64)
    tvm_exact.forward(q, q[:, :1], q[:, :1], scale=0.1, window=4, config=config)  # same kernel
    assert len(compiles) == 2


def test_a_new_process_loads_from_disk(compiles, tmp_path):
    _run()
    env = dict(os.environ, **{cache.ENV: str(tmp_path)})
    child = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True
    )
    stats = json.loads(child.stdout.strip().splitlines()[-1])
    assert stats == {"loaded": 1}, stats  # loaded from disk, nothing compiled


def test_a_broken_library_is_rebuilt(compiles, tmp_path, monkeypatch):
    """A truncated or foreign file under the right name is rebuilt, not loaded. (A fresh
    directory: the loader hands back a library already mapped from the same path.)"""
    _run()
    other = tmp_path / "other"
    monkeypatch.setenv(cache.ENV, str(other))
    cache.cache_dir().mkdir(parents=True)
    (cache.cache_dir() / compiles[0]).write_bytes(b"not a library")
    cache.clear_memory()
    _run()
    assert compiles == [compiles[0]] * 2


def test_the_name_covers_key_and_target():
    names = {
        cache._file_name("k", {"a": a}, target, _run)
        for a in (1, 2)
        for target in ('{"kind": "llvm"}', '{"kind": "llvm", "mcpu": "haswell"}')
    }
    assert len(names) == 4
