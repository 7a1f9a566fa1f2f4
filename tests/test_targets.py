"""CPU targets: the detected one, ISA levels pinned by ``ATTNOPT_CPU_TARGET``, clear errors."""

import json

import pytest

from attnopt.errors import UnsupportedTargetError
from attnopt.targets import CPU_LEVELS, CPU_TARGET_ENV, Target, cpu_levels, cpu_target, detect_cpu


def test_a_pinned_level_keeps_only_its_vectors(cpu_level: Target):
    """A level is the host's features cut to that vector width, and LLVM is told so."""
    level = next(name for name, (_, bits) in CPU_LEVELS.items() if bits == cpu_level.vector_bits)
    assert detect_cpu() == cpu_level  # the fixture pins it through the environment
    assert cpu_level.cpu_features <= cpu_target().cpu_features
    assert CPU_LEVELS[level][0] in cpu_level.cpu_features
    if cpu_level.vector_bits < 512:
        assert not any(f.startswith("avx512") for f in cpu_level.cpu_features)
        assert json.loads(cpu_level.llvm_target)["mcpu"] == "haswell"


def test_unset_or_native_is_the_host(monkeypatch):
    monkeypatch.delenv(CPU_TARGET_ENV, raising=False)
    host = detect_cpu()
    monkeypatch.setenv(CPU_TARGET_ENV, "native")
    assert detect_cpu() == host == cpu_target()


def test_unknown_or_unexecutable_levels_are_clear_errors(monkeypatch):
    monkeypatch.setenv(CPU_TARGET_ENV, "sse9")
    with pytest.raises(UnsupportedTargetError, match="choose one of: native, avx2, avx512"):
        detect_cpu()
    missing = [level for level in CPU_LEVELS if level not in cpu_levels()]
    for level in missing:  # none on an AVX-512 machine
        with pytest.raises(UnsupportedTargetError, match="this CPU lacks"):
            cpu_target(level)
