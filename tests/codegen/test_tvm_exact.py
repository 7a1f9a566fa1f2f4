"""The TVM exact kernel against the fp32 reference: shapes, masks, GQA, strides, dtypes, configs.

Shapes are symbolic in the kernel, so the grid below compiles one kernel per (mask kind, dtype,
head dims, config) and every other case reuses it; the session shares one cache directory. The
grid runs on the detected CPU target (``ATTNOPT_CPU_TARGET`` pins it); a representative part runs
on every vector ISA level the machine can execute (``cpu_level``), AVX2 included.
Errors are relative RMS, bounded by a multiple of the dtype's epsilon (1e-5 in fp32, the bound
the whole-model tests hold optimized models to).
"""

import dataclasses
import shutil

import pytest
import torch

from attnopt.codegen import ops, registry
from attnopt.codegen.reference.exact import exact_attention
from attnopt.codegen.signature import KernelSignature
from attnopt.codegen.tvm import cache
from attnopt.codegen.tvm import exact as tvm_exact
from attnopt.errors import KernelError
from attnopt.targets import TARGETS, Target

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FP32_MIN = torch.finfo(torch.float32).min


@pytest.fixture(scope="module", autouse=True)
def _cache_dir(tmp_path_factory):
    """One cache directory for the session's TVM tests, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(cache.ENV, str(tmp_path_factory.getbasetemp() / "attnopt-cache"))
        yield


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``‖actual − expected‖ / ‖expected‖`` over all elements (absolute when expected is 0)."""
    diff = (actual.double() - expected.double()).norm()
    return (diff / expected.double().norm().clamp_min(1e-12)).item()


def check(q, k, v, mask=None, *, causal=False, window=0, fill=float("-inf"), config=None):
    """Kernel against reference: outputs within the dtype's tolerance, lse within 1e-5 where
    finite and ``-inf`` exactly where the reference's is."""
    flags = dict(scale=q.shape[-1] ** -0.5, causal=causal, window=window, fill=fill)
    out, lse = tvm_exact.forward(q, k, v, mask, config=config, **flags)
    ref_out, ref_lse = exact_attention(q, k, v, mask, **flags)
    assert out.dtype == q.dtype and out.shape == ref_out.shape
    assert torch.isfinite(out).all(), "non-finite output"
    err = rel_rms(out, ref_out)
    assert err <= TOLERANCE[q.dtype], f"relative RMS error {err:.3g}"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "-inf lse rows differ"
    finite = torch.isfinite(ref_lse)
    lse_err = (lse[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
    assert lse_err <= 1e-5 * max(1.0, ref_lse[finite].abs().max().item()), f"lse error {lse_err}"


def inputs(b, h, kv, n, m, d, dv=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen)
    k = torch.randn(b, kv, m, d, generator=gen)
    v = torch.randn(b, kv, m, dv or d, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def make_mask(kind: str, b, h, n, m, seed=0):
    """(mask, causal, window); masks arrive expanded from broadcast shapes (stride 0)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (b, h, n, m)
    if kind == "additive":
        return 2 * torch.randn(b, 1, n, m, generator=gen).expand(shape), False, 0
    if kind == "boolean":  # a pattern per head and query, shared by the batch
        return (torch.rand(1, h, n, m, generator=gen) > 0.3).expand(shape), False, 0
    if kind == "padding":  # HF-style key padding: finite finfo.min, never -inf
        keep = torch.arange(m) < max(1, m - 3)
        return torch.where(keep, 0.0, FP32_MIN).reshape(1, 1, 1, m).expand(shape), False, 0
    if kind == "empty_rows":  # every third query sees nothing: 0 output, -inf lse
        rows = torch.arange(n).reshape(1, 1, n, 1) % 3 != 1
        return rows.expand(shape), True, 0
    structural = {"none": (False, 0), "causal": (True, 0), "window": (False, 5), "band": (True, 9)}
    causal, window = structural[kind]
    return None, causal, window


# (b, h, kv, n, m): odd lengths, n != m both ways, decode (n = 1), GQA 1, 2, 3 and MQA
SHAPES = [
    (1, 1, 1, 1, 1),
    (2, 4, 2, 37, 53),
    (1, 3, 1, 70, 19),
    (1, 6, 2, 1, 131),
    (2, 2, 2, 129, 129),
]
KINDS = ["none", "causal", "window", "band", "additive", "boolean", "padding", "empty_rows"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, kind):
    b, h, kv, n, m = shape
    q, k, v = inputs(b, h, kv, n, m, 64)
    mask, causal, window = make_mask(kind, b, h, n, m)
    check(q, k, v, mask, causal=causal, window=window)


@pytest.mark.parametrize("kind", ["none", "band", "additive", "boolean", "padding"])
def test_every_cpu_level(cpu_level: Target, kind):
    """A GQA shape with odd lengths and each compiled mask case, built for each ISA level."""
    b, h, kv, n, m = 2, 4, 2, 37, 53
    q, k, v = inputs(b, h, kv, n, m, 64)
    mask, causal, window = make_mask(kind, b, h, n, m)
    check(q, k, v, mask, causal=causal, window=window)


def test_long_causal_rows_cross_many_blocks(cpu_level: Target):
    """Several query tiles and key blocks: the running max and sum are rescaled across blocks,
    and blocks wholly inside the band skip the mask."""
    q, k, v = inputs(1, 2, 1, 300, 450, 64, seed=1)
    check(q * 3, k, v, causal=True)
    check(q, k, v, window=100)


def test_fully_masked_rows_with_finite_fill():
    """A boolean mask with a finite fill averages a row uniformly, as the reference does. (Not
    with a huge fill: the fp32 reference subtracts an lse rounded to the fill's ulp, 1e-3 at
    1e4, where the kernel's exponent is exactly 0.)"""
    q, k, v = inputs(1, 2, 2, 9, 12, 64)
    mask, _, _ = make_mask("empty_rows", 1, 2, 9, 12)
    check(q, k, v, mask, fill=-30.0)


def test_strided_and_expanded_inputs():
    """Any strides: heads-minor q, batch-expanded k/v (stride 0), a non-unit inner stride, and
    views that start off any alignment."""
    q, k, v = inputs(2, 4, 2, 33, 41, 64)
    heads_minor = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_shared = k[:1].expand(2, -1, -1, -1)
    v_inner = torch.randn(2, 2, 41, 128)[..., ::2]
    check(heads_minor, k_shared, v_inner, causal=True)
    q_off, k_off = torch.randn(2, 4, 33, 65)[..., 1:], torch.randn(2, 2, 41, 67)[..., 3:]
    check(q_off, k_off, v, torch.randn(2, 1, 33, 42)[..., 1:])


def test_masks_read_in_place_whatever_their_layout():
    """Key-broadcast masks (stride 0 on keys), transposed masks and float64 masks."""
    q, k, v = inputs(2, 2, 2, 17, 23, 64)
    per_row = torch.randn(2, 1, 17, 1).expand(2, 2, 17, 23)
    transposed = torch.randn(2, 2, 23, 17).transpose(-1, -2)
    check(q, k, v, per_row)
    check(q, k, v, transposed)
    check(q, k, v, torch.randn(1, 1, 17, 23, dtype=torch.float64))
    check(q, k, v, torch.rand(1, 1, 17, 1) > 0.2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_dtypes(dtype, cpu_level: Target):
    q, k, v = inputs(1, 4, 2, 45, 77, 64, dtype=dtype)
    if tvm_exact._contract(q, k, v, None) is not None:  # not supports(): no size threshold
        pytest.skip(tvm_exact._contract(q, k, v, None))
    check(q, k, v, causal=True)
    mask, _, _ = make_mask("additive", 1, 4, 45, 77)
    check(q, k, v, mask.to(dtype))


def test_other_head_dims():
    """An odd head dim and a value dim that differs from it."""
    check(*inputs(1, 2, 1, 21, 34, 40))
    check(*inputs(2, 2, 2, 21, 34, 80, dv=48), causal=True)


def test_explicit_config_and_parallel_over_tiles(cpu_level: Target):
    config = dict(tvm_exact.FORWARD_SPACE.default(cpu_level, _sig(64)))
    config.update(block_m=24, rows=4, cols=2, pv_cols=2, parallel=1)
    check(*inputs(1, 1, 1, 100, 90, 64), causal=True, config=config)


def _sig(d, **kw) -> KernelSignature:
    return KernelSignature(head_dim=d, dtype="float32", **kw)


def test_config_space(cpu_level: Target):
    """Defaults fit every signature; wider vectors or taller register tiles than the target
    has are refused, each for its own reason."""
    target, space = cpu_level, tvm_exact.FORWARD_SPACE
    for sig in (_sig(64), _sig(128), _sig(40), _sig(80, value_dim=48), _sig(64, heads=1)):
        default = space.default(target, sig)
        assert space.keep(default, target, sig) is None, (sig, default)
    assert space.valid(target, _sig(64))
    lanes = target.vector_bits // 32
    assert space.default(target, _sig(64))["vec"] == lanes  # the widest vectors the target has
    if lanes < 16:
        too_wide = dict(space.default(target, _sig(64)), vec=16)
        assert "512-bit vectors" in space.keep(too_wide, target, _sig(64))
    too_tall = dict(space.default(target, _sig(64)), vec=lanes, pv_cols=8, rows=8)
    assert "registers" in space.keep(too_tall, target, _sig(64))
    ragged = dict(space.default(target, _sig(64)), block_m=32, rows=6)
    assert "multiple of rows" in space.keep(ragged, target, _sig(64))
    q, k, v = inputs(1, 1, 1, 8, 8, 64)
    with pytest.raises(KernelError, match="cannot run"):
        tvm_exact.forward(q, k, v, scale=0.1, config=ragged)


def test_supports_gives_reasons():
    assert tvm_exact.supports(*inputs(1, 4, 1, 1024, 1024, 64), None, False, 0) is None
    q, k, v = inputs(1, 2, 1, 16, 16, 64)
    assert "thread-pool" in tvm_exact.supports(q, k, v, None, False, 0)
    assert "share one of" in tvm_exact.supports(q.double(), k, v, None, False, 0)
    assert "head dim" in tvm_exact.supports(*inputs(1, 1, 1, 16, 4, 320), None, False, 0)
    assert "bool or floating" in tvm_exact.supports(
        q, k, v, torch.ones(8, 8, dtype=torch.int32), False, 0
    )
    assert "broadcast" in tvm_exact.supports(q, k, v, torch.zeros(3, 8), False, 0)
    assert "empty" in tvm_exact.supports(*inputs(1, 1, 1, 0, 4, 64), None, False, 0)
    assert "decoding" in tvm_exact.supports(*inputs(1, 2, 1, 1, 300, 64), None, True, 0)


def test_attention_op_dispatches_to_tvm_on_cpu():
    """``attnopt::attention`` picks this kernel on CPU and matches the reference through it."""
    small = inputs(2, 4, 2, 20, 20, 64)
    assert registry.select_kernel("exact", *small, None, True, 0).name == "sdpa"
    q, k, v = inputs(1, 4, 2, 1024, 1024, 64)
    assert registry.select_kernel("exact", q, k, v, None, True, 0).name == "tvm"
    out = torch.ops.attnopt.attention(q, k, v, None, 0.125, True, 0, float("-inf"), 2)
    with ops.use_kernel("reference"):
        expected = torch.ops.attnopt.attention(q, k, v, None, 0.125, True, 0, float("-inf"), 2)
    assert rel_rms(out, expected) <= 1e-5


def test_cuda_schedule_compiles_without_a_gpu(tmp_path):
    """The CUDA kernel lowers and builds with nvcc for sm_80; loading it needs a GPU."""
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc to compile the CUDA schedule")
    target = dataclasses.replace(TARGETS["a100"], backend="tvm-cuda")
    config = tvm_exact.CUDA_SPACE.default(target, _sig(64, mask_kind="boolean"))
    spec = tvm_exact.Spec(64, 64, "float16", "boolean", "uint8", 0)
    library = tmp_path / "exact_cuda.so"
    cache._compile(tvm_exact._cuda_kernel(spec, config), cache.tvm_target(target), library)
    assert library.stat().st_size > 0


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["none", "causal", "band", "additive", "empty_rows"])
def test_cuda_matches_reference(kind):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    b, h, kv, n, m = 2, 4, 2, 97, 130
    q, k, v = (t.cuda() for t in inputs(b, h, kv, n, m, 64))
    mask, causal, window = make_mask(kind, b, h, n, m)
    mask = None if mask is None else mask.cuda()
    check(q, k, v, mask, causal=causal, window=window)
