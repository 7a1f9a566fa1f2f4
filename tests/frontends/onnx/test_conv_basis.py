"""conv_basis in ONNX: a causal site asked for conv_basis is left as it is, with the reason."""

from attnopt.frontends.onnx.convert import convert
from tests.forms import FORMS
from tests.frontends.onnx.test_graph import _export


def test_conv_basis_site_is_left_with_the_reason(tmp_path):
    form = next(f for f in FORMS if f.name == "causal_triu_additive")
    path, dims = _export(form, tmp_path, dynamo=False, opset=17)
    report = convert(path, tmp_path / "out.onnx", variants=("conv_basis",), dims=dims)
    (site,) = report.sites
    assert site.status == "skipped"
    assert (
        "conv_basis recovers its segments" in site.reason and "variants=('exact',)" in site.reason
    )
