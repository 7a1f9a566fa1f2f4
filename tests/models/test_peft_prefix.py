"""Hugging Face ``peft`` prefix tuning: the learned prefix arrives as ``past_key_values`` built
from the prefix encoder's embedding; attnopt finds it as an input-independent prefix of every
site's keys and values and replaces it by ``Z, z`` within the error budget."""

import pytest
import torch

import attnopt
from attnopt.errors import AttnoptError
from tests import tiny_hf

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PREFIX = 20


def _model():
    torch.manual_seed(0)
    base = tiny_hf.model("gpt2", positions=128, attn=None, bos_token_id=0, eos_token_id=0).eval()
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


def test_peft_prefix_through_dynamo_exact_and_prefix_ntk():
    """With a cache (``use_cache`` default, ``generate()``) the model goes through Dynamo. The
    graph of the peft forward computes the prefix from the prompt embedding (reached through the
    module, not passed in): its sites carry ``prefix=20``. Exact keeps logits and greedy tokens;
    prefix_ntk keeps the model output within budget (the generate graphs receive the prefix in
    the cache, as an input: they stay exact)."""
    model = _model()
    ids = _batch(0)["input_ids"]
    greedy = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    expected = model.generate(input_ids=ids, **greedy)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    exact = attnopt.optimize(model, {"input_ids": ids})
    first = exact.attnopt_report.graphs[0].sites
    assert exact.attnopt_report.capture == "dynamo"
    assert [f"prefix={PREFIX}" in s.signature for s in first] == [True, True]
    assert all(s.status == "rewritten" and s.variant == "exact" for s in first)
    with torch.no_grad():
        torch.testing.assert_close(exact(input_ids=ids).logits, reference)
    torch.testing.assert_close(exact.generate(input_ids=ids, **greedy), expected, rtol=0, atol=0)

    torch._dynamo.reset()
    cal = [{"input_ids": _batch(s)["input_ids"]} for s in range(3)]
    ntk = attnopt.optimize(model, {"input_ids": ids}, variants=("prefix_ntk",), calibration=cal)
    report = ntk.attnopt_report
    first = report.graphs[0].sites
    assert [(s.variant, s.status) for s in first] == [("prefix_ntk", "rewritten")] * 2
    assert 0 < report.model_metrics["rel_l1"] <= report.budget["rel_l1"]
    with torch.no_grad():
        out = ntk(input_ids=_batch(9)["input_ids"]).logits
        ref = model(input_ids=_batch(9)["input_ids"]).logits
    assert 0 < float((out - ref).abs().mean() / ref.abs().mean()) < report.budget["rel_l1"]
    torch.testing.assert_close(ntk.generate(input_ids=ids, **greedy), expected, rtol=0, atol=0)
    with pytest.raises(AttnoptError, match="inner='eager'"):
        attnopt.optimize(model, {"input_ids": ids}, variants=("prefix_ntk",), inner="aot_eager")
