"""``attnopt.optimize`` on models that generate with a KV cache (Dynamo path): the result is the
model's own class, greedy/sampled ``generate()`` gives the original's tokens, and the op runs in
every decode step."""

from __future__ import annotations

import pytest
import torch

import attnopt
from tests import tiny_hf

transformers = pytest.importorskip("transformers")

VOCAB, PROMPT, NEW = 96, 6, 5


def _tiny(arch: str, attn: str | None = None, **knobs):
    return tiny_hf.model(arch, hidden=32, vocab=VOCAB, attn=attn, **knobs).eval()


def gpt2():
    return _tiny("gpt2", attn="eager")


def llama_gqa():
    return _tiny("llama", num_key_value_heads=2)


def mistral_window():  # the window (4) is shorter than the context (PROMPT + NEW)
    return _tiny("mistral", num_key_value_heads=2, sliding_window=4, attn="eager")


def qwen2():
    return _tiny("qwen2", num_key_value_heads=1)


def bart():
    return _tiny("bart", forced_eos_token_id=None)


MODELS = {"gpt2": gpt2, "llama_gqa": llama_gqa, "mistral_window": mistral_window, "qwen2": qwen2}


def _generate(model, ids, **kwargs) -> torch.Tensor:
    torch.manual_seed(1)
    return model.generate(ids, max_new_tokens=NEW, pad_token_id=0, **kwargs)


def _optimize(model, ids):
    optimized = attnopt.optimize(model, {"input_ids": ids})
    assert type(optimized) is type(model)
    assert optimized.attnopt_report.capture == "dynamo"
    return optimized


def _decode_steps(calls: list[tuple[int, int]], layers: int) -> list[int]:
    """The key lengths seen by single-query calls, one entry per decode step (each step calls
    the op once per layer)."""
    keys = [m for n, m in calls if n == 1]
    assert len(keys) % layers == 0, calls
    steps = [keys[i : i + layers] for i in range(0, len(keys), layers)]
    assert all(len(set(step)) == 1 for step in steps), calls
    return [step[0] for step in steps]


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generate_matches_with_op_in_every_decode_step(name, op_calls) -> None:
    model = MODELS[name]()
    ids = torch.randint(1, VOCAB, (2, PROMPT))
    expected = _generate(model, ids, do_sample=False)
    optimized = _optimize(model, ids)
    op_calls.clear()
    got = _generate(optimized, ids, do_sample=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    layers = model.config.num_hidden_layers
    assert [m for n, m in op_calls if n == PROMPT] == [PROMPT] * layers  # the prefill
    window = getattr(model.config, "sliding_window", None) or PROMPT + NEW  # cache kept
    expected_keys = [min(m, window) for m in range(PROMPT + 1, PROMPT + NEW)]
    assert _decode_steps(op_calls, layers) == expected_keys
    report = optimized.attnopt_report
    assert report.graphs_of("decode") and report.graphs_of("prefill"), report.to_json()
    assert all(len(g.sites) == layers for g in report.graphs if g.kind != "other")
    assert all(s.status == "rewritten" for s in report.sites)


def test_encoder_decoder_generate_matches(op_calls) -> None:
    model = bart()
    ids = torch.randint(3, VOCAB, (2, PROMPT))
    greedy = dict(do_sample=False, num_beams=1, min_new_tokens=NEW)
    expected = _generate(model, ids, **greedy)
    optimized = _optimize(model, ids)
    op_calls.clear()
    got = _generate(optimized, ids, **greedy)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    layers = model.config.decoder_layers
    assert op_calls.count((PROMPT, PROMPT)) == model.config.encoder_layers  # the encoder
    assert op_calls.count((1, PROMPT)) == layers * NEW  # cross-attention in every step
    self_keys = sorted(m for n, m in op_calls if n == 1 and m != PROMPT)
    assert self_keys == sorted(list(range(1, NEW + 1)) * layers)  # self-attention too
    kinds = {g.kind for g in optimized.attnopt_report.graphs}
    assert {"prefill", "decode"} <= kinds


def test_left_padded_batch_with_attention_mask(op_calls) -> None:
    model = llama_gqa()
    ids = torch.randint(1, VOCAB, (2, PROMPT))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # the first row is three tokens shorter, padded on the left
    expected = _generate(model, ids, attention_mask=mask, do_sample=False)
    optimized = _optimize(model, ids)
    op_calls.clear()
    got = _generate(optimized, ids, attention_mask=mask, do_sample=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert _decode_steps(op_calls, 2) == list(range(PROMPT + 1, PROMPT + NEW))


def test_sampling_with_a_fixed_seed(op_calls) -> None:
    model = qwen2()
    ids = torch.randint(1, VOCAB, (2, PROMPT))
    sample = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
    expected = _generate(model, ids, **sample)
    optimized = _optimize(model, ids)
    op_calls.clear()
    got = _generate(optimized, ids, **sample)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert len(_decode_steps(op_calls, 2)) == NEW - 1


def test_interface_of_the_optimized_model(tmp_path) -> None:
    model = gpt2()
    ids = torch.randint(1, VOCAB, (1, PROMPT))
    optimized = _optimize(model, ids)
    assert optimized.config is not None and optimized.device == model.device
    assert optimized.to(torch.float32) is optimized
    optimized.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    # the original model is left as it was: no compiled call, no report
    assert model._compiled_call_impl is None and not hasattr(model, "attnopt_report")


def test_static_cache_generate_matches(op_calls) -> None:
    """``cache_implementation="static"``: the cache is preallocated at full length and masked, so
    every decode call reads the whole cache, its unwritten tail masked out."""
    model = llama_gqa()
    ids = torch.randint(1, VOCAB, (2, PROMPT))
    static = dict(do_sample=False, cache_implementation="static")
    expected = _generate(model, ids, **static)
    optimized = _optimize(model, ids)
    op_calls.clear()
    got = _generate(optimized, ids, **static)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    decode = [m for n, m in op_calls if n == 1]
    assert len(decode) == model.config.num_hidden_layers * (NEW - 1), op_calls
    assert len(set(decode)) == 1 and decode[0] >= PROMPT + NEW - 1  # the preallocated length
