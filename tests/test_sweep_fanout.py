"""A sweep fanned out over Prefect workers, deployed the way a team deploys it: a `prefect
server` on PostgreSQL, an MLflow tracking server on PostgreSQL serving the artifacts, the
project's `train` deployment on a process pool and two workers taking one run each. The children
must run at the same time, land under one MLflow parent, survive a failed sibling, and not run
again when the sweep is re-run."""

from __future__ import annotations

import itertools
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from flows.cli import prefect_server_command
from flows.temporary_server import free_port, stop_process, wait_healthy
from tests.commands import MLFLOW, PREFECT, REPO, run_command

pytestmark = pytest.mark.slow
PG = "postgresql://postgres@127.0.0.1:5432"


def _psql(sql: str) -> None:
    subprocess.run(
        ["psql", f"{PG}/postgres", "-v", "ON_ERROR_STOP=1", "-c", sql],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def databases():
    """Two fresh PostgreSQL databases (Prefect's and MLflow's), dropped afterwards."""
    names = [f"relift_test_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("prefect", "mlflow")]
    try:
        for name in names:
            _psql(f"CREATE DATABASE {name}")
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is needed (a team's deployment): {e}")
    yield names
    for name in names:
        _psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def team_stack(tmp_path_factory, databases):
    """Prefect server + MLflow server on PostgreSQL, `train` deployed, two process workers."""
    prefect_db, mlflow_db = databases
    home = tmp_path_factory.mktemp("stack")
    prefect_port, mlflow_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
    # Authenticated as the README's recipe deploys it (a deployment's pull steps run shell
    # commands on workers, so an open API hands out code execution): Prefect's auth string,
    # MLflow's basic-auth app with its own admin password, CORS limited to Prefect's own UI.
    secret = uuid.uuid4().hex
    auth_ini = home / "mlflow_auth.ini"
    auth_ini.write_text(
        f"[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{home / 'mlflow_auth.db'}\n"
        f"admin_username = relift\nadmin_password = {secret}\n"
        "authorization_function = "
        "mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {
        **os.environ,
        "PREFECT_HOME": str(home / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_API_AUTH_STRING": f"relift:{secret}",
        "PREFECT_API_AUTH_STRING": f"relift:{secret}",
        "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": f"http://127.0.0.1:{prefect_port}",
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret,
        "MLFLOW_TRACKING_USERNAME": "relift",
        "MLFLOW_TRACKING_PASSWORD": secret,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://postgres@127.0.0.1:5432/{prefect_db}",
        "RELIFT_REPO_DIR": str(REPO),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        "PREFECT_UI_ENABLED": "false",
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "OMP_NUM_THREADS": "1",
        # Workers look for runs every 2 s (default 10): both are busy soon after submission.
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_WORKER_PREFETCH_SECONDS": "2",
    }
    env.pop("PREFECT_API_KEY", None)
    procs, logs = [], []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        log = open(home / f"{name}.log", "w")  # noqa: SIM115  (closed at teardown)
        logs.append(log)
        proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    def prefect(*args: str) -> None:
        r = run_command([PREFECT, *args], env=env, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr

    try:
        server = start("prefect-server", prefect_server_command(prefect_port))
        tracking = start(
            "mlflow-server",
            [
                MLFLOW,
                "server",
                "--app-name",
                "basic-auth",
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
                "--backend-store-uri",
                f"{PG}/{mlflow_db}",
                "--serve-artifacts",
                "--artifacts-destination",
                (home / "mlflow-artifacts").as_uri(),
                "--workers",
                "1",
            ],
        )
        wait_healthy(api, server, timeout_s=180)
        wait_healthy(mlflow_uri, tracking, timeout_s=180)  # MLflow answers /health too
        prefect("work-pool", "create", "relift-local", "--type", "process")
        prefect("--no-prompt", "deploy", "--name", "train")
        for i in range(2):  # two machines' workers, one run at a time each
            start(
                f"worker-{i}",
                [
                    PREFECT,
                    "worker",
                    "start",
                    "--pool",
                    "relift-local",
                    "--limit",
                    "1",
                    "--name",
                    f"worker-{i}",
                ],
            )
        yield {"env": env, "api": api, "mlflow_uri": mlflow_uri, "home": home, "secret": secret}
    finally:
        for proc in reversed(procs):
            stop_process(proc, grace_s=20)
        for log in logs:
            log.close()


def _held(flow_run) -> tuple:
    """(claimed, ended): from the worker's PENDING state to the run's final state."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        states = client.read_flow_run_states(flow_run.id)
    claimed = min(s.timestamp for s in states if s.type.value == "PENDING")
    return claimed, flow_run.end_time


def _logs(home: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(home.glob("*.log")))


def test_the_team_stack_refuses_unauthenticated_requests(team_stack):
    """What the issue did against an open server: create a flow (the first of three POSTs
    that ended in a worker running a shell step) and an MLflow experiment, without
    credentials; and a web page of another origin reading the Prefect API."""
    import json
    import urllib.error
    import urllib.request

    def post(url: str, body: dict, headers: dict | None = None) -> int:
        request = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code

    assert post(f"{team_stack['api']}/flows/", {"name": "pwn"}) == 401
    mlflow_create = f"{team_stack['mlflow_uri']}/api/2.0/mlflow/experiments/create"
    assert post(mlflow_create, {"name": "pwn"}) == 401
    # With the credentials both answer (so the 401s above are the authentication's).
    import base64

    token = base64.b64encode(team_stack["env"]["PREFECT_API_AUTH_STRING"].encode()).decode()
    assert post(f"{team_stack['api']}/flows/filter", {}, {"Authorization": f"Basic {token}"}) == 200
    preflight = urllib.request.Request(
        f"{team_stack['api']}/flows/filter",
        method="OPTIONS",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    try:
        with urllib.request.urlopen(preflight, timeout=30) as response:
            allowed = response.headers.get("access-control-allow-origin")
    except urllib.error.HTTPError as e:
        allowed = e.headers.get("access-control-allow-origin")
    assert allowed in (None, f"http://127.0.0.1:{team_stack['api'].split(':')[2].split('/')[0]}")


def test_sweep_fans_out_over_two_workers(team_stack, tiny_overrides, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from flows.sweep import sweep

    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, team_stack["env"][key])
    prefect_settings = {
        PREFECT_API_URL: team_stack["api"],
        PREFECT_API_AUTH_STRING: team_stack["env"]["PREFECT_API_AUTH_STRING"],
    }
    overrides = [
        *tiny_overrides,
        "run.iterations=2",
        "eval.benchmarks=[]",
        f"run.workdir={tmp_path / 'runs'}",
    ]
    # The second threshold fails in its child (validation), after the sweep has started.
    grid = {"algorithm.sft_buffer_threshold": [3, 0]}

    def run_sweep():
        with temporary_settings(prefect_settings):
            state = sweep(
                preset="toy",
                algorithms=["rl", "relift"],
                seeds=[0],
                grid=grid,
                overrides=overrides,
                name="fan",
                train_deployment="train/train",
                return_state=True,
            )
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs()
        return state, [r for r in runs if r.name.startswith("train-") and "-fan-" in r.name]

    state, children = run_sweep()
    assert state.is_failed(), state  # one point cannot run: the sweep says so ...
    assert "2 of 4 sweep runs failed" in state.message and "threshold0" in state.message
    done = {r.name: r for r in children if r.state.is_completed()}
    assert len(done) == 2, ([(r.name, r.state.type) for r in children], _logs(team_stack["home"]))
    # ... the others ran; and the two workers held children at the same time. A child holds
    # its worker from PENDING (the worker claimed it and starts its process, ~10 s on 2 cores)
    # to its end; the flow bodies alone (~4 s) are too short to overlap reliably.
    with temporary_settings(prefect_settings):
        held = {r.name: _held(r) for r in children}
    spans = sorted(held.values())
    assert any(later[0] < earlier[1] for earlier, later in itertools.combinations(spans, 2)), held

    client = MlflowClient(team_stack["mlflow_uri"])
    exp = client.get_experiment_by_name("relift")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("relift.kind") == "sweep"]
    assert len(parents) == 1
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert {r.info.run_name for r in nested if r.info.status == "FINISHED"} == {
        n.removeprefix("train-") for n in done
    }
    # Artifacts went to the tracking server, not to the workers' disks.
    finished = next(r for r in nested if r.info.status == "FINISHED")
    assert finished.info.artifact_uri.startswith("mlflow-artifacts:")
    assert "config.yaml" in {f.path for f in client.list_artifacts(finished.info.run_id)}

    # Re-run: the finished children are not run again; only the failing ones are retried.
    state, again = run_sweep()
    assert state.is_failed()
    assert sum(r.name in done for r in again) == len(done)  # no new run of a finished point
    assert len(again) == len(children) + 2
