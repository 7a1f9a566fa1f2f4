"""The Triton split-KV decode kernel against the fp32 reference: cache lengths, GQA, windows, masks.

Without CUDA the kernels run under Triton's interpreter at tiny sizes (see
``test_triton_exact.py``); the ``gpu`` variants run the same cases compiled, and check that
``attnopt::attention`` dispatches decode calls to this kernel.
"""

import os
from dataclasses import replace

import torch

if not torch.cuda.is_available():  # read when triton is first imported, so before attnopt is
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from attnopt.codegen import ops, registry
from attnopt.codegen.reference.exact import exact_attention, key_range
from attnopt.codegen.signature import KernelSignature
from attnopt.codegen.triton import decode
from attnopt.targets import TARGETS, resolve
from tests.codegen.test_triton_exact import (
    FP32_TARGETS,
    GRID_TARGETS,
    TOLERANCE,
    _mask,
    _require,
    assert_close,
)

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")


def _config(block_n: int, splits: int) -> dict:
    return {"BLOCK_N": block_n, "splits": splits, "num_warps": 4, "num_stages": 1}


def _check(device, dtype, b, h, kv_heads, n, m, d, mask_kind, config, window=None):
    gen = torch.Generator().manual_seed(n * 1000 + m)
    q = torch.randn(b, h, n, d, generator=gen).to(device, dtype)
    k = torch.randn(b, kv_heads, m, d, generator=gen).to(device, dtype)
    v = torch.randn(b, kv_heads, m, d, generator=gen).to(device, dtype)
    mask, causal, win, fill = _mask(mask_kind, b, h, n, m, gen)
    mask = None if mask is None else mask.to(device)
    flags = dict(scale=d**-0.5, causal=causal, window=win if window is None else window, fill=fill)
    out, lse = decode.forward(q, k, v, mask, **flags, config=config)
    ref_out, ref_lse = exact_attention(q.float(), k.float(), v.float(), mask, **flags)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close("out", out, ref_out, TOLERANCE[dtype])
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "rows with -inf lse differ"
    assert_close("lse", lse[~empty], ref_lse[~empty], TOLERANCE[torch.float32])


# id: (batch, heads, kv heads, queries, cache length, head dim, mask kind, (BLOCK_N, splits)).
# Odd caches end in partial tiles; splits of 1 to more than the band holds (empty slices).
CASES = {
    "n1-m37-gqa2": (2, 4, 2, 1, 37, 16, "causal", (16, 2)),
    "n1-m129-gqa4-split8": (1, 8, 2, 1, 129, 32, "causal", (16, 8)),
    "n1-m50-mha-nocausal": (1, 2, 2, 1, 50, 16, "none", (32, 1)),
    "n3-m61-mqa": (1, 4, 1, 3, 61, 16, "causal", (16, 4)),
    "n3-m45-gqa2-window": (1, 4, 2, 3, 45, 16, "causal_window", (16, 4)),
    "n16-m83-gqa8-rowblocks": (1, 16, 2, 16, 83, 16, "causal", (32, 2)),
    "n16-m33-window": (1, 2, 1, 16, 33, 24, "window", (16, 2)),
    "n3-m40-additive": (2, 4, 2, 3, 40, 16, "additive", (16, 2)),
    "n3-m40-boolean": (1, 4, 2, 3, 40, 16, "boolean", (16, 4)),
    "n1-m41-padding": (2, 2, 1, 1, 41, 16, "padding", (16, 2)),
    "n3-m20-empty-rows": (1, 2, 1, 3, 20, 16, "empty_rows", (16, 2)),
    "n16-m9-causal-rows-before-the-cache": (1, 4, 2, 16, 9, 16, "causal", (16, 1)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("device", "dtype"), GRID_TARGETS)
def test_matches_reference(device, dtype, case):
    _require(device)
    *dims, mask_kind, tiles = CASES[case]
    _check(device, dtype, *dims, mask_kind, _config(*tiles))


@pytest.mark.parametrize("window", [1, 5, 40])
@pytest.mark.parametrize(("device", "dtype"), FP32_TARGETS)
def test_sliding_window_splits_only_the_band(device, dtype, window):
    """A causal window shorter than the cache: slices cover the window, not the whole cache."""
    _require(device)
    _check(device, dtype, 1, 4, 2, 3, 77, 16, "causal", _config(16, 4), window=window)
    first, last = key_range(3, 77, True, window)
    assert (first, last) == (max(0, 77 - 3 - window + 1), 77)


@pytest.mark.parametrize(("device", "dtype"), FP32_TARGETS)
def test_static_cache_masks_unwritten_slots(device, dtype):
    """A static cache longer than the tokens written so far: a bool mask (True up to the valid
    length, causal within it) gives what the valid prefix alone gives."""
    _require(device)
    b, h, kv_heads, n, m, valid, d = 2, 4, 2, 2, 64, 29, 16
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(b, h, n, d, generator=gen).to(device)
    k, v = (torch.randn(b, kv_heads, m, d, generator=gen).to(device) for _ in range(2))
    keys, rows = torch.arange(m), torch.arange(n) + valid - n
    mask = (keys[None, :] <= rows[:, None]).expand(b, h, n, m).to(device)
    out, lse = decode.forward(q, k, v, mask, scale=0.25, config=_config(16, 4))
    ref_out, ref_lse = exact_attention(q, k[:, :, :valid], v[:, :, :valid], scale=0.25, causal=True)
    assert_close("out", out, ref_out, TOLERANCE[dtype])
    assert_close("lse", lse, ref_lse, TOLERANCE[dtype])


def test_registered_above_the_exact_kernel_for_decode_calls_only():
    kernels = {k.name: k for k in registry.kernels_for("exact", "cuda")}
    assert kernels["triton_decode"].priority > kernels["triton"].priority
    assert kernels["triton_decode"].backward is kernels["triton"].backward
    q, k = torch.randn(1, 4, decode.MAX_QUERIES + 1, 16), torch.randn(1, 2, 64, 16)
    assert "at most" in decode.supports(q, k, k, None, True, 0)


def test_config_space_prunes_with_reasons():
    sig = KernelSignature(128, "bfloat16", "causal", kv_group=8, n=1, m=32768, heads=32)
    space = decode.FORWARD_SPACE
    for name in ("h100", "a100", "sm89", "cuda"):
        fp16 = replace(sig, dtype="float16")
        config = space.default(TARGETS[name], fp16)
        assert space.keep(config, TARGETS[name], fp16) is None
    # batch 1, 4 kv heads on 132 SMs: the default splits the 32k cache to fill the GPU
    assert space.default(TARGETS["h100"], sig)["splits"] >= 16
    short = replace(sig, m=40)
    assert "exceed the cache" in space.keep(_config(16, 8), TARGETS["h100"], short)
    long_call = replace(sig, n=64)
    assert "at most" in space.keep(_config(16, 1), TARGETS["h100"], long_call)
    assert "not a GPU" in space.keep(_config(16, 1), resolve("cpu"), sig)
    assert space.default(resolve("cpu"), sig) == decode.INTERPRETER_CONFIG
    assert space.valid(TARGETS["h100"], sig)


@pytest.mark.gpu
def test_op_dispatches_decode_calls_to_the_split_kernel(monkeypatch):
    """On CUDA, ``attnopt::attention`` runs decode calls (GQA, bottom-right causal) here."""
    calls = []
    kernel = registry.kernels_for("exact", "cuda")[0]
    assert kernel.name == "triton_decode"

    def counted(*args, **kwargs):
        calls.append(1)
        return decode.forward(*args, **kwargs)

    counted_kernel = replace(kernel, forward=counted)
    monkeypatch.setitem(registry._KERNELS[("exact", "cuda")], "triton_decode", counted_kernel)
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(1, 4, 4099, 128, device="cuda", dtype=torch.float16) for _ in range(2))
    out = ops.attention(q, k, v, None, 128**-0.5, True, 0, float("-inf"), 8)
    ref, _ = exact_attention(q.float(), k.float(), v.float(), scale=128**-0.5, causal=True)
    assert calls == [1]
    assert_close("out", out, ref, TOLERANCE[torch.float16])


def test_tunable_by_module_path():
    from attnopt.autotune import kernels

    (forward,) = kernels.passes("triton_decode")  # its registered name
    assert forward.space is decode.FORWARD_SPACE and forward.launch is decode.forward


@pytest.mark.parametrize(("device", "dtype"), FP32_TARGETS)
def test_strided_views_of_a_static_cache(device, dtype):
    """HF layouts: q and the cache as (B, S, H, D) transposed, the cache a prefix of a longer
    preallocated buffer, read in place."""
    _require(device)
    b, h, kv, n, m, d = 2, 6, 2, 3, 45, 16
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(b, n, h, d, generator=gen).to(device).transpose(1, 2)
    k_buf, v_buf = (torch.randn(b, 64, kv, d, generator=gen).to(device) for _ in range(2))
    k, v = k_buf[:, :m].transpose(1, 2), v_buf[:, :m].transpose(1, 2)
    out, lse = decode.forward(q, k, v, scale=0.25, causal=True, config=_config(16, 3))
    ref_out, ref_lse = exact_attention(q, k, v, scale=0.25, causal=True)
    assert_close("out", out, ref_out, TOLERANCE[dtype])
    assert_close("lse", lse, ref_lse, TOLERANCE[dtype])
