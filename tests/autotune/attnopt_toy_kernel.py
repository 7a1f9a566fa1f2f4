"""A toy tunable kernel for the tuner's tests: blocked exact attention in plain torch.

It follows the kernel-module convention (``SPACE`` + ``launch``) so tests time real work whose
speed depends on the config (small tiles mean many small matmuls), with configs that ``keep``
rejects and configs that fail at launch, like an out-of-resources Triton launch.
"""

from __future__ import annotations

import torch
from torch import nn

from attnopt.autotune.runtime import bucket
from attnopt.autotune.space import Config, ConfigSpace
from attnopt.codegen.signature import KernelSignature
from attnopt.targets import Target

PARAMS = {"block_m": (16, 32, 64, 128, 256), "block_n": (16, 32, 64, 128, 256), "split": (1, 2)}
MAX_TILE = 128 * 128


def keep(config: Config, target: Target, sig: KernelSignature) -> str | None:
    if config["block_m"] > bucket(sig.n) or config["block_n"] > bucket(sig.m):
        return "block longer than the padded sequence"
    if config["block_m"] * config["block_n"] > MAX_TILE:
        return f"tile above the toy's {MAX_TILE} scores of scratch"
    return None


def default(target: Target, sig: KernelSignature) -> Config:
    return {"block_m": 16, "block_n": 32, "split": 1}


SPACE = ConfigSpace("toy.blocked", PARAMS, keep, default)


def launch(q, k, v, mask, *, scale, causal, window, fill, config):
    """Online-softmax attention over (block_m × block_n) tiles, heads in ``split`` chunks."""
    if mask is not None or causal or window:
        raise NotImplementedError("the toy kernel computes unmasked attention only")
    if config["split"] == 2 and config["block_n"] == 16:
        raise RuntimeError("toy out of resources: split=2 needs block_n >= 32")
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    chunk = -(-q.shape[1] // config["split"])
    outs = [
        _blocked(qs, ks, vs, scale, config["block_m"], config["block_n"])
        for qs, ks, vs in zip(q.split(chunk, 1), k.split(chunk, 1), v.split(chunk, 1), strict=True)
    ]
    return torch.cat(outs, 1)


def _blocked(q, k, v, scale, block_m, block_n):
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    for i in range(0, q.shape[2], block_m):
        qi = q[:, :, i : i + block_m] * scale
        top = qi.new_full(qi.shape[:-1], float("-inf"))
        total = qi.new_zeros(qi.shape[:-1])
        acc = qi.new_zeros(*qi.shape[:-1], v.shape[-1])
        for j in range(0, k.shape[2], block_n):
            scores = qi @ k[:, :, j : j + block_n].transpose(-1, -2)
            new_top = torch.maximum(top, scores.amax(-1))
            probs = torch.exp(scores - new_top[..., None])
            decay = torch.exp(top - new_top)
            total = total * decay + probs.sum(-1)
            acc = acc * decay[..., None] + probs @ v[:, :, j : j + block_n]
            top = new_top
        out[:, :, i : i + block_m] = acc / total[..., None]
    return out


class TinyAttention(nn.Module):
    """One self-attention block written out as matmul/softmax/matmul, for model sources."""

    def __init__(self, dim: int = 64, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, n, dim = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / (dim // self.heads) ** 0.5
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, dim)


def tiny_model():
    """A ``module:factory`` source: the model and its example inputs."""
    return TinyAttention().eval(), (torch.randn(1, 128, 64),)
