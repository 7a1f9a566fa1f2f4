"""The tuner on CPU: real timed work for measurement, a modeled cost where configs are compared."""

from __future__ import annotations

import optuna
import pytest
import torch
from conftest import BUDGET_MS, TOY
from optuna.trial import TrialState

from attnopt.autotune import measure as measure_module
from attnopt.autotune import runtime
from attnopt.autotune.measure import measure
from attnopt.autotune.store import TuningKey
from attnopt.autotune.strategy import Strategy
from attnopt.autotune.tuner import install_tuned, load_tuned, tune, tune_kernel
from attnopt.errors import UnsupportedTargetError
from attnopt.targets import TARGETS


def _study(space, target, sig, storage) -> optuna.Study:
    return optuna.load_study(
        study_name=TuningKey.of(space, target, sig).study_name, storage=storage
    )


def test_measure_times_real_work_and_returns_failures(toy_runner, cpu):
    timing = measure(toy_runner, {"block_m": 16, "block_n": 16, "split": 1}, cpu, BUDGET_MS)
    assert timing.error is None and 0 < timing.ms < float("inf")
    failed = measure(toy_runner, {"block_m": 64, "block_n": 16, "split": 2}, cpu, BUDGET_MS)
    assert failed.ms is None and "toy out of resources" in failed.error


def test_cpu_timing_is_the_median_of_the_launches_after_a_warm_up(monkeypatch, cpu):
    ticks = iter([0.0, 0.001, 1.0, 1.009, 2.0, 2.002, 3.0, 3.005, 4.0, 4.003])
    monkeypatch.setattr(measure_module.time, "perf_counter", lambda: next(ticks))
    calls = []
    timing = measure(lambda config: lambda: calls.append(1), {}, cpu, budget_ms=0.0)
    assert len(calls) == 6  # warm-up, then five timed launches
    assert timing.ms == pytest.approx(3.0)  # median of 1, 9, 2, 5, 3 ms


def test_tune_records_failed_configs_and_returns_the_fastest(
    toy_pass, toy_runner, cpu, sig, storage
):
    result = tune(
        toy_pass.space,
        toy_runner,
        cpu,
        sig,
        trials=40,
        storage=storage,
        sampler="grid",
        seed=0,
        progress=False,
        budget_ms=BUDGET_MS,
    )
    study = _study(toy_pass.space, cpu, sig, storage)
    failed = study.get_trials(states=(TrialState.FAIL,))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert failed and all("toy out of resources" in t.user_attrs["error"] for t in failed)
    assert all(t.params["split"] == 2 and t.params["block_n"] == 16 for t in failed)
    assert result.measured == len(failed) + len(complete) == 40
    assert result.failed == len(failed)
    assert result.ms == min(t.value for t in complete)
    assert result.config == min(complete, key=lambda t: t.value).params
    assert study.trials[0].params == toy_pass.space.default(cpu, sig)  # the default goes first
    for trial in failed + complete:
        assert trial.user_attrs["worker"]
        assert toy_pass.space.keep(trial.params, cpu, sig) is None


def test_grid_is_exhaustive_and_stops_when_every_valid_config_is_measured(
    toy_pass, toy_runner, cpu, sig, storage
):
    valid = Strategy(toy_pass.space, cpu, sig).valid
    result = tune(
        toy_pass.space,
        toy_runner,
        cpu,
        sig,
        trials=500,
        storage=storage,
        sampler="grid",
        progress=False,
        budget_ms=BUDGET_MS,
    )
    study = _study(toy_pass.space, cpu, sig, storage)
    measured = study.get_trials(states=(TrialState.COMPLETE, TrialState.FAIL))
    fresh = [t for t in measured if "repeat_of" not in t.user_attrs]
    assert sorted(tuple(t.params.values()) for t in fresh) == sorted(
        tuple(c.values()) for c in valid
    )
    assert result.measured == len(measured) <= len(valid) + 1  # + the enqueued default's repeat


def test_tpe_comes_close_to_the_grid_best_in_fewer_trials(
    toy_pass, modeled_runner, cpu, sig, tmp_path
):
    grid_db, tpe_db = f"sqlite:///{tmp_path}/grid.db", f"sqlite:///{tmp_path}/tpe.db"
    grid = tune(
        toy_pass.space,
        modeled_runner,
        cpu,
        sig,
        trials=500,
        storage=grid_db,
        sampler="grid",
        progress=False,
        budget_ms=BUDGET_MS,
    )
    tpe = tune(
        toy_pass.space,
        modeled_runner,
        cpu,
        sig,
        trials=20,
        storage=tpe_db,
        sampler="tpe",
        seed=1,
        progress=False,
        budget_ms=BUDGET_MS,
    )
    assert tpe.measured == 20 < grid.measured
    grid_ms = {
        tuple(t.params.values()): t.value
        for t in _study(toy_pass.space, cpu, sig, grid_db).trials
        if t.state == TrialState.COMPLETE
    }
    assert grid_ms[tuple(tpe.config.values())] <= 2.0 * grid.ms, (tpe, grid)
    assert grid_ms[tuple(tpe.config.values())] < grid_ms[(16, 32, 1)] / 4  # beats the default


def test_results_persist_and_a_rerun_resumes(toy_pass, toy_runner, cpu, sig, storage):
    space = toy_pass.space
    first = tune(
        space,
        toy_runner,
        cpu,
        sig,
        trials=12,
        storage=storage,
        seed=0,
        progress=False,
        budget_ms=BUDGET_MS,
    )
    config, source = load_tuned(space, cpu, sig, storage)
    assert (config, source) == (first.config, f"tuned:{storage}")
    n_trials = len(_study(space, cpu, sig, storage).trials)
    again = tune(space, toy_runner, cpu, sig, trials=12, storage=storage, progress=False)
    assert again.measured == 12 and len(_study(space, cpu, sig, storage).trials) == n_trials
    more = tune(
        space,
        toy_runner,
        cpu,
        sig,
        trials=17,
        storage=storage,
        seed=1,
        progress=False,
        budget_ms=BUDGET_MS,
    )
    assert more.measured == 17 and more.ms <= first.ms
    # optimize() installs what load_tuned returns; kernels then launch with it
    runtime.install(space, cpu, sig, *load_tuned(space, cpu, sig, storage))
    assert runtime.config_for(space, cpu, sig) == (more.config, f"tuned:{storage}")


def test_load_tuned_falls_back_to_the_default_when_nothing_is_stored(toy_pass, cpu, sig, storage):
    assert load_tuned(toy_pass.space, cpu, sig, storage) == (
        toy_pass.space.default(cpu, sig),
        "default",
    )


def test_threads_share_one_exact_budget(toy_pass, toy_runner, cpu, sig, storage):
    result = tune(
        toy_pass.space,
        toy_runner,
        cpu,
        sig,
        trials=14,
        storage=storage,
        jobs=2,
        seed=0,
        progress=False,
        budget_ms=BUDGET_MS,
    )
    study = _study(toy_pass.space, cpu, sig, storage)
    assert result.measured == 14
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))


def test_timeout_stops_starting_trials(toy_pass, toy_runner, cpu, sig, storage):
    result = tune(
        toy_pass.space,
        toy_runner,
        cpu,
        sig,
        trials=1000,
        timeout=0.0,
        storage=storage,
        progress=False,
    )
    assert result.measured == 0 and result.config is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_target_without_a_gpu_is_a_clear_error(toy_pass, toy_runner, sig, storage):
    with pytest.raises(UnsupportedTargetError, match="needs a CUDA GPU"):
        tune(toy_pass.space, toy_runner, TARGETS["h100"], sig, trials=2, storage=storage)


def test_optimize_integration_installs_each_pass(cpu, sig, storage):
    """What optimize() does per site: install_tuned, then kernels launch with config_for."""
    import attnopt_toy_kernel as toy

    assert install_tuned(cpu, sig, kernel=TOY, storage=storage) == [
        ("toy.blocked", toy.default(cpu, sig), "default")
    ]
    (result,) = tune_kernel(
        cpu, sig, kernel=TOY, trials=6, storage=storage, progress=False, budget_ms=BUDGET_MS
    )
    assert result.kernel == "toy.blocked" and result.measured == 6
    assert install_tuned(cpu, sig, kernel=TOY, storage=storage) == [
        ("toy.blocked", result.config, f"tuned:{storage}")
    ]
    assert runtime.config_for(toy.SPACE, cpu, sig) == (result.config, f"tuned:{storage}")
