"""Store: tuning keys, storage URLs, the exact budget, and storage failures as clear errors."""

from __future__ import annotations

import dataclasses
import socket
import warnings
from importlib import metadata

import optuna
import pytest

from attnopt.autotune import store as store_module
from attnopt.autotune.store import Store, TuningKey, resolve_url
from attnopt.autotune.tuner import load_tuned
from attnopt.errors import TuningStorageError


def test_key_buckets_lengths_and_names_its_study_deterministically(toy_pass, cpu, sig):
    space = toy_pass.space
    key = TuningKey.of(space, cpu, sig)
    assert TuningKey.of(space, cpu, dataclasses.replace(sig, n=200, m=129)) == key
    assert TuningKey.of(space, cpu, dataclasses.replace(sig, n=257)).n == 512
    assert TuningKey.of(space, cpu, dataclasses.replace(sig, kv_group=2)).gqa
    assert TuningKey.of(space, cpu, dataclasses.replace(sig, batch=7, heads=5)) == key
    assert key.study_name == TuningKey.of(space, cpu, sig).study_name
    assert key.study_name.startswith("toy.blocked.exact/cpu/float32/d32/none/n256/m256/")
    assert dict(key.versions)["torch"] == metadata.version("torch")
    assert set(dict(key.versions)) == {"torch", "triton", "tvm", "attnopt"}
    other = dataclasses.replace(key, versions=(("torch", "0.0"),))
    assert other.study_name != key.study_name  # a library upgrade starts a new study
    wider = dataclasses.replace(space, params=space.params | {"split": (1, 2, 4)})
    assert TuningKey.of(wider, cpu, sig).space != key.space


def test_the_key_is_stored_in_the_study(toy_pass, cpu, sig, storage):
    key = TuningKey.of(toy_pass.space, cpu, sig)
    Store(storage).study(key, optuna.samplers.RandomSampler())
    study = optuna.load_study(study_name=key.study_name, storage=storage)
    attrs = study.user_attrs["attnopt_key"]
    assert attrs["kernel"] == "toy.blocked" and attrs["n"] == 256 and attrs["target"] == "cpu"
    assert attrs["versions"]["torch"] == metadata.version("torch")


def test_storage_urls(tmp_path, monkeypatch):
    monkeypatch.delenv(store_module.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_url(None) == f"sqlite:///{tmp_path}/cache/attnopt/tuning.db"
    monkeypatch.setenv(store_module.ENV, str(tmp_path / "env.db"))
    assert resolve_url(None) == f"sqlite:///{tmp_path}/env.db"
    Store(None)
    assert (tmp_path / "env.db").exists() and not (tmp_path / "cache").exists()
    monkeypatch.delenv(store_module.ENV)
    Store(None)  # the cache directory is created on first use
    assert (tmp_path / "cache" / "attnopt" / "tuning.db").exists()
    monkeypatch.setenv(store_module.ENV, "postgresql://u:p@h/db")
    assert resolve_url(None) == "postgresql://u:p@h/db"
    assert resolve_url("mysql+pymysql://u@h/db") == "mysql+pymysql://u@h/db"
    assert resolve_url("~/t.db").endswith("/t.db") and "~" not in resolve_url("~/t.db")


def test_budget_is_exact_and_a_larger_total_continues(toy_pass, cpu, sig, storage):
    key = TuningKey.of(toy_pass.space, cpu, sig)
    db = Store(storage)
    assert [db.claim(key, 3) for _ in range(5)] == [True, True, True, False, False]
    assert [db.claim(key, 5) for _ in range(3)] == [True, True, False]
    assert [Store(storage).claim(key, 5)] == [False]


def test_corrupt_sqlite_file_is_a_clear_error_and_optimize_falls_back(toy_pass, cpu, sig, tmp_path):
    path = tmp_path / "tuning.db"
    path.write_bytes(b"this is not a database" * 500)
    with pytest.raises(TuningStorageError) as raised:
        Store(str(path))
    message = str(raised.value)
    assert str(path) in message and "file is not a database" in message
    assert "delete the file" in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    with pytest.warns(RuntimeWarning, match="file is not a database.*default config"):
        config, source = load_tuned(toy_pass.space, cpu, sig, str(path))
    assert (config, source) == (toy_pass.space.default(cpu, sig), "default")


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_server_is_a_clear_error_with_the_password_masked(toy_pass, cpu, sig):
    url = f"postgresql://tuner:s3cret@127.0.0.1:{_closed_port()}/attnopt"
    with pytest.raises(TuningStorageError) as raised:
        Store(url)
    message = str(raised.value)
    assert "s3cret" not in message and "tuner:***@127.0.0.1" in message
    assert "Connection refused" in message and "check that the server is running" in message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config, source = load_tuned(toy_pass.space, cpu, sig, url)
    assert source == "default" and config == toy_pass.space.default(cpu, sig)
    assert len(caught) == 1 and "s3cret" not in str(caught[0].message)


def test_not_a_url_is_a_clear_error():
    with pytest.raises(TuningStorageError, match="not a storage URL"):
        Store("postgresql://no host:port")


def test_summaries_list_each_key_once_with_its_best(toy_pass, cpu, sig, storage):
    key = TuningKey.of(toy_pass.space, cpu, sig)
    db = Store(storage)
    study = db.study(key, optuna.samplers.RandomSampler())
    for block, ms in ((16, 3.0), (32, 1.5), (64, 2.0)):
        study.enqueue_trial({"block_m": block})
        trial = study.ask()
        trial.suggest_categorical("block_m", (16, 32, 64))
        study.tell(trial, ms)
    assert db.claim(key, 1)  # the companion budget study is not listed
    (summary,) = db.summaries()
    assert summary.study == key.study_name and summary.best_ms == 1.5
    assert summary.config == {"block_m": 32} and summary.complete == 3
    assert db.best_config(key) == ({"block_m": 32}, 1.5)
