"""Real models from ``transformers`` (small configs, random weights, eager attention): every
attention site is rewritten and the outputs match the original to 1e-5 in fp32."""

from __future__ import annotations

import pytest
import torch

import attnopt
from tests import tiny_hf

transformers = pytest.importorskip("transformers")

SEQ, BATCH, VOCAB = 16, 2, 128


def _ids(batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq))


def _padded(b, s):
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, -3:] = 0
    return {"input_ids": _ids(b, s), "attention_mask": mask}


def _lm(b, s):
    return {"input_ids": _ids(b, s)}


def _seq2seq(b, s):
    return {"input_ids": _ids(b, s), "decoder_input_ids": _ids(b, s // 2)}


def gpt2(attn: str = "eager"):
    model = tiny_hf.model(
        "gpt2", vocab=VOCAB, attn=attn, bos_token_id=0, eos_token_id=0, use_cache=False
    )
    return model, _lm, 2


def bert(attn: str = "eager"):
    return tiny_hf.model("bert", vocab=VOCAB, attn=attn), _padded, 2


def llama_gqa(attn: str = "eager"):
    model = tiny_hf.model("llama", vocab=VOCAB, attn=attn, num_key_value_heads=2, use_cache=False)
    return model, _lm, 2


def t5():
    model = tiny_hf.model("t5", vocab=VOCAB, use_cache=False, decoder_start_token_id=0)
    return model, _seq2seq, 6


def vit():
    model = tiny_hf.model("vit", image_size=32, patch_size=8)
    return model, lambda b, s: {"pixel_values": torch.randn(b, 3, 32, 32)}, 2


def distilbert():
    """(mask == 0).view(b, 1, 1, m).expand_as(scores), then masked_fill with finfo.min."""
    return tiny_hf.model("distilbert", vocab=VOCAB), _padded, 2


def mbart():
    """Encoder self, decoder causal self and cross attention."""
    return tiny_hf.model("mbart", layers=1, vocab=VOCAB, use_cache=False), _seq2seq, 3


def falcon_alibi():
    """MQA through matmul broadcasting, ALiBi added before an in-place scale, probabilities
    viewed back to (b, h, n, m) before P·V."""
    knobs = dict(alibi=True, multi_query=True, new_decoder_architecture=False, use_cache=False)
    return tiny_hf.model("falcon", vocab=VOCAB, **knobs), _lm, 2


def bloom():
    """baddbmm(alibi, q, kᵀ pre-transposed) in (b·h, n, m), viewed 4-D for the mask, fp32
    softmax cast back, probabilities viewed back to 3-D for the bmm with V."""
    return tiny_hf.model("bloom", vocab=VOCAB, use_cache=False), _padded, 2


def gpt_neo():
    """Global and local (window 8) layers; the causal mask applied by torch.where with a tensor
    fill value (a lifted constant), q and k upcast to fp32, no scale."""
    model = tiny_hf.model(
        "gpt_neo",
        vocab=VOCAB,
        attention_types=[[["global", "local"], 1]],
        window_size=8,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
    )
    return model, _padded, 2


# Swin (5-D shifted-window view of the scores) is covered by the forms catalogue: its
# transformers model takes minutes to export with dynamic image sizes on two CPU cores.
MODELS = {
    "gpt2": gpt2,
    "bert": bert,
    "llama_gqa": llama_gqa,
    "t5": t5,
    "vit": vit,
    "distilbert": distilbert,
    "mbart": mbart,
    "falcon_alibi": falcon_alibi,
    "bloom": bloom,
    "gpt_neo": gpt_neo,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_sites_rewritten_and_equivalent(name: str) -> None:
    model, make_inputs, expected_sites = MODELS[name]()
    model.eval()
    example = make_inputs(BATCH, SEQ)
    optimized = attnopt.optimize(model, example)
    report = optimized.attnopt_report
    generates = model.can_generate()  # those go through Dynamo, to keep generate()
    assert report.capture == ("dynamo" if generates else "torch.export"), report.to_json()
    assert len(report.sites) == expected_sites, report.to_json()
    assert len(report.rewritten) == expected_sites, report.to_json()
    for inputs in (example, make_inputs(BATCH + 1, SEQ + 6)):  # other batch and length too
        with torch.no_grad():
            expected, got = model(**inputs), optimized(**inputs)
        assert type(got) is type(expected)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-5)
