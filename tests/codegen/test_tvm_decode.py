"""The TVM split-KV decode kernel against the fp32 reference, and the CPU dispatch of decode calls.

Most cases share one explicit config of 128-bit vectors, so the grid compiles a handful of
kernels (one per mask kind) whatever the CPU; ``slices`` vary at run time.
"""

from dataclasses import replace

import pytest
import torch

from attnopt.codegen import ops, registry, sdpa
from attnopt.codegen.reference.exact import exact_attention
from attnopt.codegen.signature import KernelSignature
from attnopt.codegen.tvm import decode
from attnopt.errors import KernelError
from attnopt.targets import TARGETS, detect_cpu
from tests.codegen.test_tvm_exact import (  # noqa: F401  (_cache_dir: the session's cache)
    TOLERANCE,
    _cache_dir,
    inputs,
    make_mask,
    rel_rms,
)


def _config(splits: int, row_block: int = 4, rows: int = 2) -> dict:
    return {"block_n": 32, "row_block": row_block, "rows": rows, "vec": 4, "pv_cols": 2} | {
        "splits": splits
    }


def check(q, k, v, mask=None, *, causal=False, window=0, config=None):
    """Outputs within the dtype's tolerance; lse within 1e-5 where finite, ``-inf`` where the
    reference's is."""
    flags = dict(scale=q.shape[-1] ** -0.5, causal=causal, window=window)
    out, lse = decode.forward(q, k, v, mask, config=config, **flags)
    ref_out, ref_lse = exact_attention(q, k, v, mask, **flags)
    assert out.dtype == q.dtype and out.shape == ref_out.shape
    err = rel_rms(out, ref_out)
    assert err <= TOLERANCE[q.dtype], f"relative RMS error {err:.3g}"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "-inf lse rows differ"
    finite = torch.isfinite(ref_lse)
    lse_err = (lse[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
    assert lse_err <= 1e-5 * max(1.0, ref_lse[finite].abs().max().item()), f"lse error {lse_err}"


# (b, h, kv, n, m, slices): odd caches, n in {1, 3, 16} (and n > m), GQA 1, 2, 4, 8 and MQA;
# slices from one to more than the keys fill (row blocks of 4 rows: GQA groups span several,
# padding rows included)
SHAPES = [
    (1, 2, 2, 1, 1, 1),
    (2, 4, 2, 1, 37, 2),
    (1, 8, 2, 1, 131, 8),
    (1, 4, 1, 3, 61, 4),
    (2, 8, 1, 3, 200, 3),
    (1, 16, 2, 16, 83, 2),
    (1, 2, 2, 16, 33, 32),
    (1, 4, 2, 16, 9, 2),  # more queries than keys: causal rows before the cache see nothing
]
KINDS = ["none", "causal", "window", "band", "additive", "boolean", "padding", "empty_rows"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, kind):
    b, h, kv, n, m, slices = shape
    q, k, v = inputs(b, h, kv, n, m, 16)
    mask, causal, window = make_mask(kind, b, h, n, m)
    check(q, k, v, mask, causal=causal, window=window, config=_config(slices))


@pytest.mark.parametrize("window", [1, 4, 40])
def test_windows_shorter_than_the_cache(window):
    """Causal sliding windows: the slices cover the window only, rows see their own window."""
    q, k, v = inputs(1, 8, 2, 3, 150, 16)
    check(q, k, v, causal=True, window=window, config=_config(4))


def test_static_cache_masks_unwritten_slots():
    """A static cache longer than the tokens written: a bool mask (True up to the valid length,
    causal within it) gives what the valid prefix alone gives."""
    b, h, kv, n, m, valid = 2, 4, 2, 2, 96, 41
    q, k, v = inputs(b, h, kv, n, m, 16)
    keys, rows = torch.arange(m), torch.arange(n) + valid - n
    mask = (keys[None, :] <= rows[:, None]).expand(b, h, n, m)
    out, lse = decode.forward(q, k, v, mask, scale=0.25, config=_config(3))
    ref_out, ref_lse = exact_attention(q, k[:, :, :valid], v[:, :, :valid], scale=0.25, causal=True)
    assert rel_rms(out, ref_out) <= TOLERANCE[torch.float32]
    assert (lse - ref_lse).abs().max().item() <= 1e-5


def test_default_config_and_value_dim():
    """The default config (the CPU's widest vectors) on head dim 64, value dim 32."""
    q, k, v = inputs(2, 8, 2, 1, 700, 64, dv=32)
    check(q, k, v, causal=True)


def test_half_dtypes_when_the_cpu_converts_them():
    q, k, v = inputs(1, 4, 2, 2, 45, 16, dtype=torch.float16)
    if decode.supports(q, k, v, None, True, 0) is not None:
        pytest.skip("this CPU has no vector fp16 conversions")
    check(q, k, v, causal=True, config=_config(2))


def test_config_space():
    sig = KernelSignature(64, "float32", "causal", kv_group=4, n=1, m=8192, heads=32, batch=1)
    cpu = detect_cpu()
    config = decode.FORWARD_SPACE.default(cpu, sig)
    assert decode.FORWARD_SPACE.keep(config, cpu, sig) is None
    assert config["row_block"] >= 4  # the GQA group's 4 query rows share each K/V load
    assert decode.FORWARD_SPACE.valid(cpu, sig)
    assert "GPU" in decode.FORWARD_SPACE.keep(config, TARGETS["h100"], sig)
    wide = dict(config, vec=16)
    narrow = replace(sig, head_dim=36)
    assert "multiples" in decode.FORWARD_SPACE.keep(dict(config, vec=8), cpu, narrow)
    if cpu.vector_bits < 512:
        assert "vectors" in decode.FORWARD_SPACE.keep(wide, cpu, sig)
    long_call = replace(sig, n=17)
    assert "at most" in decode.FORWARD_SPACE.keep(config, cpu, long_call)


def test_refuses_inputs_outside_the_contract():
    q, k, v = inputs(1, 4, 2, 17, 40, 16)
    assert "at most" in decode.supports(q, k, v, None, True, 0)
    with pytest.raises(KernelError, match="at most"):
        decode.forward(q, k, v, scale=0.25)
    q, k, v = inputs(1, 4, 2, 1, 40, 16)
    assert "share one of" in decode.supports(q.double(), k, v, None, False, 0)
    with pytest.raises(KernelError, match="cannot run"):
        decode.forward(q, k, v, scale=0.25, config=dict(_config(2), row_block=3))


def test_attention_op_dispatches_decode_calls():
    """``attnopt::attention`` on CPU: this kernel for decode calls SDPA cannot express (bottom-
    right causal with n > 1, windows) at any size; SDPA for the calls it can run; the exact
    kernels for long query blocks."""
    short = inputs(1, 8, 2, 1, 1023, 64)
    assert registry.select_kernel("exact", *short, None, True, 0).name == "sdpa"
    assert sdpa.supports(*short, None, True, 4) is not None
    assert registry.select_kernel("exact", *short, None, True, 4).name == "tvm_decode"
    speculative = inputs(1, 8, 2, 4, 64, 64)
    assert registry.select_kernel("exact", *speculative, None, True, 0).name == "tvm_decode"
    per_head = inputs(1, 8, 8, 1, 4001, 64)
    assert registry.select_kernel("exact", *per_head, None, True, 0).name == "sdpa"
    prefill = inputs(1, 8, 2, decode.MAX_QUERIES + 1, 64, 64)
    assert registry.select_kernel("exact", *prefill, None, True, 0).name != "tvm_decode"
    q, k, v = inputs(1, 8, 2, 1, 1000 + 37, 64)  # a window: SDPA cannot run it

    calls = []
    kernel = registry.kernels_for("exact", "cpu")[0]

    def counted(*args, **kwargs):
        calls.append(1)
        return decode.forward(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        counted_kernel = replace(kernel, forward=counted)
        patch.setitem(registry._KERNELS[("exact", "cpu")], "tvm_decode", counted_kernel)
        out = torch.ops.attnopt.attention(q, k, v, None, 0.125, True, 64, float("-inf"), 4)
    assert calls == [1]
    with ops.use_kernel("reference"):
        expected = torch.ops.attnopt.attention(q, k, v, None, 0.125, True, 64, float("-inf"), 4)
    assert rel_rms(out, expected) <= 1e-5


def test_tunable_by_module_path():
    """The tuner finds the declared space and times configs of it (``splits`` included)."""
    from attnopt.autotune import kernels

    (forward,) = kernels.passes("tvm_decode")  # its registered name
    assert forward.space is decode.FORWARD_SPACE
    sig = KernelSignature(16, "float32", "causal", kv_group=2, n=1, m=100, heads=4)
    launch = kernels.runner(forward, sig, detect_cpu())
    for splits in (1, 4):
        out, lse = launch(_config(splits))()
        assert out.shape == (1, 4, 1, 16) and torch.isfinite(lse).all()


def test_strided_views_of_a_static_cache():
    """HF layouts: q and the cache as (B, S, H, D) transposed, the cache a prefix of a longer
    preallocated buffer; read in place, as the reference reads them."""
    b, h, kv, n, m, d = 2, 6, 2, 3, 45, 16
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(b, n, h, d, generator=gen).transpose(1, 2)
    k_buf, v_buf = (torch.randn(b, 64, kv, d, generator=gen) for _ in range(2))
    k, v = k_buf[:, :m].transpose(1, 2), v_buf[:, :m].transpose(1, 2)
    assert not k.is_contiguous()
    check(q, k, v, causal=True, config=_config(3))


def test_optimize_runs_and_reports_the_decode_kernel():
    """A site whose example is a decode call: the report names this kernel and its config, and
    the optimized model runs it."""
    import attnopt

    class Decode(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2) * 0.125, dim=-1) @ v

    q, k, v = inputs(1, 8, 8, 1, 300, 64)
    calls = []
    kernel = registry.kernels_for("exact", "cpu")[0]

    def counted(*args, **kwargs):
        calls.append(1)
        return decode.forward(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:  # this call, not the threshold, is under test
        patch.setattr(decode, "_sdpa_declines", lambda *args: True)
        optimized = attnopt.optimize(Decode(), (q, k, v))
        (site,) = optimized.attnopt_report.rewritten
        assert site.kernel.endswith("tvm_decode") and "tvm.decode.cpu" in site.config
        patch.setitem(
            registry._KERNELS[("exact", "cpu")], "tvm_decode", replace(kernel, forward=counted)
        )
        out = optimized(q, k, v)
    assert calls == [1]
    assert rel_rms(out, exact_attention(q, k, v, scale=0.125)[0]) <= 1e-5
