"""The tiny-model table in tests/tiny_hf.py: every config name it writes is one the config class
has (a misspelt name would be kept as an extra attribute, the size silently left at its default),
and each knob lands on every name it maps to."""

from __future__ import annotations

import pytest

from tests import tiny_hf

transformers = pytest.importorskip("transformers")

KNOBS = dict(layers=3, hidden=48, heads=3, ffn=40, positions=80, vocab=100)
#: what a config checks against the layer count
EXTRA = {"gpt_neo": dict(attention_types=[[["global"], 3]])}


@pytest.mark.parametrize("arch", list(tiny_hf.ARCHS))
def test_every_knob_lands_on_a_real_config_field(arch: str) -> None:
    spec = tiny_hf.ARCHS[arch]
    default = getattr(transformers, spec.config)()
    config = tiny_hf.config(arch, **KNOBS, **EXTRA.get(arch, {}))
    expected = KNOBS | {"head_dim": KNOBS["hidden"] // KNOBS["heads"]}
    for knob, value in expected.items():
        for name in getattr(spec, knob):
            assert name in default.to_dict(), f"{spec.config} has no {name}"
            assert getattr(config, name) == value, (arch, knob, name)
    assert config._attn_implementation == "eager"
    assert hasattr(transformers, spec.model)
