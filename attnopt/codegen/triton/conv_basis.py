"""conv_basis on CUDA: the per-row work around torch's FFT fused (ALGORITHMS.md §2).

Triton has no FFT, so each segment's convolution stays ``torch.fft`` (cuFFT). What is fused
is everything after it: merging the segment's part into the running rows (one running maximum
per row, as online softmax merges blocks: five elementwise passes become one) and the final
division of the numerator columns by the denominator column. Same results as
``codegen/eager/conv_basis.conv_basis_heads``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge(
    out_ptr,
    top_ptr,
    part_ptr,
    peak_ptr,
    n,
    start,
    width,
    part_g,
    part_row,
    FIRST: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Row ``start + r`` of head ``g``: fold ``part[g, r]`` (scaled by ``peak[g]``) into
    ``out`` (scaled by ``top``); on the first segment just take it."""
    r = tl.program_id(0)
    g = tl.program_id(1)
    cols = tl.arange(0, BLOCK_W)
    keep = cols < width
    peak = tl.load(peak_ptr + g)
    part = tl.load(part_ptr + g * part_g + r * part_row + cols, mask=keep, other=0.0)
    row = g * n + start + r
    if FIRST:
        new = peak
        acc = part
    else:
        top = tl.load(top_ptr + row)
        new = tl.maximum(top, peak)
        old = tl.load(out_ptr + row * width + cols, mask=keep, other=0.0)
        acc = old * tl.exp(top - new) + part * tl.exp(peak - new)
    tl.store(out_ptr + row * width + cols, acc, mask=keep)
    tl.store(top_ptr + row, new)


@triton.jit
def _normalise(both_ptr, out_ptr, width, BLOCK_W: tl.constexpr):
    """``out[row] = both[row, :-1] / both[row, -1]``."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_W)
    both = tl.load(both_ptr + row * width + cols, mask=cols < width, other=0.0)
    den = tl.sum(tl.where(cols == width - 1, both, 0.0), axis=0)
    tl.store(out_ptr + row * (width - 1) + cols, both / den, mask=cols < width - 1)


def merge(out, top, part, peak, start: int, first: bool) -> None:
    """In place: rows ``start..n−1`` of ``out (G, n, W)``, ``top (G, n)`` take segment
    ``part (G, n − start, W)`` with its maxima ``peak (G,)``."""
    g, n, width = out.shape
    assert out.is_contiguous() and top.is_contiguous()
    if part.stride(-1) != 1:  # irfft along the rows may hand back a transposed layout
        part = part.contiguous()
    rows = n - start
    _merge[(rows, g)](
        out,
        top,
        part,
        peak.contiguous(),
        n,
        start,
        width,
        part.stride(0),
        part.stride(1),
        FIRST=first,
        BLOCK_W=triton.next_power_of_2(width),
    )


def normalise(both: torch.Tensor) -> torch.Tensor:
    """``both[..., :-1] / both[..., -1:]`` for a contiguous ``(G, n, W)``."""
    assert both.is_contiguous()
    g, n, width = both.shape
    out = both.new_empty(g, n, width - 1)
    _normalise[(g * n,)](both, out, width, BLOCK_W=triton.next_power_of_2(width))
    return out
