"""The catalogue of attention forms: each yields exactly its number of sites, every site is
rewritten, and the optimized model computes the same outputs (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch

import attnopt
from tests.forms import FORMS


@pytest.mark.parametrize("form", FORMS, ids=[f.name for f in FORMS])
def test_form(form) -> None:
    model = form.make()
    inputs = form.inputs()
    optimized = attnopt.optimize(model, inputs)
    report = optimized.attnopt_report
    assert len(report.rewritten) == form.sites, report.to_json()
    assert len(report.sites) == form.sites, report.to_json()
    if form.sites == 0:
        assert report.near_misses, "a guard form must be reported as a near miss"
    if form.mask is not None:
        assert all(s.mask == form.mask for s in report.sites), report.to_json()
    if model.training or form.random:
        return  # dropout is random: outputs cannot be compared
    shapes = [inputs] + ([form.other()] if form.other is not None and report.dynamic else [])
    for args in shapes:
        with torch.no_grad():
            expected, got = model(*args), optimized(*args)
        torch.testing.assert_close(got, expected, atol=form.atol, rtol=form.atol)
    if form.other is not None and form.sites:
        assert report.dynamic, "forms with two shapes must capture with dynamic shapes"


def test_returned_weights_are_explained_in_plain_words() -> None:
    form = next(f for f in FORMS if f.name == "guard_returns_attention_weights")
    report = attnopt.inspect(form.make(), form.inputs())
    assert "output_attentions" in report.near_misses[0].rule, report.near_misses


def test_catalogue_is_large_enough() -> None:
    assert len(FORMS) >= 40
    assert sum(f.sites == 0 for f in FORMS) >= 6
