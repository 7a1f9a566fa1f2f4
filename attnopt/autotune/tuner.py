"""Tuning a kernel for one site signature, and reading the result back for ``optimize()``.

``tune`` ties the parts together: ``Strategy`` proposes, ``measure`` times, ``Store`` keeps one
Optuna study per tuning key. ``trials`` is the number of measured trials the study should hold
in total, shared exactly between every worker on it (threads here, or processes anywhere that
open the same storage), so a rerun resumes instead of starting over. The space's default config
is enqueued first, so the tuned result is never one that lost to it. ``load_tuned`` is the read
side: the best stored config, or the default when there is none or the storage is unusable.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from attnopt.autotune import runtime
from attnopt.autotune.kernels import default_kernel, passes, runner
from attnopt.autotune.measure import Runner, check_device, measure
from attnopt.autotune.space import Config, ConfigSpace
from attnopt.autotune.store import Store, TuningKey
from attnopt.autotune.strategy import Strategy
from attnopt.codegen.signature import KernelSignature
from attnopt.errors import TuningStorageError
from attnopt.targets import Target


@dataclass(frozen=True)
class TuneResult:
    """The study's state after ``tune``: its best config (None if every config failed)."""

    kernel: str
    study: str
    storage: str
    config: Config | None
    ms: float | None
    default: Config
    measured: int
    failed: int
    pruned: int


def tune(
    space: ConfigSpace,
    runner: Runner,
    target: Target,
    sig: KernelSignature,
    *,
    trials: int = 50,
    timeout: float | None = None,
    storage: str | None = None,
    sampler: str = "tpe",
    seed: int | None = None,
    jobs: int = 1,
    progress: bool = True,
    budget_ms: float = 100.0,
) -> TuneResult:
    """Measure configs until the study holds ``trials`` measurements, every valid config is
    measured, or ``timeout`` seconds pass; ``jobs`` workers share this process's device."""
    check_device(target)
    strategy = Strategy(space, target, sig, sampler, seed)
    with _quiet_optuna():
        store = Store(storage)
        key = TuningKey.of(space, target, sig)
        study = store.study(key, strategy.sampler)
        default = strategy.default()
        if default is not None:
            with store.guard():
                study.enqueue_trial(default, skip_if_exists=True)
        run = _Run(study, strategy, store, key, runner, target, budget_ms)
        deadline = None if timeout is None else time.monotonic() + timeout
        run.workers(trials, deadline, jobs, progress)
        return run.result()


def tune_kernel(
    target: Target,
    sig: KernelSignature,
    *,
    kernel: str | None = None,
    backward: bool = False,
    **options,
) -> list[TuneResult]:
    """``tune`` each pass of ``kernel`` (default: the target's backend) for one site signature,
    on random inputs of that signature; ``options`` are ``tune``'s."""
    chosen = [
        p for p in passes(kernel or default_kernel(target)) if backward or p.name == "forward"
    ]
    return [tune(p.space, runner(p, sig, target), target, sig, **options) for p in chosen]


def install_tuned(
    target: Target, sig: KernelSignature, *, kernel: str | None = None, storage: str | None = None
) -> list[tuple[str, Config, str]]:
    """Install the stored best config of every pass of a site's kernel for launches to use:
    what ``optimize()`` calls once per site. Returns (kernel, config, source) per pass; raises
    ``KernelError`` when the target's kernel module is not available."""
    installed = []
    for kernel_pass in passes(kernel or default_kernel(target)):
        config, source = load_tuned(kernel_pass.space, target, sig, storage)
        runtime.install(kernel_pass.space, target, sig, config, source)
        installed.append((kernel_pass.space.kernel, config, source))
    return installed


def load_tuned(
    space: ConfigSpace, target: Target, sig: KernelSignature, storage: str | None = None
) -> tuple[Config, str]:
    """The config to install for a site and its source: ``tuned:<url>`` or ``default``.

    An unusable storage is a warning, not an error: the model still runs, untuned.
    """
    try:
        store = Store(storage)
        found = store.best_config(TuningKey.of(space, target, sig))
    except TuningStorageError as error:
        warnings.warn(f"{error}; using the default config", RuntimeWarning, stacklevel=2)
        found = None
    if found is None or space.keep(found[0], target, sig) is not None:
        return space.default(target, sig), "default"
    return found[0], f"tuned:{store.shown}"


@dataclass(frozen=True)
class _Run:
    """What every worker of one ``tune`` call shares."""

    study: optuna.Study
    strategy: Strategy
    store: Store
    key: TuningKey
    runner: Runner
    target: Target
    budget_ms: float

    def workers(self, trials: int, deadline: float | None, jobs: int, progress: bool) -> None:
        """Run ``jobs`` workers under a progress bar that shows the best config so far."""
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, TimeElapsedColumn(), disable=not progress, transient=True) as bar:
            task = bar.add_task(f"tuning {self.key.study_name}", total=trials)

            def shown() -> None:
                bar.update(task, completed=_count(self.study), description=_best_so_far(self.study))

            if jobs == 1:  # in the caller's thread, with its torch and CUDA device settings
                self.work(trials, deadline, shown)
                return
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                for worker in [
                    pool.submit(self.work, trials, deadline, shown) for _ in range(jobs)
                ]:
                    worker.result()

    def result(self) -> TuneResult:
        """The study's best config and trial counts."""
        with self.store.guard():
            states = [t.state for t in self.study.get_trials(deepcopy=False)]
        best = self.store.best_config(self.key)
        return TuneResult(
            kernel=self.key.kernel,
            study=self.key.study_name,
            storage=self.store.shown,
            config=None if best is None else best[0],
            ms=None if best is None else best[1],
            default=self.strategy.space.default(self.target, self.strategy.sig),
            measured=states.count(TrialState.COMPLETE) + states.count(TrialState.FAIL),
            failed=states.count(TrialState.FAIL),
            pruned=states.count(TrialState.PRUNED),
        )

    def work(self, trials: int, deadline: float | None, shown: Callable[[], None]) -> None:
        """Claim a slot, ask, measure, tell; until the budget, the space or the time runs out."""
        with self.store.guard():
            while (
                (deadline is None or time.monotonic() < deadline)
                and not self.strategy.exhausted(self.study)
                and self.store.claim(self.key, trials)
            ):
                self.trial()
                shown()

    def trial(self) -> None:
        """One measured trial; a repeat of a measured config reuses that measurement."""
        study = self.study
        trial, config = self.strategy.ask(study)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        earlier = self.strategy.measured(study, config)
        if earlier is not None:
            trial.set_user_attr("repeat_of", earlier.number)
            if earlier.state == TrialState.COMPLETE:
                self.strategy.tell(study, trial, earlier.value)
            else:
                trial.set_user_attr("error", earlier.user_attrs.get("error", "failed before"))
                self.strategy.tell(study, trial, state=TrialState.FAIL)
            return
        try:
            timing = measure(self.runner, config, self.target, self.budget_ms)
        except BaseException:
            trial.set_user_attr("error", "interrupted")
            self.strategy.tell(study, trial, state=TrialState.FAIL)
            raise
        if timing.error is not None:
            trial.set_user_attr("error", timing.error)
            self.strategy.tell(study, trial, state=TrialState.FAIL)
        else:
            self.strategy.tell(study, trial, timing.ms)


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna's INFO lines (study created, trial finished) would garble the progress bar."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def _count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)))


def _best_so_far(study: optuna.Study) -> str:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return "tuning: no config has run yet"
    best = min(done, key=lambda t: t.value)
    shown = ",".join(f"{k}={v}" for k, v in best.params.items())
    return f"best {best.value:.4f} ms ({shown})"
