"""optimize()/inspect() as a user meets them: a drop-in module, clear errors, honest reports."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn as nn

import attnopt
from attnopt.errors import CaptureError, InputSignatureError, ShapeError, UnsupportedOutputError
from tests.forms import FORMS, B, C, N

CAUSAL = next(f for f in FORMS if f.name == "causal_buffer_slice_nanogpt")


def _optimized(form=CAUSAL):
    model = form.make()
    return model, attnopt.optimize(model, form.inputs())


def test_serves_other_batch_sizes_and_lengths() -> None:
    model, optimized = _optimized()
    assert optimized.attnopt_report.dynamic
    for batch, seq in ((1 + B, N + 5), (B, 3), (5, 17)):
        x = torch.randn(batch, seq, C)
        with torch.no_grad():
            torch.testing.assert_close(optimized(x), model(x), atol=1e-5, rtol=1e-5)


def test_keyword_inputs_like_hugging_face() -> None:
    model = CAUSAL.make()
    (x,) = CAUSAL.inputs()
    optimized = attnopt.optimize(model, {"x": x})
    assert len(optimized.attnopt_report.rewritten) == 1
    x = torch.randn(B + 1, N + 2, C)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x=x), model(x), atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip_with_original_keys() -> None:
    model, optimized = _optimized()
    assert set(optimized.state_dict()) == set(model.state_dict())
    buffer = io.BytesIO()
    torch.save(optimized.state_dict(), buffer)
    fresh_model, fresh = _optimized()
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    x = torch.randn(B, N, C)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=1e-5, rtol=1e-5)


def test_exports_again_and_compiles() -> None:
    model, optimized = _optimized()
    x = torch.randn(B, N, C)
    exported = torch.export.export(optimized, (x,), strict=False)
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "attnopt.attention.default" in ops
    compiled = torch.compile(optimized, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(exported.module()(x), model(x), atol=1e-5, rtol=1e-5)


def test_follows_half_and_gradients_flow() -> None:
    model, optimized = _optimized()
    x = torch.randn(B, N, C, requires_grad=True)
    optimized(x).sum().backward()
    grads = {k: p.grad for k, p in optimized.named_parameters()}
    assert all(g is not None for g in grads.values())
    half = optimized.half()
    out = half(torch.randn(B, N, C).half())
    assert out.dtype == torch.float16


def test_report_lists_sites_and_serialises() -> None:
    _, optimized = _optimized()
    report = optimized.attnopt_report
    data = json.loads(report.to_json())
    assert data["capture"] == "torch.export"
    site = data["sites"][0]
    assert site["status"] == "rewritten" and site["mask"] == "causal" and site["variant"] == "exact"
    assert site["max_error"] < 1e-5
    assert site["location"]
    report.print()


def test_inspect_detects_without_rewriting() -> None:
    guard = next(f for f in FORMS if f.name == "guard_returns_attention_weights")
    report = attnopt.inspect(guard.make(), guard.inputs())
    assert report.sites == [] and "returned" in report.near_misses[0].rule
    report = attnopt.inspect(CAUSAL.make(), CAUSAL.inputs())
    assert len(report.sites) == 1 and report.sites[0].status == "detected"


def test_no_attention_model_returned_working() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    x = torch.randn(3, 8)
    optimized = attnopt.optimize(model, (x,))
    assert optimized.attnopt_report.sites == []
    torch.testing.assert_close(optimized(x), model(x))


def test_site_outside_tolerance_is_restored() -> None:
    model = CAUSAL.make()
    optimized = attnopt.optimize(model, CAUSAL.inputs(), tolerance=-1.0)
    site = optimized.attnopt_report.sites[0]
    assert site.status == "restored" and "tolerance" in site.reason
    x = torch.randn(B, N, C)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model(x))


def test_mismatched_inputs_raise_a_clear_error() -> None:
    fused = next(f for f in FORMS if f.name == "fused_qkv_split")
    with pytest.raises(InputSignatureError, match="forward"):
        attnopt.optimize(fused.make(), (torch.randn(B, N, C), torch.randn(1)))
    with pytest.raises(InputSignatureError, match="forward"):
        attnopt.optimize(fused.make(), {"hidden": torch.randn(B, N, C)})
    with pytest.raises(InputSignatureError, match="tuple"):
        attnopt.optimize(CAUSAL.make(), 3)


class ReturnsString(nn.Module):
    def forward(self, x):
        return x * 2, "done"


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x.softmax(-1)
        return x


def test_non_tensor_output_goes_through_dynamo_or_raises_under_export() -> None:
    x = torch.randn(2, 3)
    optimized = attnopt.optimize(ReturnsString(), (x,), inner="eager")
    assert optimized.attnopt_report.capture == "dynamo"
    assert "returns a str" in optimized.attnopt_report.notes[0]
    got = optimized(x)
    assert got[1] == "done"
    torch.testing.assert_close(got[0], x * 2)
    with pytest.raises(UnsupportedOutputError, match="str"):
        attnopt.optimize(ReturnsString(), (x,), capture="export")


def test_uncapturable_model_names_the_failure() -> None:
    with pytest.raises(CaptureError) as info:
        attnopt.optimize(DataDependent(), (torch.randn(2, 3),))
    message = str(info.value)
    assert "torch.export" in message and "symbolic_trace" in message


class FixedBatch(nn.Module):
    """Hard-codes the batch size: export keeps it static."""

    def __init__(self):
        super().__init__()
        self.inner = CAUSAL.make()

    def forward(self, x):
        return self.inner(x.view(2, -1, C))


def test_static_capture_says_so_and_rejects_other_shapes() -> None:
    model = FixedBatch().eval()
    optimized = attnopt.optimize(model, (torch.randn(2, N, C),))
    report = optimized.attnopt_report
    assert len(report.rewritten) == 1
    with torch.no_grad():
        optimized(torch.randn(2, N + 3, C))  # the sequence dim is still dynamic
    assert report.dynamic_dims == {"x": [1]}
    assert any("x[0]" in note for note in report.notes)
    with pytest.raises(ShapeError, match="x.size"):
        optimized(torch.randn(3, N, C))
