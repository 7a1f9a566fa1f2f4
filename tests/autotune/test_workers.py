"""Several worker processes tuning one study through one storage: SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter

import optuna
import pytest
from conftest import HERE
from optuna.trial import TrialState

from attnopt.autotune.store import TuningKey
from attnopt.codegen.signature import KernelSignature
from attnopt.targets import resolve

POSTGRES_ENV = "ATTNOPT_TEST_POSTGRES_URL"


def _run_workers(storage: str, trials: int, gate) -> list[dict]:
    worker = str(HERE / "tune_worker.py")  # its directory, with the toy kernel, is on its path
    procs = [
        subprocess.Popen(
            [sys.executable, worker, storage, str(trials), str(gate), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=170) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def _check_one_study(storage: str, trials: int, results: list[dict]) -> None:
    import attnopt_toy_kernel as toy

    sig = KernelSignature(head_dim=32, dtype="float32", n=256, m=256, heads=2, batch=1)
    name = TuningKey.of(toy.SPACE, resolve("cpu"), sig).study_name
    assert {r["study"] for r in results} == {name}
    study = optuna.load_study(study_name=name, storage=storage)
    states = Counter(t.state for t in study.trials)
    measured = states[TrialState.COMPLETE] + states[TrialState.FAIL]
    assert measured == trials, states  # none lost, none extra
    assert states[TrialState.RUNNING] == states[TrialState.WAITING] == 0
    assert len({t.number for t in study.trials}) == len(study.trials)
    workers = Counter(t.user_attrs["worker"] for t in study.trials if "worker" in t.user_attrs)
    assert len(workers) == 2 and sum(workers.values()) == trials, workers
    budget = optuna.load_study(study_name=f"{name}:budget", storage=storage)
    assert len(budget.get_trials(states=(TrialState.COMPLETE,))) == trials
    assert max(r["measured"] for r in results) == trials


def test_two_processes_share_one_sqlite_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    results = _run_workers(storage, 16, tmp_path)
    _check_one_study(storage, 16, results)


@pytest.fixture(scope="session")
def postgres_server():
    """The server's admin URL: ``ATTNOPT_TEST_POSTGRES_URL`` if set, else a throwaway server
    started (and installed, if missing) by ``.ci/postgres.sh`` for this session."""
    url = os.environ.get(POSTGRES_ENV)
    if url:
        yield url
        return
    if os.environ.get("ATTNOPT_SKIP_POSTGRES") == "1":
        pytest.skip("ATTNOPT_SKIP_POSTGRES=1: PostgreSQL storage not tested")
    script = HERE.parents[1] / ".ci" / "postgres.sh"
    started = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True)
    if started.returncode != 0 or "=" not in started.stdout:
        pytest.fail(
            f"could not start PostgreSQL with {script} (set {POSTGRES_ENV} to a server, or "
            f"ATTNOPT_SKIP_POSTGRES=1 to skip explicitly): {started.stderr.strip()[-500:]}"
        )
    yield started.stdout.strip().split("=", 1)[1]
    subprocess.run(["bash", str(script), "stop"], capture_output=True, text=True)


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh database on the test server, dropped afterwards."""
    url = postgres_server
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"attnopt_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield make_url(url).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_two_processes_share_one_postgres_study(postgres_url, tmp_path):
    results = _run_workers(postgres_url, 16, tmp_path)
    _check_one_study(postgres_url, 16, results)
