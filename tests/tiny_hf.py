"""Tiny Hugging Face models for the tests: one table of architectures and one builder, so a test
says only the sizes and settings it varies (random weights; the caller seeds). ``transformers``
is imported on first use, so the tests that ``importorskip`` it still skip without it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import transformers
    from torch import nn

Names = tuple[str, ...]


@dataclass(frozen=True)
class Arch:
    """An architecture's config and model classes and its config's names for each generic knob
    (an encoder-decoder names both stacks); a knob it does not name keeps the config's default."""

    config: str
    model: str
    layers: Names
    hidden: Names
    heads: Names
    ffn: Names = ()
    positions: Names = ()
    vocab: Names = ("vocab_size",)
    head_dim: Names = ()  # set to hidden // heads


_DECODER = dict(
    layers=("num_hidden_layers",),
    hidden=("hidden_size",),
    heads=("num_attention_heads",),
    ffn=("intermediate_size",),
    positions=("max_position_embeddings",),
)
_SEQ2SEQ = dict(
    layers=("encoder_layers", "decoder_layers"),
    hidden=("d_model",),
    heads=("encoder_attention_heads", "decoder_attention_heads"),
    ffn=("encoder_ffn_dim", "decoder_ffn_dim"),
    positions=("max_position_embeddings",),
)

ARCHS = {
    "gpt2": Arch(
        "GPT2Config",
        "GPT2LMHeadModel",
        ("n_layer",),
        ("n_embd",),
        ("n_head",),
        positions=("n_positions",),
    ),
    "bert": Arch("BertConfig", "BertModel", **_DECODER),
    "llama": Arch("LlamaConfig", "LlamaForCausalLM", **_DECODER),
    "mistral": Arch("MistralConfig", "MistralForCausalLM", **_DECODER),
    "qwen2": Arch("Qwen2Config", "Qwen2ForCausalLM", **_DECODER),
    "vit": Arch("ViTConfig", "ViTModel", **dict(_DECODER, positions=(), vocab=())),
    "t5": Arch(
        "T5Config",
        "T5Model",
        ("num_layers", "num_decoder_layers"),
        ("d_model",),
        ("num_heads",),
        ("d_ff",),
        head_dim=("d_kv",),
    ),
    "bart": Arch("BartConfig", "BartForConditionalGeneration", **_SEQ2SEQ),
    "mbart": Arch("MBartConfig", "MBartModel", **_SEQ2SEQ),
    "distilbert": Arch(
        "DistilBertConfig",
        "DistilBertModel",
        ("n_layers",),
        ("dim",),
        ("n_heads",),
        ("hidden_dim",),
        ("max_position_embeddings",),
    ),
    "falcon": Arch(
        "FalconConfig",
        "FalconModel",
        ("num_hidden_layers",),
        ("hidden_size",),
        ("num_attention_heads",),
    ),
    "bloom": Arch("BloomConfig", "BloomModel", ("n_layer",), ("hidden_size",), ("n_head",)),
    "gpt_neo": Arch(
        "GPTNeoConfig",
        "GPTNeoModel",
        ("num_layers",),
        ("hidden_size",),
        ("num_heads",),
        positions=("max_position_embeddings",),
    ),
}


def config(
    arch: str,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    vocab: int = 128,
    positions: int = 64,
    ffn: int | None = None,
    attn: str | None = "eager",
    **extra: Any,
) -> transformers.PretrainedConfig:
    """``arch``'s config at the given sizes (``ffn`` defaults to twice ``hidden``); ``attn=None``
    leaves the attention implementation to transformers; ``extra`` goes to the config as is."""
    import transformers

    spec = ARCHS[arch]
    knobs = [
        (spec.layers, layers),
        (spec.hidden, hidden),
        (spec.heads, heads),
        (spec.ffn, 2 * hidden if ffn is None else ffn),
        (spec.positions, positions),
        (spec.vocab, vocab),
        (spec.head_dim, hidden // heads),
    ]
    kwargs = {name: value for names, value in knobs for name in names}
    if attn is not None:
        kwargs["attn_implementation"] = attn
    return getattr(transformers, spec.config)(**kwargs | extra)


def model(arch: str, **knobs: Any) -> nn.Module:
    """A randomly initialised ``arch`` model of ``config(arch, **knobs)``, in train mode."""
    import transformers

    return getattr(transformers, ARCHS[arch].model)(config(arch, **knobs))
