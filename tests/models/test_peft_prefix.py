"""Hugging Face ``peft`` prefix tuning: the learned prefix arrives as ``past_key_values`` built
from the prefix encoder's embedding; attnopt finds it as an input-independent prefix of every
site's keys and values and replaces it by ``Z, z`` within the error budget."""

import pytest
import torch

import attnopt
from attnopt.errors import AttnoptError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PREFIX = 20


def _model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=4,
        n_embd=64,
        vocab_size=128,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    base = transformers.GPT2LMHeadModel(config).eval()
    tuning = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PREFIX)
    return peft.get_peft_model(base, tuning).eval()


def _batch(seed):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "use_cache": False}  # no cache object in the output: exportable


def test_peft_prefix_found_and_rewritten_within_budget():
    model = _model()
    cal = [_batch(s) for s in range(3)]
    report = attnopt.inspect(model, cal[0])
    assert [f"prefix={PREFIX}" in s.signature for s in report.sites] == [True, True]
    opt = attnopt.optimize(
        model, cal[0], variants=("prefix_ntk",), calibration=cal, capture="export"
    )
    report = opt.attnopt_report
    assert [s.variant for s in report.sites] == ["prefix_ntk", "prefix_ntk"]
    for site in report.sites:
        (trial,) = site.trials
        assert trial.decision == "kept" and 0 < trial.metrics["rel_l1"] <= report.budget["rel_l1"]
    held = _batch(9)
    with torch.no_grad():
        out, ref = opt(**held).logits, model(**held).logits
    assert 0 < float((out - ref).abs().mean() / ref.abs().mean()) < report.budget["rel_l1"]


def test_peft_prefix_through_dynamo_keeps_forward_and_generate():
    """With a cache (``use_cache`` default, ``generate()``) the model goes through Dynamo, where
    the prefix reaches each site as a cache input: the sites are rewritten exactly (not as
    prefix_ntk, which needs the input-independent prefix of an exported graph), the prefix
    keys included, and the tokens stay those of the un-optimized peft model."""
    model = _model()
    ids = _batch(0)["input_ids"]
    opt = attnopt.optimize(model, {"input_ids": ids})
    report = opt.attnopt_report
    assert report.capture == "dynamo"
    first = report.graphs[0].sites
    assert len(first) == 2 and all(s.status == "rewritten" for s in first)
    assert all(f"m={PREFIX + ids.shape[1]}" in s.signature for s in first)  # prefix + input
    with torch.no_grad():
        torch.testing.assert_close(opt(input_ids=ids).logits, model(input_ids=ids).logits)
    greedy = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    expected = model.generate(input_ids=ids, **greedy)
    torch.testing.assert_close(opt.generate(input_ids=ids, **greedy), expected, rtol=0, atol=0)
    with pytest.raises(AttnoptError, match="Dynamo"):
        attnopt.optimize(model, {"input_ids": ids}, variants=("prefix_ntk",))
