"""optimize(tune=True) end to end: the site's kernel is tuned on the CPU, the best config is
stored, installed for launches and named in the report; an unreachable storage falls back."""

from __future__ import annotations

import pytest
import torch
from conftest import TOY

import attnopt
from attnopt.autotune import runtime
from attnopt.autotune.tuner import tune
from attnopt.codegen.registry import Kernel, register_kernel, unregister_kernel
from attnopt.codegen.signature import KernelSignature
from attnopt.targets import resolve

toy = pytest.importorskip(TOY)


def _toy_forward(q, k, v, mask, *, scale, causal, window, fill):
    """The toy kernel behind the op, launching with whatever config is installed."""
    sig = KernelSignature.of(q, k, v, "none")
    config, _ = runtime.config_for(toy.SPACE, resolve("cpu"), sig)
    return toy.launch(
        q, k, v, mask, scale=scale, causal=causal, window=window, fill=fill, config=config
    ), None


def _supports(q, k, v, mask, causal, window):
    return None if mask is None and not causal and not window else "toy: unmasked only"


@pytest.fixture
def toy_on_cpu():
    register_kernel(Kernel("exact", "cpu", TOY, _toy_forward, supports=_supports, priority=100))
    yield
    unregister_kernel("exact", "cpu", TOY)


def test_tune_stores_installs_and_reports(toy_on_cpu, storage) -> None:
    model, example = toy.tiny_model()
    optimized = attnopt.optimize(model, example, target="cpu", tune=True, storage=storage, trials=4)
    site = optimized.attnopt_report.sites[0]
    assert site.status == "rewritten" and site.kernel.endswith(TOY)
    assert "[tuned:" in site.config, site.config
    installed, source = runtime.config_for(toy.SPACE, resolve("cpu"), site.kernel_signature)
    assert source.startswith("tuned:") and str(installed) in site.config
    again = attnopt.optimize(model, example, target="cpu", storage=storage)  # reuses, no tuning
    assert again.attnopt_report.sites[0].config == site.config
    with torch.no_grad():
        torch.testing.assert_close(again(*example), model(*example), atol=1e-5, rtol=1e-5)


def test_unreachable_storage_falls_back_to_defaults(toy_on_cpu) -> None:
    model, example = toy.tiny_model()
    with pytest.warns(RuntimeWarning, match="default"):
        optimized = attnopt.optimize(
            model, example, target="cpu", storage="postgresql://nobody@127.0.0.1:1/none"
        )
    site = optimized.attnopt_report.sites[0]
    assert site.status == "rewritten" and "[default]" in site.config


def test_graphs_compiled_later_launch_their_tuned_config(
    toy_on_cpu, toy_pass, modeled_runner, cpu, storage
) -> None:
    """A graph Dynamo captures after optimize() returned (a longer call: another length bucket)
    installs the stored best config of its own bucket, not the example's."""
    model, example = toy.tiny_model()  # 128 tokens
    later = KernelSignature(head_dim=32, dtype="float32", n=300, m=300, heads=2, value_dim=32)
    assert runtime.bucket(later.n) != runtime.bucket(example[0].shape[1])
    best = tune(
        toy_pass.space,
        modeled_runner,
        cpu,
        later,
        trials=6,
        storage=storage,
        seed=0,
        progress=False,
    )
    assert best.config != toy.SPACE.default(cpu, later)  # else the test could not fail
    optimized = attnopt.optimize(model, example, capture="dynamo", storage=storage)
    assert runtime.config_for(toy.SPACE, cpu, later)[1] == "default"
    x = torch.randn(1, 300, 64)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model(x), atol=1e-5, rtol=1e-5)
    site = optimized.attnopt_report.graphs[-1].sites[0]
    assert site.kernel_signature == later and "[tuned:" in site.config, site
    assert runtime.config_for(toy.SPACE, cpu, later) == (best.config, f"tuned:{storage}")
