"""One tuning worker process for the shared-storage tests.

    python tune_worker.py STORAGE TRIALS GATE_DIR INDEX

It waits at a file gate until every worker has started, so the workers really overlap, then
tunes the toy kernel into STORAGE and prints its ``TuneResult`` as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from attnopt.autotune.kernels import passes, runner
from attnopt.autotune.tuner import tune
from attnopt.codegen.signature import KernelSignature
from attnopt.targets import resolve

WORKERS = 2


def main(storage: str, trials: int, gate: Path, index: int) -> None:
    torch.set_num_threads(1)
    target = resolve("cpu")
    sig = KernelSignature(head_dim=32, dtype="float32", n=256, m=256, heads=2, batch=1)
    kernel = passes("attnopt_toy_kernel")[0]
    build = runner(kernel, sig, target)
    (gate / f"ready-{index}").touch()
    deadline = time.monotonic() + 60
    while len(list(gate.glob("ready-*"))) < WORKERS and time.monotonic() < deadline:
        time.sleep(0.01)
    result = tune(
        kernel.space,
        build,
        target,
        sig,
        trials=trials,
        storage=storage,
        seed=index,
        progress=False,
        budget_ms=20,
    )
    print(json.dumps(dataclasses.asdict(result)))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
