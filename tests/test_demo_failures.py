"""A demo training that fails reports which training and why, even when its error cannot travel
back from the worker process; the Prefect server waits long enough for SQLite's writer lock."""

from __future__ import annotations

import httpx
import pytest
from prefect.exceptions import PrefectHTTPStatusError

import flows.train
from flows.demo import TrainingFailed, train_method
from flows.temporary_server import SQLITE_BUSY_TIMEOUT_S, database_env


def _server_unavailable() -> PrefectHTTPStatusError:
    request = httpx.Request("POST", "http://127.0.0.1:1/api/task_runs/")
    response = httpx.Response(503, request=request)
    return PrefectHTTPStatusError.from_httpx_error(
        httpx.HTTPStatusError("Service Unavailable", request=request, response=response)
    )


class _FailingTrain:
    def __init__(self, exc: Exception):
        self.exc = exc

    def with_options(self, **_):
        return self

    def __call__(self, **_):
        raise self.exc


def test_an_error_that_does_not_unpickle_names_the_training(monkeypatch):
    monkeypatch.setattr(flows.train, "train", _FailingTrain(_server_unavailable()))
    with pytest.raises(
        TrainingFailed,
        match=r"training rl-s0-demo: PrefectHTTPStatusError: "
        r"Service Unavailable",
    ):
        train_method.fn("toy", [], "rl-s0-demo", "parent")


def test_an_error_that_unpickles_travels_as_itself(monkeypatch):
    monkeypatch.setattr(flows.train, "train", _FailingTrain(ValueError("bad value")))
    with pytest.raises(ValueError, match="bad value"):
        train_method.fn("toy", [], "rl-s0-demo", "parent")


def test_the_server_reads_its_sqlite_busy_timeout(tmp_path, monkeypatch):
    from prefect.settings.models.root import Settings

    for key, value in database_env(tmp_path / "prefect.db").items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.server.database.timeout == SQLITE_BUSY_TIMEOUT_S > 10  # Prefect's default
    assert str(tmp_path) in settings.server.database.connection_url.get_secret_value()
