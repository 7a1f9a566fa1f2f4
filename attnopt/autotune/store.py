"""Where tuning results live: one plain Optuna study per tuning key, in an Optuna storage URL.

The default is a SQLite file in the user cache directory (``ATTNOPT_TUNING_DB`` or a
``storage=`` argument overrides it, as a URL or a file path). A PostgreSQL or MySQL URL lets
several processes on several GPUs tune one study at once. Studies are ordinary Optuna studies,
so ``optuna-dashboard <storage-url>`` browses them. Every storage failure surfaces as a
``TuningStorageError`` naming the URL (password masked) and what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import random
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import optuna
import platformdirs
import sqlalchemy.event
import sqlalchemy.exc
from optuna.exceptions import StorageInternalError
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from attnopt.autotune.runtime import bucket
from attnopt.autotune.space import Config, ConfigSpace
from attnopt.codegen.signature import KernelSignature
from attnopt.errors import TuningStorageError
from attnopt.targets import Target

ENV = "ATTNOPT_TUNING_DB"
KEY_ATTR = "attnopt_key"
_LIBRARIES = {"torch": "torch", "triton": "triton", "tvm": "apache-tvm", "attnopt": "attnopt"}
_SCHEMA_RACES = (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError)
_STORAGE_ERRORS = (sqlalchemy.exc.SQLAlchemyError, StorageInternalError, OSError, ImportError)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


@dataclass(frozen=True)
class TuningKey:
    """What a tuned config is valid for; the same fields as ``runtime.runtime_key`` and more.

    ``space`` fingerprints the choices the tuner offers (the knobs' values left after pruning),
    so a changed kernel space, or a signature that prunes differently, gets its own study
    instead of clashing with another's parameter distributions.
    """

    kernel: str
    variant: str
    target: str
    dtype: str
    head_dim: int
    mask_kind: str
    gqa: bool
    n: int
    m: int
    space: str
    versions: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, space: ConfigSpace, target: Target, sig: KernelSignature) -> TuningKey:
        choices = json.dumps(sorted((k, list(v)) for k, v in space.choices(target, sig).items()))
        return cls(
            kernel=space.kernel,
            variant=space.variant,
            target=target.name,
            dtype=sig.dtype,
            head_dim=sig.head_dim,
            mask_kind=sig.mask_kind,
            gqa=sig.kv_group > 1,
            n=bucket(sig.n),
            m=bucket(sig.m),
            space=hashlib.sha1(choices.encode()).hexdigest()[:8],
            versions=tuple((lib, _version(dist)) for lib, dist in _LIBRARIES.items()),
        )

    def attrs(self) -> dict:
        """The key as JSON-able data, stored in the study's user attrs."""
        return asdict(self) | {"versions": dict(self.versions)}

    @property
    def study_name(self) -> str:
        """Readable in a dashboard, unique per key (the hash covers every field)."""
        digest = hashlib.sha1(json.dumps(self.attrs(), sort_keys=True).encode()).hexdigest()
        gqa = "/gqa" if self.gqa else ""
        return (
            f"{self.kernel}.{self.variant}/{self.target}/{self.dtype}/d{self.head_dim}/"
            f"{self.mask_kind}{gqa}/n{self.n}/m{self.m}/{digest[:10]}"
        )


def default_url() -> str:
    """``ATTNOPT_TUNING_DB`` if set, else ``tuning.db`` in the user cache directory."""
    return os.environ.get(ENV) or str(Path(platformdirs.user_cache_dir("attnopt")) / "tuning.db")


def resolve_url(storage: str | None) -> str:
    """A storage URL from an argument that may be None (the default), a URL or a file path."""
    storage = storage or default_url()
    if "://" in storage:
        return storage
    return f"sqlite:///{Path(storage).expanduser().absolute()}"


def masked(url: str) -> str:
    """The URL with its password hidden, for messages and report sources."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return url


def _reason(error: BaseException) -> str:
    cause = getattr(error, "orig", None) or error.__cause__ or error
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]


def _advice(url: str, error: BaseException) -> str:
    shown = masked(url)
    if isinstance(error, ImportError):
        return (
            f"no database driver for {shown}: install one (PostgreSQL: pip install "
            f"'psycopg[binary]'; MySQL: pip install PyMySQL and use mysql+pymysql://)"
        )
    if url.startswith("sqlite"):
        return (
            f"cannot use the tuning database {shown} ({_reason(error)}); it is only a cache: "
            f"move or delete the file, or pick another with --storage or {ENV}"
        )
    return (
        f"cannot use the tuning database at {shown} ({_reason(error)}); check that the server "
        f"is running and the URL, user and database are right, or unset {ENV} / drop --storage "
        f"to use the local SQLite file"
    )


def _open(url: str, engine_kwargs: dict) -> optuna.storages.RDBStorage:
    """Optuna creates its tables on first use, and workers starting together on an empty
    database race to do it (optuna#1092); the losers only need to open it again."""
    for attempt in itertools.count(1):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except sqlalchemy.exc.SQLAlchemyError as error:
            lost_race = isinstance(error, _SCHEMA_RACES) or "already exists" in str(error)
            if not lost_race or attempt == 5:
                raise
            time.sleep(0.1 + random.random() / 2)


def _sqlite_pragmas(connection, _record) -> None:
    """WAL lets workers read while one writes, and NORMAL sync makes each commit ~3x cheaper;
    both are safe on a local disk (SQLite on a network filesystem is not safe anyway)."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


@dataclass(frozen=True)
class Summary:
    """One study's best result, for ``attnopt tune --show``."""

    key: dict
    study: str
    best_ms: float | None
    config: Config | None
    complete: int
    failed: int
    pruned: int


class Store:
    """An opened Optuna storage and the attnopt studies in it."""

    def __init__(self, storage: str | None = None):
        self.url = resolve_url(storage)
        self.shown = masked(self.url)
        try:
            url = make_url(self.url)
        except (sqlalchemy.exc.ArgumentError, ValueError):
            raise TuningStorageError(
                f"{self.url!r} is not a storage URL; use sqlite:///path.db, "
                f"postgresql://user:pass@host/db, mysql+pymysql://… or a file path"
            ) from None
        backend = url.get_backend_name()
        kwargs: dict = {"pool_pre_ping": True}
        if backend == "sqlite":
            kwargs["connect_args"] = {"timeout": 60}  # several workers wait for the write lock
            if url.database:
                with self.guard():
                    Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        elif backend in ("postgresql", "mysql", "mariadb"):
            kwargs["connect_args"] = {"connect_timeout": 10}
        with self.guard(RuntimeError):
            self.storage = _open(self.url, kwargs)
        if backend == "sqlite":
            sqlalchemy.event.listen(self.storage.engine, "connect", _sqlite_pragmas)
            self.storage.engine.dispose()  # reconnect with them
        self._budgets: dict[TuningKey, optuna.Study] = {}

    @contextlib.contextmanager
    def guard(self, *extra: type[BaseException]) -> Iterator[None]:
        """Turn a storage failure inside the block into a short ``TuningStorageError``."""
        try:
            yield
        except (*_STORAGE_ERRORS, *extra) as error:
            raise TuningStorageError(_advice(self.url, error)) from None

    def study(self, key: TuningKey, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
        """The study for ``key``, created with the key in its user attrs if new."""
        with self.guard():
            study = optuna.create_study(
                storage=self.storage,
                study_name=key.study_name,
                sampler=sampler,
                direction="minimize",
                load_if_exists=True,
            )
            if KEY_ATTR not in study.user_attrs:
                study.set_user_attr(KEY_ATTR, key.attrs())
                with warnings.catch_warnings():  # experimental in Optuna, shown by dashboards
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    study.set_metric_names(["latency_ms"])
        return study

    def best_config(self, key: TuningKey) -> tuple[Config, float] | None:
        """The best measured config for ``key`` and its latency in ms, or None if none."""
        with self.guard():
            try:
                study = optuna.load_study(study_name=key.study_name, storage=self.storage)
                best = study.best_trial
            except (KeyError, ValueError):
                return None
        return dict(best.params), float(best.value)

    def claim(self, key: TuningKey, total: int) -> bool:
        """Take one of the ``total`` measurements the study may have; False once all are taken.

        Slots are trials of a companion ``<study>:budget`` study, because creating a trial is
        the one step Optuna makes atomic across processes (it numbers trials under a lock). A
        slot beyond ``total`` is marked FAIL, and earlier such marks are not counted, so a later
        run with a larger ``total`` continues where the last one stopped. Workers on one study
        must ask for the same ``total``; a worker killed while measuring loses its slot.
        """
        with self.guard():
            budget = self._budgets.get(key) or optuna.create_study(
                storage=self.storage,
                study_name=f"{key.study_name}:budget",
                sampler=optuna.samplers.RandomSampler(),
                load_if_exists=True,
            )
            self._budgets[key] = budget
            ticket = budget.ask()
            wasted = budget.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if ticket.number - sum(t.number < ticket.number for t in wasted) < total:
                budget.tell(ticket, 0.0)
                return True
            budget.tell(ticket, state=TrialState.FAIL)
            return False

    def summaries(self) -> list[Summary]:
        """Every attnopt study in the storage with its best trial."""
        found = []
        with self.guard():
            for summary in optuna.get_all_study_summaries(self.storage, include_best_trial=False):
                if KEY_ATTR not in summary.user_attrs:
                    continue
                study = optuna.load_study(study_name=summary.study_name, storage=self.storage)
                trials = study.get_trials(deepcopy=False)
                done = [t for t in trials if t.state == TrialState.COMPLETE]
                best = min(done, key=lambda t: t.value, default=None)
                found.append(
                    Summary(
                        key=summary.user_attrs[KEY_ATTR],
                        study=summary.study_name,
                        best_ms=None if best is None else best.value,
                        config=None if best is None else dict(best.params),
                        complete=len(done),
                        failed=sum(t.state == TrialState.FAIL for t in trials),
                        pruned=sum(t.state == TrialState.PRUNED for t in trials),
                    )
                )
        return found
