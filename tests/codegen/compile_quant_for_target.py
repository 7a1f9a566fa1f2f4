"""Compile the Triton quant kernels for a CUDA architecture without a GPU (as
``compile_for_target.py`` does for the exact ones): ``python compile_quant_for_target.py 90``.
Prints one JSON line per compiled kernel."""

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from attnopt.codegen.triton import quant  # noqa: E402
from tests.codegen.compile_for_target import _StandInDriver  # noqa: E402

# (dtype, head_dim, bits, pv, causal, mask kind)
CASES = (
    (torch.float16, 128, 8, "fp16", True, None),
    (torch.bfloat16, 64, 4, "fp16", False, "boolean"),
    (torch.float16, 128, 8, "fp8", True, None),
)


def main(arch: int) -> None:
    compiled: list = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        compiled.append((self.fn.__name__, run(self, *args, grid=grid, warmup=True, **kwargs)))

    driver.set_active(_StandInDriver(arch))
    JITFunction.run = compile_only
    quant.supports = lambda *args: None  # CPU tensors stand in for CUDA ones
    for dtype, head_dim, bits, pv, causal, kind in CASES:
        if pv == "fp8" and arch < 89:
            continue
        q = torch.randn(1, 4, 256, head_dim, dtype=dtype)
        k = torch.randn(1, 2, 256, head_dim, dtype=dtype)
        mask = None
        if kind == "boolean":
            mask = torch.ones(1, 1, 256, 256, dtype=torch.bool).expand(1, 4, 256, 256)
        quant.forward(q, k, k, mask, scale=0.125, causal=causal, bits=bits, pv=pv)
        for name, kernel in compiled:
            row = dict(kernel=name, pv=pv, bits=bits, shared=kernel.metadata.shared, arch=arch)
            print(json.dumps(row), flush=True)
        compiled.clear()


if __name__ == "__main__":
    main(int(sys.argv[1]))
