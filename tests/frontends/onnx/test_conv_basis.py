"""``attnopt convert --variant conv_basis``: heads whose basis is an ALiBi bias are lowered to
``DFT`` convolutions (standard ops) that keep the dynamic length; the others stay exact, and an
``If`` falls back to exact attention when a call's content term leaves the bias-only regime."""

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

import attnopt
from attnopt.codegen.eager.conv_basis import conv_basis_attention
from attnopt.frontends.onnx.conv_basis import _dft
from attnopt.frontends.onnx.convert import convert
from attnopt.frontends.onnx.rewrite import _Emitter
from tests.fixtures.tiny_lm import TinyLM, alibi_slopes
from tests.onnx_helpers import export

HEADS, DIM = 4, 8


class AlibiSite(nn.Module):
    """One causal ALiBi attention of q, k, v given as inputs; ``content`` scales q·k."""

    def __init__(
        self, content: float, bias_input: bool = False, flat: bool = False, drift: bool = False
    ) -> None:
        super().__init__()
        self.content, self.bias_input, self.flat, self.drift = content, bias_input, flat, drift
        self.group = 1
        self.register_buffer("slopes", alibi_slopes(HEADS).view(HEADS, 1, 1))

    def forward(self, q, k, v, bias=None):
        n = q.shape[2]
        k, v = (x.repeat_interleave(self.group, 1) for x in (k, v))
        if self.flat:  # the same q and k at every position: q·k adds a constant per head
            q, k = (x.mean(2, keepdim=True).expand_as(x) for x in (q, k))
        att = (q * self.content) @ (k * self.content).transpose(-2, -1) / math.sqrt(DIM)
        pos = torch.arange(n)
        if self.bias_input:
            att = att + bias
        else:
            att = att - self.slopes * (pos[:, None] - pos[None, :]).float()
        if self.drift:  # a per-key term that vanishes at length 24 only: Toeplitz there alone
            att = att + 0.1 * pos[None, :].float() * (n - 24)
        att = att.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        return F.softmax(att, dim=-1) @ v


def _qkv(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(1, HEADS, n, DIM, generator=gen) for name in ("q", "k", "v")}


def _export(model: nn.Module, inputs: dict, path: Path, opset: int = 17) -> Path:
    dynamic = {name: {0: "batch", 2: "seq"} for name in ("q", "k", "v")}
    if "bias" in inputs:
        dynamic["bias"] = {2: "seq", 3: "seq"}
    return export(model, inputs, path, dynamo=False, opset=opset, dynamic=dynamic)


def _run(path: Path, feeds: dict, extra: tuple[str, ...] = ()) -> list[np.ndarray]:
    model = onnx.load(str(path))
    model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in extra)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})


def _guard(path: Path) -> str:
    """The condition of the lowering's ``If`` (True: the DFT branch ran)."""
    (node,) = [n for n in onnx.load(str(path)).graph.node if n.op_type == "If"]
    return node.input[0]


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("n", [7, 33, 64, 100])
def test_onnxruntime_dft_matches_numpy(n, opset):
    """onnxruntime's DFT (zero padding to the given length, complex input, the inverse)."""
    e = _Emitter(SimpleNamespace(opset=opset), "t")
    length = 1 << (2 * n - 1).bit_length()
    size = e.const(np.array(length, np.int64))
    spectrum = _dft(e, "x", size, False)
    back = _dft(e, spectrum, size, True)
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.DOUBLE, None)  # noqa: E731
    graph = helper.make_graph(e.nodes, "g", [value("x")], [value(spectrum), value(back)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(n).standard_normal((2, 3, n, 5, 2))
    got, again = sess.run(None, {"x": x})
    expected = np.fft.fft(x[..., 0] + 1j * x[..., 1], n=length, axis=2)
    np.testing.assert_allclose(got[..., 0] + 1j * got[..., 1], expected, atol=1e-9 * length)
    np.testing.assert_allclose(again[:, :, :n], x, atol=1e-12)
    assert np.abs(again[:, :, n:]).max() < 1e-12


def test_site_matches_torch_conv_basis_at_other_lengths(tmp_path):
    model = AlibiSite(content=1e-3).eval()
    path = _export(model, _qkv(24), tmp_path / "site.onnx")
    out = tmp_path / "conv.onnx"
    report = convert(path, out, variants=("conv_basis",))
    (site,) = report.sites
    assert site.status == "rewritten" and site.variant == "conv_basis", report.to_json()
    assert "conv heads [0, 1, 2, 3]" in site.config
    assert {n.op_type for n in onnx.load(str(out)).graph.node} >= {"If"}
    assert all(row["basis"] == "bias" and row["k"] == 1 for row in site.trials[0].heads)
    scale = 1e-6 / math.sqrt(DIM)
    for n in (17, 51):  # neither the calibration length nor a power of two
        feeds = _qkv(n, seed=n)
        got, ran = _run(out, feeds, (_guard(out),))
        assert bool(ran)  # the DFT branch
        mask = _export_bias(n)
        fast, ks = conv_basis_attention(
            *feeds.values(), mask, scale=scale, tau=0.02, k_max=16, bias_heads=torch.ones(4)
        )
        assert ks.eq(1).all()
        np.testing.assert_allclose(got, fast.numpy(), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            exact = model(**feeds).numpy()
        np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-5)


def _export_bias(n: int) -> torch.Tensor:
    pos = torch.arange(n)
    return (-alibi_slopes(HEADS).view(1, HEADS, 1, 1) * (pos[:, None] - pos[None, :])).float()


def test_content_outside_calibration_falls_back_to_exact(tmp_path):
    model = AlibiSite(content=1e-3).eval()
    path = _export(model, _qkv(24), tmp_path / "site.onnx")
    out = tmp_path / "conv.onnx"
    convert(path, out, variants=("conv_basis",))
    feeds = {k: v * (1e4 if k in "qk" else 1) for k, v in _qkv(19).items()}
    got, ran = _run(out, feeds, (_guard(out),))
    assert not bool(ran)  # q·k is no longer negligible: the exact branch
    with torch.no_grad():
        np.testing.assert_allclose(got, model(**feeds).numpy(), rtol=1e-4, atol=1e-5)


def _mixed_lm() -> TinyLM:
    """An ALiBi LM whose heads 0 and 1 are bias-only (q, k weights near 0), 2 and 3 not."""
    torch.manual_seed(0)
    model = TinyLM(alibi=True, layers=1).eval()
    with torch.no_grad():
        qkv = model.blocks[0].qkv
        for head in (0, 1):
            for part in (0, 64):
                rows = slice(part + 16 * head, part + 16 * (head + 1))
                qkv.weight[rows] *= 1e-3
                qkv.bias[rows] = 0
    return model


def test_mixed_site_in_onnx_keeps_the_dynamic_length(tmp_path):
    model = _mixed_lm()
    tokens = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(1))
    dynamic = {"tokens": {0: "batch", 1: "seq"}}
    path = export(
        model, {"tokens": tokens}, tmp_path / "lm.onnx", dynamo=False, opset=17, dynamic=dynamic
    )
    out = tmp_path / "conv.onnx"
    report = convert(path, out, variants=("conv_basis", "exact"))
    (site,) = report.sites
    assert site.variant == "conv_basis" and "conv heads [0, 1]" in site.config, report.to_json()
    assert "exact heads [2, 3]" in site.config
    assert [r["variant"] for r in site.trials[0].heads] == ["conv_basis"] * 2 + ["exact"] * 2
    torch_opt = attnopt.optimize(model, (tokens,), variants=("conv_basis", "exact"))
    for n in (29, 64):
        batch = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(n))
        (got,) = _run(out, {"tokens": batch})
        with torch.no_grad():
            np.testing.assert_allclose(got, torch_opt(batch).numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(got, model(batch).numpy(), rtol=1e-4, atol=1e-4)


def test_content_heads_are_refused_and_stay_exact(tmp_path):
    model = AlibiSite(content=1.0).eval()  # q·k of random inputs: no head is bias-only
    path = _export(model, _qkv(24), tmp_path / "site.onnx")
    report = convert(path, tmp_path / "out.onnx", variants=("conv_basis", "exact"))
    (site,) = report.sites
    assert site.variant == "exact" and site.status == "rewritten"
    first = site.trials[0]
    assert first.variant == "conv_basis"
    assert first.decision.startswith(("rejected: no head qualifies", "no ONNX form: no head"))


def test_bias_read_from_an_input_is_refused(tmp_path):
    model = AlibiSite(content=1e-3, bias_input=True).eval()
    inputs = {**_qkv(24), "bias": _export_bias(24)}
    path = _export(model, inputs, tmp_path / "site.onnx")
    report = convert(path, tmp_path / "out.onnx", variants=("conv_basis", "exact"))
    (site,) = report.sites
    decisions = [t.decision for t in site.trials]
    assert any("computed from input 'bias'" in d for d in decisions), decisions
    assert site.variant == "exact"


def test_old_opset_is_refused(tmp_path):
    path = _export(AlibiSite(content=1e-3).eval(), _qkv(24), tmp_path / "site.onnx", opset=14)
    report = convert(path, tmp_path / "out.onnx", variants=("conv_basis",))
    (site,) = report.sites
    assert site.status == "skipped" and "DFT (opset >= 17)" in site.reason, site.reason


def test_measured_heads_stay_exact_in_onnx_with_the_reason(tmp_path):
    """q·k is large but shift-invariant: torch finds k = 1 by search, a per-call measurement
    that has no ONNX form, so the site stays exact there."""
    path = _export(AlibiSite(content=1.0, flat=True).eval(), _qkv(24), tmp_path / "site.onnx")
    report = convert(path, tmp_path / "out.onnx", variants=("conv_basis", "exact"))
    (site,) = report.sites
    first = site.trials[0]
    assert first.decision.startswith("no ONNX form: no head has a bias-derived basis")
    assert "data-dependent control flow" in first.decision
    assert all(row["basis"] == "measured" and row["k"] == 1 for row in first.heads)
    assert all(row["onnx"].startswith("exact: measured basis") for row in first.heads)
    assert site.variant == "exact" and site.status == "rewritten"


def test_model_budget_backs_the_site_off_to_exact(tmp_path):
    tokens = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    dynamic = {"tokens": {0: "batch", 1: "seq"}}
    path = export(
        _mixed_lm(),
        {"tokens": tokens},
        tmp_path / "lm.onnx",
        dynamo=False,
        opset=17,
        dynamic=dynamic,
    )
    budget = {"rel_l1": 0.05, "model_rel_l1": 1e-12}
    report = convert(
        path, tmp_path / "out.onnx", variants=("conv_basis", "exact"), tolerance=budget
    )
    (site,) = report.sites
    assert site.trials[0].decision.startswith("backed off: model rel_l1")
    assert site.trials[-1].decision.startswith("kept after backing off")
    assert site.variant == "exact"


def test_bias_that_is_toeplitz_only_at_the_calibration_length_falls_back(tmp_path):
    model = AlibiSite(content=1e-3, drift=True).eval()
    path = _export(model, _qkv(24), tmp_path / "site.onnx")
    out = tmp_path / "conv.onnx"
    report = convert(path, out, variants=("conv_basis",), dims={"batch": 1, "seq": 24})
    assert report.sites[0].variant == "conv_basis", report.to_json()
    for n, lowered in ((24, True), (31, False)):
        feeds = _qkv(n, seed=n)
        got, ran = _run(out, feeds, (_guard(out),))
        assert bool(ran) == lowered  # first column ≠ last row reversed at 31: exact
        with torch.no_grad():
            np.testing.assert_allclose(got, model(**feeds).numpy(), rtol=1e-4, atol=1e-5)


def test_grouped_kv_heads(tmp_path):
    model = AlibiSite(content=1e-3).eval()
    model.group = 2
    inputs = {name: x[:, : HEADS // 2] if name in "kv" else x for name, x in _qkv(24).items()}
    path = _export(model, inputs, tmp_path / "site.onnx")
    out = tmp_path / "conv.onnx"
    report = convert(path, out, variants=("conv_basis",))
    assert "conv heads [0, 1, 2, 3]" in report.sites[0].config, report.to_json()
    feeds = {name: x[:, : HEADS // 2] if name in "kv" else x for name, x in _qkv(19, 3).items()}
    got, ran = _run(out, feeds, (_guard(out),))
    assert bool(ran)
    with torch.no_grad():
        np.testing.assert_allclose(got, model(**feeds).numpy(), rtol=1e-4, atol=1e-5)
