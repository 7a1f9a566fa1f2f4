"""Compile the Triton exact kernels for a CUDA architecture on a machine without a GPU.

Run as a script (``python compile_for_target.py 90``), never imported by the test process, which
interprets the kernels. A stand-in driver names the target, and every launch becomes Triton's own
``warmup``: the real launchers bind arguments and the full compile runs (PTX and cubin with the
bundled ptxas) without launching anything. Prints one JSON line per compiled kernel.
"""

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from attnopt.codegen.signature import KernelSignature  # noqa: E402
from attnopt.codegen.triton import decode, exact  # noqa: E402

# (dtype, head_dim, causal, window, mask kind, forward config, backward config)
CASES = (
    (torch.float16, 64, True, 0, "none", (128, 64, 4, 3), (32, 128, 4, 3)),
    (torch.bfloat16, 80, False, 16, "boolean", (64, 32, 4, 2), (16, 64, 4, 2)),
)
# split-KV decode: (dtype, head_dim, queries, kv group, causal, window, config)
DECODE_CASES = (
    (torch.float16, 128, 1, 8, True, 0, (64, 16, 4, 2)),
    (torch.bfloat16, 64, 4, 4, True, 32, (32, 8, 4, 3)),
)


class _StandInDriver:
    def __init__(self, arch: int) -> None:
        self.arch = arch

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)


def _config(values: tuple) -> dict:
    return dict(zip(exact.PARAMS, values, strict=True))


def _inputs(dtype: torch.dtype, head_dim: int, mask_kind: str):
    q = torch.empty(1, 4, 256, head_dim, dtype=dtype)
    k = torch.empty(1, 2, 256, head_dim, dtype=dtype)
    mask = None
    if mask_kind == "boolean":
        mask = torch.empty(1, 1, 256, 256, dtype=torch.bool).expand(1, 4, 256, 256)
    return q, k, mask


def main(arch: int) -> None:
    compiled: list = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        compiled.append((self.fn.__name__, run(self, *args, grid=grid, warmup=True, **kwargs)))

    driver.set_active(_StandInDriver(arch))
    JITFunction.run = compile_only
    exact.supports = lambda *args: None  # CPU tensors stand in for CUDA ones
    for dtype, head_dim, causal, window, mask_kind, fwd, bwd in CASES:
        q, k, mask = _inputs(dtype, head_dim, mask_kind)
        flags = dict(scale=0.125, causal=causal, window=window)
        exact.forward(q, k, k, mask, **flags, config=_config(fwd))
        lse = torch.empty(q.shape[:3])
        exact.backward(q, q, k, k, mask, q, lse, **flags, config=_config(bwd))
        sig = KernelSignature.of(q, k, k, mask_kind)
        for name, kernel in compiled:
            backward = name != "_fwd_kernel"
            estimate, _ = exact._footprint(_config(bwd if backward else fwd), sig, backward)
            row = dict(kernel=name, dtype=str(dtype), shared=kernel.metadata.shared)
            print(json.dumps(row | dict(estimate=estimate, arch=arch)), flush=True)
        compiled.clear()
    for dtype, head_dim, n_q, group, causal, window, values in DECODE_CASES:
        q = torch.empty(1, 2 * group, n_q, head_dim, dtype=dtype)
        k = torch.empty(1, 2, 4096, head_dim, dtype=dtype)
        config = dict(zip(decode.PARAMS, values, strict=True))
        decode.forward(q, k, k, None, scale=0.125, causal=causal, window=window, config=config)
        sig = KernelSignature.of(q, k, k, "causal")
        tile = dict(config, BLOCK_M=decode._block_m(group, n_q))
        estimate, _ = exact._footprint(tile, sig, False)
        for name, kernel in compiled:  # the merge keeps its rows in registers: no estimate
            row = dict(kernel=name, dtype=str(dtype), shared=kernel.metadata.shared)
            split = name == "_split_kernel"
            print(json.dumps(row | dict(estimate=estimate if split else None, arch=arch)))
        compiled.clear()


if __name__ == "__main__":
    main(int(sys.argv[1]))
