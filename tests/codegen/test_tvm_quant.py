"""The fused TVM quant kernel against the reference: the same Q/K (and, for ``pv="int8"``, P and
V) integers, so the outputs agree to rounding; masks, causal and window bands, GQA, ``n ≠ m``.
Runs at each vector ISA level this machine executes: VNNI (``vpdpbusd``) and the generic AVX2
dot product. Each (mask kind, P·V kind, head dim) compiles once (about 10 s of CPU), so the
cases share them."""

import pytest
import torch
import torch.nn.functional as F

from attnopt.codegen.quant_ops import quant_forward
from attnopt.codegen.reference.exact import exact_attention
from attnopt.codegen.reference.quant import quant_attention
from attnopt.codegen.registry import kernels_for
from attnopt.codegen.tvm import cache
from attnopt.codegen.tvm import quant as tvm_quant
from attnopt.errors import KernelError
from attnopt.targets import CPU_TARGET_ENV, cpu_levels, cpu_target


@pytest.fixture(scope="module", autouse=True)
def _cache_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(cache.ENV, str(tmp_path_factory.getbasetemp() / "attnopt-cache"))
        yield


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def make(n, m, kv_heads, kind, d=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, n, d, generator=gen)
    k = torch.randn(2, kv_heads, m, d, generator=gen) + 1  # an offset for K smoothing to remove
    v = torch.randn(2, kv_heads, m, d, generator=gen) + 0.5  # and one for V's channel means
    mask = None
    if kind == "additive":  # with HF's finfo.min padding of the last keys
        mask = torch.randn(2, 1, n, m, generator=gen)
        mask[..., -3:] = torch.finfo(torch.float32).min
        mask = mask.expand(2, 4, n, m)
    elif kind == "boolean":
        mask = torch.rand(2, 4, n, m, generator=gen) > 0.3
        mask[:, :, 0] = False  # a fully masked row: 0
    return q, k, v, mask


# (n, m, kv heads, flags, mask kind, pv): three compiled kernels
CASES = [
    (37, 45, 2, {"causal": True}, None, "int8"),
    (150, 150, 1, {"causal": True, "window": 40}, None, "int8"),
    (70, 200, 4, {}, None, "int8"),
    (33, 29, 2, {}, "boolean", "int8"),
    (33, 70, 2, {"causal": True}, "additive", "fp16"),
]


# narrower ISA levels (the generic byte dot) run these: both P·V kinds, a mask, GQA
EVERY_LEVEL = (CASES[0], CASES[4])


@pytest.mark.parametrize("n,m,kv_heads,flags,kind,pv", CASES)
def test_kernel_matches_reference(cpu_level, n, m, kv_heads, flags, kind, pv):
    widest = max(cpu_target(level).vector_bits for level in cpu_levels())
    if cpu_level.vector_bits < widest and (n, m, kv_heads, flags, kind, pv) not in EVERY_LEVEL:
        pytest.skip("run at the widest ISA level only (one compile per mask kind and level)")
    q, k, v, mask = make(n, m, kv_heads, kind)
    args = dict(scale=32**-0.5, pv=pv, **flags)
    got = tvm_quant.forward(q, k, v, mask, **args)
    want = quant_attention(q, k, v, mask, **args)
    exact, _ = exact_attention(q, k, v, mask, **{**flags, "scale": 32**-0.5})
    assert got.shape == want.shape and torch.isfinite(got).all()
    rel = ((got - want).norm() / want.norm()).item()
    # int8: the same integers but for rare rounding flips of P (a polynomial exp2 here, torch
    # there), far below int8 P·V's own error (~1e-2); fp16: P unrounded here, rounded there
    assert rel < (5e-4 if pv == "int8" else 2e-3), rel
    assert cos(got, exact) >= cos(want, exact) - 1e-4
    if kind == "boolean":
        assert torch.equal(got[:, :, 0], torch.zeros_like(got[:, :, 0]))


def test_vnni_instruction_in_the_built_kernel():
    """Where the CPU has AVX-512 VNNI, the kernel's integer dots are ``vpdpbusd``."""
    import tvm

    target = tvm_quant.detect_cpu()
    if tvm_quant.dot_kind(target) != "vnni":
        pytest.skip("no AVX-512 VNNI on this CPU")
    spec = tvm_quant.Spec(32, 32, "int8", "vnni")
    config = tvm_quant._config(target, 32)

    with tvm.transform.PassContext(config={"tirx.disable_storage_rewrite": True}):
        built = tvm.compile(
            tvm.IRModule({"main": tvm_quant._cpu_kernel(spec, config)}),
            target=tvm.target.Target(target.llvm_target),
        )
    assert "vpdpbusd" in built.mod.inspect_source("s")


def test_the_op_picks_it_where_it_applies(cpu_level):
    q, k, v, _ = make(512, 512, 2, None)
    flags = {"scale": 32**-0.5, "causal": True, "window": 0, "fill": float("-inf")}
    assert tvm_quant.supports(q, k, v, None, True, 0, 8, "int8") is None
    assert kernels_for("quant", "cpu")[0].name == "tvm"
    got = quant_forward(q, k, v, None, bits=8, pv="int8", **flags)
    assert torch.equal(got, tvm_quant.forward(q, k, v, None, bits=8, pv="int8", **flags))


def test_declines_what_it_does_not_run(monkeypatch):
    monkeypatch.setenv(CPU_TARGET_ENV, "native")
    q, k, v, _ = make(512, 512, 2, None)
    assert "bits=4" in tvm_quant.supports(q, k, v, None, False, 0, 4, "fp16")
    assert "pv='fp8'" in tvm_quant.supports(q, k, v, None, False, 0, 8, "fp8")
    odd = torch.randn(1, 2, 512, 30)
    assert "multiple of 4" in tvm_quant.supports(odd, odd, odd, None, False, 0, 8, "fp16")
    small = torch.randn(1, 1, 16, 32)
    assert "scores" in tvm_quant.supports(small, small, small, None, False, 0, 8, "fp16")
    step, cache_kv = torch.randn(1, 32, 1, 32), torch.randn(1, 1, 1, 32).expand(1, 32, 100_000, 32)
    assert "queries" in tvm_quant.supports(step, cache_kv, cache_kv, None, True, 0, 8, "fp16")
    with pytest.raises(KernelError, match="bits=8"):
        tvm_quant.forward(q, k, v, scale=0.2, bits=4)
