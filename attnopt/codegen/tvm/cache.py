"""Compiled TVM kernels: built once per (kernel, signature class, config, target, TVM version).

Building a kernel costs seconds of LLVM time, so a built function is kept in memory for the
process and its module exported as a shared library under ``cache_dir()``, where later processes
load it in milliseconds. The file name hashes everything the machine code depends on: the
kernel's name and key (the static facts it is specialised on, and its config), the target, the
TVM version and the source of the builder's module and of ``tirlib``, so editing a kernel never
loads a stale library. Libraries are written under a temporary name and renamed into place, so
processes sharing the directory never load a half-written file. Shapes are symbolic in every
kernel, so nothing here is keyed by batch, heads or sequence lengths.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import platformdirs
import torch

from attnopt.targets import Target

ENV = "ATTNOPT_CACHE_DIR"
# What happened on the way to each function: "compiled" (LLVM/NVCC ran) or "loaded" (from disk).
STATS: collections.Counter[str] = collections.Counter()
_FUNCTIONS: dict[tuple, Callable] = {}
_LOCK = threading.Lock()


def cache_dir() -> Path:
    """``$ATTNOPT_CACHE_DIR/tvm`` if set, else ``tvm`` in the user cache directory of attnopt."""
    root = os.environ.get(ENV) or platformdirs.user_cache_dir("attnopt")
    return Path(root) / "tvm"


def tvm_target(target: Target) -> str:
    """The TVM target (JSON) a kernel is built for: LLVM with the CPU's features, or CUDA."""
    if not target.is_gpu:
        return target.llvm_target
    major, minor = target.compute_capability or (7, 0)
    spec = {
        "kind": "cuda",
        "arch": f"sm_{major}{minor}",
        "max_num_threads": target.max_threads_per_block,
        "host": {"kind": "llvm"},
    }
    return json.dumps(spec)


def kernel_function(
    kernel: str, key: Mapping, target: Target, build: Callable[..., object], *args
) -> Callable:
    """The packed function of ``build(*args)`` (a PrimFunc) for ``key`` on ``target``, built at
    most once per machine; ``key`` holds every fact ``build`` reads besides the target."""
    memo = (kernel, tuple(sorted(key.items())), target)
    found = _FUNCTIONS.get(memo)
    if found is not None:
        return found
    with _LOCK:
        if memo not in _FUNCTIONS:
            target_json = tvm_target(target)
            path = cache_dir() / _file_name(kernel, key, target_json, build)
            _FUNCTIONS[memo] = _load_or_build(path, target_json, lambda: build(*args))
    return _FUNCTIONS[memo]


def clear_memory() -> None:
    """Forget the functions loaded in this process (the disk cache stays)."""
    _FUNCTIONS.clear()


def _file_name(kernel: str, key: Mapping, target_json: str, build: Callable) -> str:
    import tvm

    from attnopt.codegen.tvm import tirlib

    digest = hashlib.sha256()
    facts = {"kernel": kernel, "key": dict(key), "target": target_json, "tvm": tvm.__version__}
    digest.update(json.dumps(facts, sort_keys=True, default=str).encode())
    for module in (sys.modules[build.__module__], tirlib):
        digest.update(Path(module.__file__).read_bytes())
    return f"{kernel}-{digest.hexdigest()[:24]}.so"


def _load_or_build(path: Path, target_json: str, build: Callable) -> Callable:
    import tvm

    # TVM sizes its thread pool at the first parallel launch and counts two vCPUs as one core:
    # follow torch's intra-op setting unless the user chose TVM's. By default its idle workers
    # spin for tens of milliseconds after a launch (half a core for 100 ms, measured), stealing
    # the cores the model's next torch ops run on; a short spin still bridges the two launches
    # of one kernel call, then they sleep.
    os.environ.setdefault("TVM_NUM_THREADS", str(torch.get_num_threads()))
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "1000")
    if path.exists():
        try:
            module = tvm.runtime.load_module(str(path))
            STATS["loaded"] += 1
            return module["main"]
        except Exception:  # a truncated or foreign file: rebuild it below
            path.unlink(missing_ok=True)
    _compile(build(), target_json, path)
    STATS["compiled"] += 1
    return tvm.runtime.load_module(str(path))["main"]


def _compile(func, target_json: str, path: Path) -> None:
    """Build ``func`` for the target and export it to ``path`` atomically."""
    import tvm

    # StorageRewrite would merge the stack tiles and drop their keep-on-stack annotation.
    with tvm.transform.PassContext(config={"tirx.disable_storage_rewrite": True}):
        executable = tvm.compile(
            tvm.IRModule({"main": func}), target=tvm.target.Target(target_json)
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.so")
    executable.export_library(str(partial))
    os.replace(partial, path)
