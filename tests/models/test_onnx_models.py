"""Real models from ``transformers`` exported to ONNX by both torch exporters: every attention
site is rewritten into a fused onnxruntime op and the outputs match the original (fp32, 1e-5)
at the export's sizes and at a larger batch and length."""

from __future__ import annotations

import pytest
import torch

from attnopt.errors import OnnxModelError
from tests.models.test_transformers import BATCH, MODELS, SEQ, bert, gpt2, llama_gqa
from tests.onnx_helpers import check_conversion, export

pytest.importorskip("transformers")
pytest.importorskip("onnxscript")

DYNAMIC = {
    "input_ids": {0: "batch", 1: "seq"},
    "attention_mask": {0: "batch", 1: "seq"},
    "decoder_input_ids": {0: "batch", 1: "dec_seq"},
    "pixel_values": {0: "batch"},
}
#: The TorchScript exporter cannot export transformers' packed-sequence check (``aten::diff``),
#: which runs only when no attention mask is given.
NEEDS_MASK = {"gpt2", "llama_gqa", "falcon_alibi"}
#: Exports onnxruntime itself cannot load (Falcon's ALiBi slopes: the dynamo exporter writes a
#: ``Mul`` onnxruntime's CPU provider has no kernel for, the TorchScript one a complex128 ``Mul``):
#: nothing for attnopt to convert; the test checks the error names it.
ORT_CANNOT_LOAD = {("falcon_alibi", "dynamo"), ("falcon_alibi", "torchscript")}


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name", list(MODELS))
def test_model_converted_and_equivalent(name: str, exporter: str, tmp_path) -> None:
    model, make_inputs, sites = MODELS[name]()
    inputs = make_inputs(BATCH, SEQ)
    if exporter == "torchscript" and name in NEEDS_MASK:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    path = tmp_path / f"{name}.onnx"
    dynamic = {k: DYNAMIC[k] for k in inputs}
    export(model.eval(), inputs, path, dynamo=exporter == "dynamo", opset=18, dynamic=dynamic)
    dims = {"batch": BATCH, "seq": SEQ, "dec_seq": SEQ // 2}
    dims = {k: v for k, v in dims.items() if any(k in d.values() for d in dynamic.values())}
    if (name, exporter) in ORT_CANNOT_LOAD:
        with pytest.raises(OnnxModelError, match="onnxruntime cannot load the original model"):
            check_conversion(path, dims, sites)
        pytest.skip(f"onnxruntime cannot load the {exporter} exporter's {name} model")
    report = check_conversion(path, dims, sites)
    kernels = {s.kernel for s in report.sites}
    expected = "GroupQueryAttention" if name == "llama_gqa" else "MultiHeadAttention"
    assert kernels == {f"com.microsoft.{expected}"}, report.to_json()


@pytest.mark.parametrize("builder", [gpt2, bert, llama_gqa], ids=lambda b: b.__name__)
def test_sdpa_attention_torchscript_export_fused(builder, tmp_path) -> None:
    """Hugging Face's ``sdpa`` attention: the TorchScript exporter writes
    ``scaled_dot_product_attention`` as its own decomposition (q and k each scaled by
    √scale, a causal mask built in the graph), which is found and fused like the eager form."""
    model, make_inputs, sites = builder("sdpa")
    assert model.config._attn_implementation == "sdpa"
    inputs = make_inputs(BATCH, SEQ)
    inputs.setdefault("attention_mask", torch.ones_like(inputs["input_ids"]))
    path = tmp_path / f"{builder.__name__}.onnx"
    dynamic = {k: DYNAMIC[k] for k in inputs}
    export(model.eval(), inputs, path, dynamo=False, opset=18, dynamic=dynamic)
    report = check_conversion(path, {"batch": BATCH, "seq": SEQ}, sites)
    assert all(s.kernel.startswith("com.microsoft.") for s in report.sites), report.to_json()
