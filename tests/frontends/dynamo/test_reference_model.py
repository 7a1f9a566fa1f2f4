"""A model written like Meta's reference Llama: cache buffers written in place at ``start_pos``,
``forward(tokens, start_pos)``, driven by a hand-written decoding loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt.codegen.registry import Kernel, register_kernel, unregister_kernel
from attnopt.errors import AttnoptError, InputSignatureError

DIM, HEADS, KV_HEADS, LAYERS, VOCAB, MAX_SEQ, MAX_BATCH = 32, 4, 2, 2, 64, 32, 2
HEAD_DIM = DIM // HEADS


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wq = nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
        self.wk = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.wv = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.wo = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)
        shape = (MAX_BATCH, MAX_SEQ, KV_HEADS, HEAD_DIM)
        self.register_buffer("cache_k", torch.zeros(shape), persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape), persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int, mask: torch.Tensor | None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, HEADS, HEAD_DIM)
        xk = self.wk(x).view(bsz, seqlen, KV_HEADS, HEAD_DIM)
        xv = self.wv(x).view(bsz, seqlen, KV_HEADS, HEAD_DIM)
        self.cache_k[:bsz, start_pos : start_pos + seqlen] = xk
        self.cache_v[:bsz, start_pos : start_pos + seqlen] = xv
        keys = self.cache_k[:bsz, : start_pos + seqlen]
        values = self.cache_v[:bsz, : start_pos + seqlen]
        rep = HEADS // KV_HEADS
        keys = keys.repeat_interleave(rep, dim=2)
        values = values.repeat_interleave(rep, dim=2)
        xq, keys, values = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(HEAD_DIM)
        if mask is not None:
            scores = scores + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        output = torch.matmul(scores, values)
        return self.wo(output.transpose(1, 2).contiguous().view(bsz, seqlen, -1))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = Attention()
        self.norm = nn.LayerNorm(DIM)
        self.ffn = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.SiLU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x, start_pos, mask):
        h = x + self.attention(self.norm(x), start_pos, mask)
        return h + self.ffn(self.norm(h))


class Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Embedding(MAX_SEQ, DIM)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        _, seqlen = tokens.shape
        positions = torch.arange(start_pos, start_pos + seqlen, device=tokens.device)
        h = self.tok_embeddings(tokens) + self.pos(positions)
        mask = None
        if seqlen > 1:
            mask = torch.full((seqlen, seqlen), float("-inf"), device=tokens.device)
            mask = torch.triu(mask, diagonal=1)
            mask = torch.hstack([torch.zeros((seqlen, start_pos), device=tokens.device), mask])
        for layer in self.layers:
            h = layer(h, start_pos, mask)
        return self.output(h).float()


def greedy(model: nn.Module, prompt: torch.Tensor, new: int) -> torch.Tensor:
    tokens, start = prompt, 0
    out = []
    for _ in range(new):
        logits = model(tokens, start)
        start += tokens.shape[1]
        tokens = logits[:, -1].argmax(-1, keepdim=True)
        out.append(tokens)
    return torch.cat(out, dim=1)


def test_reference_style_loop_same_tokens_op_every_step(op_calls) -> None:
    model = Transformer().eval()
    prompt = torch.randint(0, VOCAB, (2, 5))
    expected = greedy(model, prompt, 8)
    optimized = attnopt.optimize(model, (prompt, 0))
    report = optimized.attnopt_report
    assert type(optimized) is Transformer and report.capture == "dynamo"
    assert "'start_pos' is a Python number" in report.notes[0]
    op_calls.clear()
    got = greedy(optimized, prompt, 8)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert op_calls[:LAYERS] == [(5, 5)] * LAYERS
    decode = op_calls[LAYERS:]
    assert decode == [(1, m) for m in range(6, 13) for _ in range(LAYERS)]
    assert report.graphs_of("decode") and report.graphs_of("prefill")
    # the two models keep separate caches, and share their weights
    assert optimized.layers[0].attention.cache_k is not model.layers[0].attention.cache_k
    assert optimized.output.weight is model.output.weight


class PastTuple(nn.Module):
    """Attention that takes and returns its past keys/values as a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(DIM, DIM) for _ in range(3))

    def forward(self, x: torch.Tensor, past: tuple | None = None):
        q, k, v = self.q(x), self.k(x), self.v(x)
        if past is not None:
            k, v = torch.cat([past[0], k], 1), torch.cat([past[1], v], 1)
        weights = (q @ k.transpose(-1, -2) / math.sqrt(DIM)).softmax(-1)
        return weights @ v, (k, v)


def test_tuple_of_past_keys_values(op_calls) -> None:
    model = PastTuple().eval()
    prompt, steps = torch.randn(2, 5, DIM), [torch.randn(2, 1, DIM) for _ in range(3)]
    exported = attnopt.optimize(model, (prompt,))
    _, past = exported(prompt)
    with pytest.raises(InputSignatureError, match="capture='dynamo'"):
        exported(steps[0], past)
    optimized = attnopt.optimize(model, (prompt,), capture="dynamo")
    op_calls.clear()
    with torch.no_grad():
        (got, past), (expected, ref_past) = optimized(prompt), model(prompt)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        for x in steps:
            (out, past), (ref, ref_past) = optimized(x, past), model(x, ref_past)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert op_calls == [(5, 5), (1, 6), (1, 7), (1, 8)]


def test_a_wrong_kernel_is_caught_and_the_original_ops_run() -> None:
    model = PastTuple().eval()
    prompt = torch.randn(2, 5, DIM)
    zeros = lambda q, k, v, *args, **flags: (torch.zeros_like(q), None)  # noqa: E731
    register_kernel(Kernel("exact", "cpu", "wrong", forward=zeros, priority=10**6))
    try:
        optimized = attnopt.optimize(model, (prompt,), capture="dynamo")
        report = optimized.attnopt_report
        assert [s.status for s in report.sites] == ["restored"], report.to_json()
        with torch.no_grad():
            torch.testing.assert_close(optimized(prompt)[0], model(prompt)[0])
    finally:
        unregister_kernel("exact", "cpu", "wrong")


def test_bad_capture_or_inner_is_named() -> None:
    with pytest.raises(AttnoptError, match="capture='trace'"):
        attnopt.optimize(PastTuple(), (torch.randn(1, 2, DIM),), capture="trace")
    with pytest.raises(AttnoptError, match="inner='tvm'"):
        attnopt.optimize(PastTuple(), (torch.randn(1, 2, DIM),), inner="tvm")
