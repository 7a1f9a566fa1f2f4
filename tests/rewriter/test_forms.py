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
    if model.training:
        return  # dropout is random: outputs cannot be compared
    with torch.no_grad():
        expected, got = model(*inputs), optimized(*inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_catalogue_is_large_enough() -> None:
    assert len(FORMS) >= 40
    assert sum(f.sites == 0 for f in FORMS) >= 6
