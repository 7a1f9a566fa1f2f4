"""LLM.int8()-style linear layer (ALGORITHMS.md §6, projections): vector-wise INT8 with outlier
feature columns kept in the activations' own precision.

Per call, the input columns where any ``|x| >= threshold`` are the outliers: they are multiplied
by the original weight's columns in ``x.dtype`` (exact, as the model would), and zeroed in the
rest. The rest is quantized per row (``absmax / 127`` per token) against the weight quantized
per output channel, one ``torch._int_mm`` with int32 accumulation (oneDNN: VNNI / AMX where
present; other devices multiply the integers in fp32, see ``_int_product``), then scaled by the
outer product of the two scale vectors. Without the outlier split, one large feature would set
every row's scale and wipe out the small features (Dettmers et al.).

The weight is ``_int_mm``'s second operand, so on CPUs whose int8 GEMM saturates int16 pair sums
(no VNNI / AMX) it is quantized to the same reduced range as the attention kernel's K
(``k_range``).
"""

from __future__ import annotations

import torch
from torch import nn

from attnopt.codegen.eager.quant import k_range

OUTLIER_THRESHOLD = 6.0
ACT_QMAX = 127


def quantize_weight(weight: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 (out, in), fp32 scale (out,))``: each output channel to ``±qmax``."""
    wf = weight.detach().float()
    scale = wf.abs().amax(dim=1).clamp_min(1e-12) / qmax
    return torch.round(wf / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8), scale


def int8_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    threshold: float = OUTLIER_THRESHOLD,
) -> torch.Tensor:
    """``x @ weight.T + bias`` with the INT8 split above; ``x (..., in)``, ``weight (out, in)``
    (the original, read only for outlier columns), ``w_int8``/``w_scale`` from
    ``quantize_weight``."""
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 0:
        return x.new_zeros(*lead, weight.shape[0])
    # (amax and amin: torch.aminmax is several times slower on CPU)
    cols = ((rows.amax(dim=0) >= threshold) | (rows.amin(dim=0) <= -threshold)).nonzero()
    cols = cols.flatten()
    regular = rows.float()
    if cols.numel():
        regular = regular.index_fill(1, cols, 0.0)
    x_scale = regular.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(ACT_QMAX)
    x_int8 = (regular / x_scale).round_().to(torch.int8)
    out = _int_product(x_int8, w_int8.t()).mul_(x_scale).mul_(w_scale)
    if cols.numel():
        out += (rows[:, cols] @ weight[:, cols].to(rows.dtype).t()).float()
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*lead, weight.shape[0])


def _int_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of int8 matrices as fp32: ``torch._int_mm`` (int32 accumulation) on CPU; on
    other devices the same integers multiplied in fp32 (CUDA's ``_int_mm`` takes only > 16 rows
    and multiples of 8; fp32 rounds the integer sums only past 2^24, far below the
    quantization error), correct but not faster."""
    if a.device.type == "cpu":
        return torch._int_mm(a, b).float()
    return a.float() @ b.float()


class Int8Linear(nn.Module):
    """A linear layer's weight quantized per output channel; ``int8_linear`` per call.

    ``weight`` and ``bias`` are the model's own tensors, not copies (outlier columns read the
    weight): when they change in place (``load_state_dict`` into the optimized model, training)
    the INT8 copy is redone on the next call, found by the weight's version counter."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        threshold: float = OUTLIER_THRESHOLD,
    ) -> None:
        super().__init__()
        # not persistent: the checkpoint holds them under the model's own names
        self.register_buffer("weight", weight.detach(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)
        self.threshold = float(threshold)
        self._quantize()

    def _quantize(self) -> None:
        w_int8, w_scale = quantize_weight(self.weight, k_range(8))
        self.register_buffer("w_int8", w_int8, persistent=False)
        self.register_buffer("w_scale", w_scale, persistent=False)
        self._seen = self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight._version != self._seen:
            self._quantize()
        return int8_linear(x, self.w_int8, self.w_scale, self.weight, self.bias, self.threshold)
