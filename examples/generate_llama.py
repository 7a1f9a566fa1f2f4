"""Optimize a small Llama (random weights, default ``use_cache=True``) and generate with it;
then the same model through ``torch.compile(backend="attnopt")``. Runs on CPU in seconds.

    python examples/generate_llama.py
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import attnopt


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=256,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (1, 12))
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)

    fast = attnopt.optimize(model, {"input_ids": ids})  # goes through Dynamo: it generates
    assert isinstance(fast, LlamaForCausalLM)
    tokens = fast.generate(ids, **greedy)
    assert torch.equal(tokens, model.generate(ids, **greedy))
    fast.attnopt_report.print()  # a line per graph: the prefill, the decode steps, their sites
    print("generated:", tokens[0, ids.shape[1] :].tolist())

    compiled = torch.compile(model, backend="attnopt", options={"attnopt_inner": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits)
    print("torch.compile(backend='attnopt'):", len(attnopt.compile_report().rewritten), "sites")


if __name__ == "__main__":
    main()
