"""The CPU quant kernel against the reference, run as a script (``python quant_cpu_check.py``)
in a process whose environment caps oneDNN and ATen at one ISA level (``ONEDNN_MAX_CPU_ISA``,
``ATEN_CPU_CAPABILITY``), which they read once at start-up. Exits non-zero on a mismatch and
prints the integer GEMM's oneDNN ISA cap it ran under."""

import os

import torch
import torch.nn.functional as F

from attnopt.codegen.eager.quant import k_range, quant_attention_cpu
from attnopt.codegen.reference.exact import exact_attention
from attnopt.codegen.reference.quant import quant_attention

torch.manual_seed(0)
# (n, m, kv heads, flags, mask kind, bits, pv)
CASES = (
    (37, 45, 2, {"causal": True}, None, 8, "fp16"),
    (45, 37, 1, {"causal": True, "window": 7}, None, 8, "bf16"),
    (70, 70, 2, {"window": 9}, None, 4, "fp16"),
    (33, 29, 2, {}, "additive", 8, "fp8"),
    (33, 29, 2, {}, "boolean", 8, "fp16"),
)


def cos(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


for n, m, kv_heads, flags, kind, bits, pv in CASES:
    q, k, v = (
        torch.randn(2, 4, n, 24),
        torch.randn(2, kv_heads, m, 24) + 1,
        torch.randn(2, kv_heads, m, 24),
    )
    mask = None
    if kind == "additive":
        mask = torch.randn(2, 1, n, m).expand(2, 4, n, m)
    elif kind == "boolean":
        mask = torch.rand(2, 4, n, m) > 0.3
        mask[:, :, 0] = False  # a fully masked row: 0
    args = dict(scale=24**-0.5, bits=bits, pv=pv, block_q=32, block_k=16, **flags)
    got = quant_attention_cpu(q, k, v, mask, **args)
    want = quant_attention(q, k, v, mask, **args, k_qmax=k_range(bits))
    exact, _ = exact_attention(q, k, v, mask, **{**flags, "scale": 24**-0.5})
    rel = ((got - want).norm() / want.norm()).item()
    # same quantized scores; P rounds to 16 (or 8) bits after the softmax's normalisation here,
    # against the running maximum there, so the two differ only by that rounding
    limit = {"fp16": 2e-3, "bf16": 1e-2, "fp8": 8e-2}[pv]
    assert rel < limit, (n, m, flags, kind, bits, pv, rel)
    assert cos(got, exact) >= cos(want, exact) - 2e-3, (n, m, flags, kind, bits, pv)
    if kind == "boolean":
        assert torch.equal(got[:, :, 0], torch.zeros_like(got[:, :, 0]))
print(
    "ok", os.environ.get("ONEDNN_MAX_CPU_ISA"), torch.backends.cpu.get_cpu_capability(), k_range(8)
)
