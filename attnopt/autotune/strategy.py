"""How the next config to measure is chosen: an Optuna sampler behind ask/tell.

The space is pruned with ``space.keep`` before any trial: each knob is offered only the choices
that occur in some valid config. A combination the sampler still draws that ``keep`` rejects is
told PRUNED at once with its reason (no time is spent on it, and TPE learns to avoid it); after
a run of such draws a random untried valid config is enqueued so a sparse space still moves.
TPE (multivariate, seedable) is the default; the grid sampler gives exhaustive baselines.
"""

from __future__ import annotations

import random
import threading
from collections import Counter

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from attnopt.autotune.space import Config, ConfigSpace
from attnopt.codegen.signature import KernelSignature
from attnopt.errors import KernelError
from attnopt.targets import Target

SAMPLERS = ("tpe", "grid")
_INVALID_RUN = 16  # consecutive rejected draws before a valid config is enqueued
_MEASURED = (TrialState.COMPLETE, TrialState.FAIL)


class Strategy:
    """Proposes configs of one space for one (target, signature) from a study."""

    def __init__(
        self,
        space: ConfigSpace,
        target: Target,
        sig: KernelSignature,
        sampler: str = "tpe",
        seed: int | None = None,
    ):
        self.space, self.target, self.sig = space, target, sig
        self.valid = space.valid(target, sig)
        if not self.valid:
            reasons = Counter(space.keep(c, target, sig) for c in space.configs())
            listed = "; ".join(f"{r} ({n}×)" for r, n in reasons.most_common(3))
            raise KernelError(
                f"no config of {space.kernel} can run on {target.name} for {sig}: {listed}; "
                f"use another kernel or target for this shape"
            )
        self.choices = space.choices(target, sig)
        self.sampler = _sampler(sampler, self.choices, seed)
        self._rng = random.Random(seed)
        # Threads of one process share the Study: two concurrent asks can pop the same
        # enqueued trial, so asking is serialised (measuring stays parallel).
        self._asking = threading.Lock()

    def default(self) -> Config | None:
        """The space's default for this target and signature, if it is valid."""
        config = self.space.default(self.target, self.sig)
        return config if self.space.keep(config, self.target, self.sig) is None else None

    def ask(self, study: optuna.Study) -> tuple[Trial, Config]:
        """A new RUNNING trial and the valid config it stands for."""
        with self._asking:
            return self._ask(study)

    def _ask(self, study: optuna.Study) -> tuple[Trial, Config]:
        rejected = 0
        while True:
            trial = study.ask()
            config = {name: trial.suggest_categorical(name, c) for name, c in self.choices.items()}
            reason = self.space.keep(config, self.target, self.sig)
            if reason is None:
                return trial, config
            trial.set_user_attr("invalid", reason)
            self.tell(study, trial, state=TrialState.PRUNED)
            rejected += 1
            if rejected % _INVALID_RUN == 0:
                tried = {_frozen(t.params) for t in study.get_trials(deepcopy=False)}
                untried = [c for c in self.valid if _frozen(c) not in tried]
                study.enqueue_trial(self._rng.choice(untried or self.valid))

    def tell(
        self,
        study: optuna.Study,
        trial: Trial,
        value: float | None = None,
        state: TrialState | None = None,
    ) -> None:
        """``study.tell``, where the grid sampler's ``study.stop()`` after its last point is not
        an error: Optuna documents that it raises under ask/tell, after storing the trial."""
        try:
            study.tell(trial, value, state=state)
        except RuntimeError as error:
            if "Study.stop" not in str(error):
                raise

    def measured(self, study: optuna.Study, config: Config) -> FrozenTrial | None:
        """An earlier finished measurement of ``config`` in the study, if any."""
        key = _frozen(config)
        for trial in study.get_trials(deepcopy=False, states=_MEASURED):
            if _frozen(trial.params) == key:
                return trial
        return None

    def exhausted(self, study: optuna.Study) -> bool:
        """Whether every valid config has been measured (nothing is left to learn)."""
        done = {_frozen(t.params) for t in study.get_trials(deepcopy=False, states=_MEASURED)}
        return all(_frozen(c) in done for c in self.valid)


def _frozen(config: dict) -> tuple:
    return tuple(sorted(config.items()))


def _sampler(name: str, choices: dict, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    if name == "grid":
        return optuna.samplers.GridSampler({k: list(v) for k, v in choices.items()}, seed=seed)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
