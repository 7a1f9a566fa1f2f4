"""``torch.compile(model, backend="attnopt")``: the sites of every graph Dynamo hands over are
rewritten (counted per graph), outputs match, graph breaks and recompiles are covered, and
gradients flow through the rewritten graphs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from attnopt.codegen.signature import KernelSignature
from attnopt.report import GraphReport, Report
from tests import tiny_hf
from tests.forms import FORMS

SAMPLE = [
    "matmul_op_mul_scale",
    "mT_transpose",
    "einsum_bshd",
    "baddbmm_additive_mask",
    "bool_mask_masked_fill",
    "causal_tril_eq0",
    "sliding_window_band",
    "softmax_fp32_casts",
    "gqa_repeat_kv_expand",
    "cross_attention",
    "sdpa_gqa",
    "two_layers",
    "guard_returns_attention_weights",
    "guard_softmax_over_query_axis",
]
BY_NAME = {f.name: f for f in FORMS}


def compiled(model: nn.Module, inner: str = "aot_eager") -> tuple[nn.Module, Report]:
    report = Report(model=type(model).__name__, capture="dynamo", dynamic=True)
    options = {"attnopt_inner": inner, "attnopt_report": report}
    return torch.compile(model, backend="attnopt", options=options), report


@pytest.mark.parametrize("name", SAMPLE)
def test_forms_through_torch_compile(name: str) -> None:
    form = BY_NAME[name]
    model = form.make()
    inputs = form.inputs()
    fast, report = compiled(model)
    with torch.no_grad():
        got, expected = fast(*inputs), model(*inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert len(report.graphs) == 1
    assert len(report.graphs[0].sites) == form.sites == len(report.rewritten), report.to_json()
    if form.sites == 0:
        assert report.near_misses


class TwoLayersWithBreak(nn.Module):
    """Two attention layers with a graph break between them."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = (BY_NAME["matmul_op_mul_scale"].make() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        torch._dynamo.graph_break()
        return self.second(x)


def test_graph_breaks_and_recompiles_each_get_their_sites() -> None:
    model = TwoLayersWithBreak().eval()
    fast, report = compiled(model, inner="eager")
    for length in (12, 7):  # the second length recompiles both pieces
        x = torch.randn(2, length, 32)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)
    assert len(report.graphs) == 4
    assert [len(g.sites) for g in report.graphs] == [1, 1, 1, 1]
    assert all(g.kind == "prefill" for g in report.graphs)


def test_inductor_inner_backend() -> None:
    form = BY_NAME["causal_tril_eq0"]
    model, inputs = form.make(), form.inputs()
    fast, report = compiled(model, inner="inductor")
    with torch.no_grad():
        torch.testing.assert_close(fast(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)
    assert len(report.rewritten) == 1


def test_unknown_inner_backend_is_named() -> None:
    form = BY_NAME["matmul_op_mul_scale"]
    fast, _ = compiled(form.make(), inner="tvm")
    with pytest.raises(Exception, match="attnopt_inner='tvm'"):
        fast(*form.inputs())


transformers = pytest.importorskip("transformers")


def small_llama() -> nn.Module:
    return tiny_hf.model("llama", hidden=32, vocab=64, positions=32, num_key_value_heads=2)


def test_hf_model_forward_with_cache_output() -> None:
    model = small_llama().eval()
    ids = torch.randint(0, 64, (2, 9))
    fast, report = compiled(model, inner="eager")
    with torch.no_grad():
        got, expected = fast(ids), model(ids)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5)
    assert [(g.kind, len(g.sites)) for g in report.graphs] == [("prefill", 2)]


def test_training_step_gradients_flow() -> None:
    model = small_llama().train()
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 9))
    fast, report = compiled(model)
    loss = fast(ids, labels=ids, use_cache=False).loss
    loss.backward()
    twin(ids, labels=ids, use_cache=False).loss.backward()
    assert len(report.rewritten) == 2
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.step()
    assert fast(ids, labels=ids, use_cache=False).loss < loss


def test_graph_kind_from_site_signatures() -> None:
    def sig(n: int, m: int) -> KernelSignature:
        return KernelSignature(head_dim=8, dtype="float32", n=n, m=m)

    assert GraphReport.kind_of([sig(1, 40), sig(1, 40)]) == "decode"
    assert GraphReport.kind_of([sig(1, 1), sig(1, 12)]) == "decode"  # first step, cross-attn
    assert GraphReport.kind_of([sig(12, 12)]) == "prefill"
    assert GraphReport.kind_of([sig(64, 128)]) == "prefill"  # a chunk of a long prompt
    assert GraphReport.kind_of([]) == "other"


class _CacheJoin(nn.Module):
    """Keys and values joined after a buffer the call writes in place: module state, but not
    input-independent (a cache), so no prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("past", torch.zeros(2, 4, 3, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.past.add_(1.0)
        k = torch.cat([self.past, x], dim=2)
        return torch.softmax(x @ k.transpose(-2, -1) * 0.35, dim=-1) @ k


@pytest.mark.parametrize("buffer", [False, True])
def test_a_prefix_of_module_state_is_found_and_replaced(buffer) -> None:
    """Dynamo passes parameters and buffers to its graph as inputs; reached through the module
    and never written, they are a prefix (prefix_ntk applies), unlike a cache the call writes."""
    from tests.prefix_forms import PrefixAttention, inputs

    model = PrefixAttention(prefix=32, buffer=buffer).eval()
    report = Report(model="prefix", capture="dynamo", dynamic=True)
    options = {"attnopt_inner": "eager", "attnopt_report": report}
    options["attnopt_variants"] = ("prefix_ntk",)
    fn = torch.compile(model, backend="attnopt", options=options)
    with torch.no_grad():
        fn(*inputs(2, 16))  # fits Z, z
        out, ref = fn(*inputs(2, 16, seed=5)), model(*inputs(2, 16, seed=5))
    (site,) = report.sites
    assert "prefix=32" in site.signature and site.variant == "prefix_ntk"
    assert 0 < float((out - ref).abs().mean() / ref.abs().mean()) < 0.5

    report = Report(model="cache", capture="dynamo", dynamic=True)
    options = {"attnopt_inner": "eager", "attnopt_report": report}
    with torch.no_grad():
        torch.compile(_CacheJoin(), backend="attnopt", options=options)(torch.randn(2, 4, 5, 8))
    (site,) = report.sites
    assert "prefix" not in site.signature and site.status == "rewritten"


def test_approximate_variants_need_the_eager_inner_backend() -> None:
    from tests.prefix_forms import PrefixAttention, inputs

    options = {"attnopt_inner": "aot_eager", "attnopt_variants": ("prefix_ntk",)}
    fn = torch.compile(PrefixAttention(prefix=8).eval(), backend="attnopt", options=options)
    with pytest.raises(Exception, match="only the eager inner backend"):
        fn(*inputs(2, 4))
