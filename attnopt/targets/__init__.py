"""Hardware targets as data: what a kernel may assume about the device it is built for.

A ``Target`` is a frozen record; ``TARGETS`` maps names to them. Code asks a target
(``target.smem_per_block``, ``target.has_tensor_cores(dtype)``), never the device inline.
``resolve("auto")`` reads the running device (driver properties for CUDA, CPU flags for LLVM).
``ATTNOPT_CPU_TARGET=avx2`` pins the CPU target to an older ISA level the host can execute, so
an AVX-512 machine builds and tests the code an AVX2-only machine runs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attnopt.errors import UnsupportedTargetError


@dataclass(frozen=True)
class Target:
    """A device class and the limits kernel configs must respect."""

    name: str
    backend: str  # "triton", "tvm-llvm" or "tvm-cuda"
    compute_capability: tuple[int, int] | None = None
    sm_count: int = 0
    smem_per_block: int = 0  # bytes a block may use (opt-in maximum)
    registers_per_sm: int = 0
    max_threads_per_block: int = 1024
    tensor_core_dtypes: frozenset[str] = field(default_factory=frozenset)
    cpu_features: frozenset[str] = field(default_factory=frozenset)
    vector_bits: int = 0  # widest SIMD register on CPU targets

    @property
    def is_gpu(self) -> bool:
        return self.backend in ("triton", "tvm-cuda")

    def has_tensor_cores(self, dtype: torch.dtype | str) -> bool:
        name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
        aliases = {"float16": "fp16", "bfloat16": "bf16", "float8_e4m3fn": "fp8", "int8": "int8"}
        return aliases.get(name, name) in self.tensor_core_dtypes

    @property
    def int_dot(self) -> tuple[str, str] | None:
        """The best integer dot-product instructions of a CPU target: (name, the
        ``ONEDNN_MAX_CPU_ISA`` that caps oneDNN at them), or None."""
        for flag, name, isa in INT_DOT:
            if flag in self.cpu_features:
                return name, isa
        return None

    @property
    def llvm_target(self) -> str:
        """The TVM target for CPU targets, as the JSON TVM >= 0.27 parses (it rejects the old
        ``llvm -mcpu=…`` strings): the oldest CPU model that has every vector extension found."""
        import json

        target: dict = {"kind": "llvm"}
        models = (
            ("avx512_fp16", "sapphirerapids"),
            ("avx512_bf16", "cooperlake"),
            ("avx512f", "skylake-avx512"),
            ("avx2", "haswell"),
        )
        for flag, cpu in models:
            if flag in self.cpu_features:
                target["mcpu"] = cpu
                break
        if self.cpu_features & {"neon", "asimd"} and platform.machine() in ("arm64", "aarch64"):
            target["mattr"] = ["+neon"]
        return json.dumps(target)


_TC_AMPERE = frozenset({"fp16", "bf16", "int8", "tf32"})
_TC_ADA_HOPPER = _TC_AMPERE | {"fp8"}

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("h100", "triton", (9, 0), 132, 227 * 1024, 65536, 1024, _TC_ADA_HOPPER),
        Target("h200", "triton", (9, 0), 132, 227 * 1024, 65536, 1024, _TC_ADA_HOPPER),
        Target("a100", "triton", (8, 0), 108, 163 * 1024, 65536, 1024, _TC_AMPERE),
        Target("sm89", "triton", (8, 9), 128, 99 * 1024, 65536, 1024, _TC_ADA_HOPPER),
        Target("cuda", "triton", (7, 0), 80, 48 * 1024, 65536, 1024, frozenset({"fp16"})),
        Target("cpu", "tvm-llvm"),
    )
}

_GPU_NAMES = (
    ("H100", "h100"),
    ("H200", "h200"),
    ("A100", "a100"),
    ("L4", "sm89"),
    ("4090", "sm89"),
)


CPU_TARGET_ENV = "ATTNOPT_CPU_TARGET"
# ISA levels a CPU target can be pinned to: the flag the host needs and the vector width.
CPU_LEVELS: dict[str, tuple[str, int]] = {"avx2": ("avx2", 256), "avx512": ("avx512f", 512)}
_CPU_FLAGS = frozenset(
    {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_int8"}
    | {"amx_bf16", "amx_tile", "fma", "neon", "asimd"}
)
# The integer dot-product instructions an INT8 GEMM can use, best first: (flag, name, the
# ``ONEDNN_MAX_CPU_ISA`` value that caps oneDNN at them).
INT_DOT = (
    ("amx_int8", "amx", "AVX512_CORE_AMX"),
    ("avx512_vnni", "avx512_vnni", "AVX512_CORE_VNNI"),
    ("avx_vnni", "avx_vnni", "AVX2_VNNI"),
    ("avx2", "avx2 vpmaddubsw", "AVX2"),
)


@functools.cache
def _cpu_flags() -> frozenset[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    if platform.machine() in ("arm64", "aarch64"):
        return frozenset({"neon"})
    return frozenset()


def cpu_levels() -> list[str]:
    """The ISA levels of ``CPU_LEVELS`` this machine can execute, narrowest first."""
    return [level for level, (flag, _) in CPU_LEVELS.items() if flag in _cpu_flags()]


@functools.cache
def cpu_target(level: str = "native") -> Target:
    """This machine's CPU target (``"native"``), or one pinned to an ISA level it can execute:
    features above the level are dropped, so LLVM emits none of their instructions."""
    flags = _cpu_flags() & _CPU_FLAGS
    bits = 512 if "avx512f" in flags else 256 if "avx2" in flags else 128
    if level != "native":
        if level not in CPU_LEVELS:
            known = ", ".join(["native", *CPU_LEVELS])
            raise UnsupportedTargetError(f"unknown CPU target {level!r}; choose one of: {known}")
        flag, bits = CPU_LEVELS[level]
        if flag not in flags:
            raise UnsupportedTargetError(
                f"CPU target {level!r} needs {flag}, which this CPU lacks; "
                f"it can run: {', '.join(['native', *cpu_levels()])}"
            )
        if bits < 512:
            flags = frozenset(f for f in flags if not f.startswith(("avx512", "amx", "avx_vnni")))
    return dataclasses.replace(TARGETS["cpu"], cpu_features=flags, vector_bits=bits)


def detect_cpu() -> Target:
    """The CPU target kernels are built for: this machine's, or the level ``ATTNOPT_CPU_TARGET``
    pins (read on every call, so a test or benchmark can switch it)."""
    return cpu_target(os.environ.get(CPU_TARGET_ENV) or "native")


def detect_cuda(device: int = 0) -> Target:
    """The target of a CUDA device, with SM count and shared memory read from the driver."""
    props = torch.cuda.get_device_properties(device)
    base = TARGETS["cuda"]
    for marker, name in _GPU_NAMES:
        if marker in props.name:
            base = TARGETS[name]
            break
    smem = getattr(props, "shared_memory_per_block_optin", 0) or base.smem_per_block
    return dataclasses.replace(
        base,
        compute_capability=(props.major, props.minor),
        sm_count=props.multi_processor_count,
        smem_per_block=smem,
        registers_per_sm=getattr(props, "regs_per_multiprocessor", base.registers_per_sm),
    )


def resolve(target: str | Target = "auto") -> Target:
    """A Target from a name, ``"auto"`` (the running device) or a Target."""
    if isinstance(target, Target):
        return target
    if target == "auto":
        return detect_cuda() if torch.cuda.is_available() else detect_cpu()
    if target == "cpu":
        return detect_cpu()
    if target not in TARGETS:
        known = ", ".join(sorted(TARGETS))
        raise UnsupportedTargetError(f"unknown target {target!r}; choose one of: auto, {known}")
    return TARGETS[target]
