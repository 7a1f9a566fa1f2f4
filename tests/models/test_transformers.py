"""Real models from ``transformers`` (small configs, random weights, eager attention): every
attention site is rewritten and the outputs match the original to 1e-5 in fp32."""

from __future__ import annotations

import pytest
import torch

import attnopt

transformers = pytest.importorskip("transformers")

SEQ, BATCH, VOCAB = 16, 2, 128


def _ids(batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq))


def gpt2(attn: str = "eager"):
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
        attn_implementation=attn,
    )
    return transformers.GPT2LMHeadModel(config), lambda b, s: {"input_ids": _ids(b, s)}, 2


def bert(attn: str = "eager"):
    config = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        attn_implementation=attn,
    )

    def inputs(b, s):
        mask = torch.ones(b, s, dtype=torch.long)
        mask[0, -3:] = 0
        return {"input_ids": _ids(b, s), "attention_mask": mask}

    return transformers.BertModel(config), inputs, 2


def llama_gqa(attn: str = "eager"):
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        use_cache=False,
        attn_implementation=attn,
    )
    return transformers.LlamaForCausalLM(config), lambda b, s: {"input_ids": _ids(b, s)}, 2


def t5():
    config = transformers.T5Config(
        num_layers=2,
        num_decoder_layers=2,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_heads=4,
        vocab_size=VOCAB,
        use_cache=False,
        decoder_start_token_id=0,
        attn_implementation="eager",
    )
    return (
        transformers.T5Model(config),
        lambda b, s: {"input_ids": _ids(b, s), "decoder_input_ids": _ids(b, s // 2)},
        6,
    )


def vit():
    config = transformers.ViTConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        attn_implementation="eager",
    )
    return (
        transformers.ViTModel(config),
        lambda b, s: {"pixel_values": torch.randn(b, 3, 32, 32)},
        2,
    )


def _padded(b, s):
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, -3:] = 0
    return {"input_ids": _ids(b, s), "attention_mask": mask}


def distilbert():
    """(mask == 0).view(b, 1, 1, m).expand_as(scores), then masked_fill with finfo.min."""
    config = transformers.DistilBertConfig(
        n_layers=2,
        dim=64,
        n_heads=4,
        hidden_dim=128,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return transformers.DistilBertModel(config), _padded, 2


def mbart():
    """Encoder self, decoder causal self and cross attention."""
    config = transformers.MBartConfig(
        vocab_size=VOCAB,
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=64,
        use_cache=False,
        attn_implementation="eager",
    )
    return (
        transformers.MBartModel(config),
        lambda b, s: {"input_ids": _ids(b, s), "decoder_input_ids": _ids(b, s // 2)},
        3,
    )


def falcon_alibi():
    """MQA through matmul broadcasting, ALiBi added before an in-place scale, probabilities
    viewed back to (b, h, n, m) before P·V."""
    config = transformers.FalconConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        alibi=True,
        multi_query=True,
        new_decoder_architecture=False,
        use_cache=False,
        attn_implementation="eager",
    )
    return transformers.FalconModel(config), lambda b, s: {"input_ids": _ids(b, s)}, 2


def bloom():
    """baddbmm(alibi, q, kᵀ pre-transposed) in (b·h, n, m), viewed 4-D for the mask, fp32
    softmax cast back, probabilities viewed back to 3-D for the bmm with V."""
    config = transformers.BloomConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        n_layer=2,
        n_head=4,
        use_cache=False,
        attn_implementation="eager",
    )
    return transformers.BloomModel(config), _padded, 2


def gpt_neo():
    """Global and local (window 8) layers; the causal mask applied by torch.where with a tensor
    fill value (a lifted constant), q and k upcast to fp32, no scale."""
    config = transformers.GPTNeoConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        window_size=8,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
        attn_implementation="eager",
    )
    return transformers.GPTNeoModel(config), _padded, 2


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
