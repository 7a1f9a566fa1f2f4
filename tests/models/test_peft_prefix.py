"""Hugging Face ``peft`` prefix tuning: the learned prefix arrives as ``past_key_values`` built
from the prefix encoder's embedding; attnopt finds it as an input-independent prefix of every
site's keys and values and replaces it by ``Z, z`` within the error budget."""

import pytest
import torch

import attnopt
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
