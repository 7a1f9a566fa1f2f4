"""The TVM chunked linear-attention kernel against the loop-explicit fp32 reference.

The reference itself is checked against the quadratic form ``tril(φ(Q)φ(K)ᵀ)V / rowsum``; the
kernel over odd lengths (chunks cut mid-sequence), GQA, causal and not, ELU+1 and ReLU feature
maps (ReLU leaves rows with a zero denominator), head dims that differ, half dtypes and configs;
a representative part on every vector ISA level the machine can execute (``cpu_level``).
"""

import pytest
import torch
import torch.nn.functional as F

from attnopt.codegen.reference.linear import linear_attention, normalised_gla
from attnopt.codegen.signature import KernelSignature
from attnopt.codegen.tvm import cache
from attnopt.codegen.tvm import linear as tvm_linear
from attnopt.errors import KernelError
from attnopt.targets import Target

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FEATURES = {"elu1": lambda x: F.elu(x) + 1, "relu": F.relu}


@pytest.fixture(scope="module", autouse=True)
def _cache_dir(tmp_path_factory):
    """One cache directory for the session's TVM tests, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(cache.ENV, str(tmp_path_factory.getbasetemp() / "attnopt-cache"))
        yield


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.double() - expected.double()).norm()
    return (diff / expected.double().norm().clamp_min(1e-12)).item()


def inputs(b, h, kv, n, m, dk, dv, feature="elu1", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    phi = FEATURES[feature]
    q = phi(torch.randn(b, h, n, dk, generator=gen))
    k = phi(torch.randn(b, kv, m, dk, generator=gen))
    v = torch.randn(b, kv, m, dv, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def check(q, k, v, causal: bool, config=None):
    out = tvm_linear.forward(q, k, v, causal=causal, config=config)
    expected = linear_attention(q, k, v, causal=causal)
    assert out.dtype == q.dtype and out.shape == expected.shape
    assert torch.isfinite(out).all()
    err = rel_rms(out, expected)
    assert err <= TOLERANCE[q.dtype], f"relative RMS error {err:.3g}"


def test_reference_is_the_quadratic_form():
    q, k, v = inputs(1, 2, 2, 9, 9, 8, 5)
    scores = (q @ k.transpose(-2, -1)).tril()
    quadratic = (scores @ v) / (scores.sum(-1, keepdim=True) + 1e-6)
    assert rel_rms(linear_attention(q, k, v), quadratic) < 1e-6
    full = q @ k.transpose(-2, -1)
    closed = (full @ v) / (full.sum(-1, keepdim=True) + 1e-6)
    assert rel_rms(linear_attention(q, k, v, causal=False), closed) < 1e-6


# (b, h, kv, n, dk, dv): one token, chunk-crossing odd lengths, GQA, head dims that differ
SHAPES = [
    (1, 1, 1, 1, 64, 64),
    (2, 4, 2, 37, 64, 64),
    (1, 3, 1, 130, 64, 64),
    (1, 2, 2, 77, 32, 48),
]


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, causal, feature):
    b, h, kv, n, dk, dv = shape
    check(*inputs(b, h, kv, n, n, dk, dv, feature), causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]], ids=lambda s: "x".join(map(str, s)))
def test_every_cpu_level(cpu_level: Target, shape, causal):
    b, h, kv, n, dk, dv = shape
    check(*inputs(b, h, kv, n, n, dk, dv), causal)


def test_cross_attention_lengths():
    """Without causality keys and queries may differ in number."""
    check(*inputs(2, 2, 1, 20, 91, 64, 64), causal=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_dtypes(dtype, cpu_level: Target):
    q, k, v = inputs(1, 2, 2, 45, 45, 64, 64, dtype=dtype)
    if tvm_linear._contract(q, k, v, True) is not None:
        pytest.skip(tvm_linear._contract(q, k, v, True))
    check(q, k, v, causal=True)


def test_explicit_config_and_strides(cpu_level: Target):
    q, k, v = inputs(1, 2, 1, 50, 50, 64, 64)
    heads_minor = q.transpose(1, 2).contiguous().transpose(1, 2)
    check(heads_minor, k, v, causal=True, config={"chunk": 16, "vec": 4})


def test_config_space(cpu_level: Target):
    target = cpu_level
    sig = KernelSignature(head_dim=64, dtype="float32", mask_kind="causal", value_dim=48)
    default = tvm_linear.SPACE.default(target, sig)
    assert tvm_linear.SPACE.keep(default, target, sig) is None
    assert default["vec"] == target.vector_bits // 32  # the widest vectors the target has
    if target.vector_bits < 512:
        assert "512-bit vectors" in tvm_linear.SPACE.keep({"chunk": 64, "vec": 16}, target, sig)
    assert "multiples of vec" in tvm_linear.SPACE.keep({"chunk": 20, "vec": 8}, target, sig)


def test_contract_errors_name_the_fix():
    q, k, v = inputs(1, 2, 1, 8, 12, 16, 16)
    with pytest.raises(KernelError, match="as many keys as queries"):
        tvm_linear.forward(q, k, v, causal=True)
    with pytest.raises(KernelError, match="share one of"):
        tvm_linear.forward(q.double(), k, v, causal=False)


def gates(k: torch.Tensor, seed=1, strength=1.0) -> torch.Tensor:
    """``log α ≤ 0`` beside the keys; ``strength`` scales how fast the state forgets."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(k.shape, generator=gen) * 2
    return (F.logsigmoid(raw) * strength).to(k.dtype)


def check_gated(q, k, v, log_alpha, config=None):
    out = tvm_linear.forward(q, k, v, causal=True, log_alpha=log_alpha, config=config)
    expected = normalised_gla(q, k, v, log_alpha)
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    err = rel_rms(out, expected)
    assert err <= TOLERANCE[q.dtype], f"relative RMS error {err:.3g}"


def test_gated_reference_is_the_quadratic_form():
    q, k, v = inputs(1, 2, 1, 11, 11, 8, 5)
    g = gates(k)
    b = g.repeat_interleave(2, dim=1).cumsum(dim=-2)  # (B, H, N, Dk)
    k2 = k.repeat_interleave(2, dim=1)
    decay = (b[:, :, :, None, :] - b[:, :, None, :, :]).exp()  # i, j, c: e^{b_i − b_j}
    scores = (q[:, :, :, None, :] * k2[:, :, None, :, :] * decay).sum(-1).tril()
    quadratic = (scores @ v.repeat_interleave(2, dim=1)) / (scores.sum(-1, keepdim=True) + 1e-6)
    assert rel_rms(normalised_gla(q, k, v, g), quadratic) < 1e-6


@pytest.mark.parametrize("strength", [1.0, 30.0], ids=["slow", "fast-forgetting"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_matches_reference(shape, strength):
    b, h, kv, n, dk, dv = shape
    q, k, v = inputs(b, h, kv, n, n, dk, dv)
    check_gated(q, k, v, gates(k, strength=strength))


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]], ids=lambda s: "x".join(map(str, s)))
def test_gated_every_cpu_level(cpu_level: Target, shape):
    b, h, kv, n, dk, dv = shape
    q, k, v = inputs(b, h, kv, n, n, dk, dv, feature="relu")
    check_gated(q, k, v, gates(k), config={"chunk": 16, "vec": 4})


def test_gated_contract_errors():
    q, k, v = inputs(1, 2, 1, 8, 8, 16, 16)
    with pytest.raises(KernelError, match="gated linear attention is causal"):
        tvm_linear.forward(q, k, v, causal=False, log_alpha=gates(k))
    with pytest.raises(KernelError, match="must be like k"):
        tvm_linear.forward(q, k, v, causal=True, log_alpha=gates(k)[..., :4])


def test_gla_calls_dispatch_to_the_kernel(monkeypatch):
    """``linear_forward`` with gates (the gla pass's call) takes the TVM kernel above its
    threshold, and the result is the reference's."""
    from attnopt.codegen import linear_ops

    q, k, v = inputs(1, 2, 1, 40, 40, 16, 16)
    g = gates(k)
    assert tvm_linear._supports_linear(q, k, v, g, True) is not None  # below MIN_TOKENS
    monkeypatch.setattr(tvm_linear, "MIN_TOKENS", 1)
    assert tvm_linear._supports_linear(q, k, v, g, True) is None
    calls = []
    monkeypatch.setattr(tvm_linear, "forward", lambda *a, **kw: calls.append(kw) or
                        normalised_gla(*a, kw["log_alpha"]))  # fmt: skip
    out = linear_ops.linear_forward(q, k, v, g, causal=True, chunk=16)
    assert calls and calls[0]["log_alpha"] is g
    assert rel_rms(out, normalised_gla(q, k, v, g)) < 1e-6
