"""Strategy: pruning before trials, invalid draws never measured, seeded TPE, sparse spaces."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from attnopt.autotune.space import ConfigSpace
from attnopt.autotune.strategy import Strategy
from attnopt.codegen.signature import KernelSignature
from attnopt.errors import KernelError


def _latency(config: dict) -> float:
    """A deterministic stand-in for a timing, so sampler behaviour can be compared exactly."""
    return 1000.0 / (config["block_m"] * config["block_n"]) + config["split"]


def test_choices_are_pruned_to_values_of_valid_configs(toy_pass, cpu):
    short = KernelSignature(head_dim=32, dtype="float32", n=64, m=32)
    strategy = Strategy(toy_pass.space, cpu, short)
    assert strategy.choices == {"block_m": (16, 32, 64), "block_n": (16, 32), "split": (1, 2)}
    assert len(strategy.valid) == 3 * 2 * 2
    assert all(toy_pass.space.keep(c, cpu, short) is None for c in strategy.valid)


def test_space_with_nothing_valid_names_the_reasons(cpu, sig):
    space = ConfigSpace(
        "never", {"x": (1, 2)}, lambda c, t, s: "needs 999 KiB of shared memory", lambda t, s: {}
    )
    with pytest.raises(KernelError, match="no config of never can run on cpu.*999 KiB.*2×"):
        Strategy(space, cpu, sig)


def test_invalid_draws_are_pruned_with_reason_and_never_returned(toy_pass, cpu):
    short = KernelSignature(head_dim=32, dtype="float32", n=64, m=64)
    strategy = Strategy(toy_pass.space, cpu, short, "tpe", seed=3)
    # block_m*block_n <= 128*128 always holds here, so only the length rule can reject; make
    # some draws invalid by keeping the full choice lists the sampler may draw from.
    strategy.choices = dict(toy_pass.space.params)
    study = optuna.create_study(sampler=strategy.sampler)
    for _ in range(30):
        trial, config = strategy.ask(study)
        assert toy_pass.space.keep(config, cpu, short) is None
        strategy.tell(study, trial, _latency(config))
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert pruned, "with the unpruned choice lists some draws must have been invalid"
    assert all(t.user_attrs["invalid"] == "block longer than the padded sequence" for t in pruned)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 30


def test_sparse_space_still_moves(cpu, sig):
    """One valid config in 4096: a run of invalid draws enqueues it instead of looping on."""
    params = {"a": tuple(range(16)), "b": tuple(range(16)), "c": tuple(range(16))}
    space = ConfigSpace(
        "sparse",
        params,
        lambda c, t, s: None if (c["a"], c["b"], c["c"]) == (7, 11, 3) else "not the one",
        lambda t, s: {"a": 0, "b": 0, "c": 0},
    )
    strategy = Strategy(space, cpu, sig, "tpe", seed=0)
    strategy.choices = dict(params)  # defeat the per-knob pruning to force invalid draws
    study = optuna.create_study(sampler=strategy.sampler)
    trial, config = strategy.ask(study)
    assert config == {"a": 7, "b": 11, "c": 3}
    assert len(study.trials) <= 17


def _proposals(sampler: str, seed: int, toy_pass, cpu, sig, n: int = 25) -> list[tuple]:
    strategy = Strategy(toy_pass.space, cpu, sig, sampler, seed=seed)
    study = optuna.create_study(sampler=strategy.sampler)
    seen = []
    for _ in range(n):
        trial, config = strategy.ask(study)
        strategy.tell(study, trial, _latency(config))
        seen.append(tuple(config.values()))
    return seen


def test_tpe_is_seedable(toy_pass, cpu, sig):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    first = _proposals("tpe", 7, toy_pass, cpu, sig)
    assert first == _proposals("tpe", 7, toy_pass, cpu, sig)
    assert first != _proposals("tpe", 8, toy_pass, cpu, sig)


def test_grid_proposes_every_combination_once(toy_pass, cpu, sig):
    strategy = Strategy(toy_pass.space, cpu, sig, "grid", seed=0)
    combos = 1
    for values in strategy.choices.values():
        combos *= len(values)
    study = optuna.create_study(sampler=strategy.sampler)
    seen = []
    while len(study.trials) < combos:
        trial, config = strategy.ask(study)
        strategy.tell(study, trial, _latency(config))
        seen.append(tuple(config.values()))
    assert len(seen) == len(set(seen)) == len(strategy.valid)
    assert strategy.exhausted(study)
