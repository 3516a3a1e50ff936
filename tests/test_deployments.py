"""prefect.yaml for real: a `prefect server`, `relift deploy` (the work pool, `prefect deploy
--all`), a process worker started as it says, and a deployment run of a tiny train that must
complete."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request

import pytest

from flows.cli import prefect_server_command
from flows.temporary_server import free_port, stop_process, wait_healthy
from tests.commands import PREFECT, RELIFT, REPO, own_prefect_env, run_command

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A real `prefect server` (SQLite, as `prefect server start` makes it), the project's
    prefect.yaml deployed to a process pool by `relift deploy`. Yields (env, run, server log
    path, what `relift deploy` printed)."""
    home = tmp_path_factory.mktemp("prefect")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    # No RELIFT_REPO_DIR: `relift deploy` and the worker command it prints supply it.
    env = {
        **os.environ,
        "PREFECT_HOME": str(home / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        # The scheduler visits deployments every 60 s by default; the test need not wait.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
    }
    env.pop("PREFECT_API_KEY", None)
    env.pop("RELIFT_REPO_DIR", None)
    log_path = home / "server.log"
    log = open(log_path, "w")  # noqa: SIM115  (closed at teardown)
    server = subprocess.Popen(
        prefect_server_command(port), env=env, stdout=log, stderr=subprocess.STDOUT
    )

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return run_command([PREFECT, *args], env=env, timeout=timeout)

    try:
        wait_healthy(api, server, timeout_s=120)
        deploy = run_command([RELIFT, "deploy"], env=env, timeout=300)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        yield env, run, log_path, deploy.stdout
    finally:
        stop_process(server, grace_s=20)
        log.close()


def test_the_weekly_sweep_gets_scheduled_runs(deployed):
    """What the SQLAlchemy pin is for: with SQLAlchemy 2.1 the scheduler fails every loop
    (`Can't evaluate bulk DML statement`) and the weekly deployment never gets a run."""
    env, _, log_path, _ = deployed
    api = env["PREFECT_API_URL"]
    deadline = time.time() + 120
    scheduled: list[dict] = []
    while time.time() < deadline and not scheduled:
        body = json.dumps(
            {
                "deployments": {"name": {"any_": ["weekly-rl-sft-relift"]}},
                "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
            }
        ).encode()
        request = urllib.request.Request(
            f"{api}/flow_runs/filter", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            scheduled = json.loads(response.read())
        if not scheduled:
            time.sleep(3)
    log = log_path.read_text()
    assert "bulk DML" not in log, log[-3000:]
    assert scheduled, "the weekly deployment has no scheduled run after 120 s:\n" + log[-3000:]
    # Mondays, 03:00 UTC, each run of the sweep dated (new runs every week, never a resume).
    starts = sorted(r["next_scheduled_start_time"] or r["expected_start_time"] for r in scheduled)
    assert all(s[11:16] == "03:00" for s in starts), starts
    assert all(r["parameters"].get("dated") is True for r in scheduled)


def test_relift_deploy_then_the_worker_it_names_runs_a_deployment(
    deployed, tiny_overrides, tmp_path
):
    env, run, log_path, printed = deployed
    assert "work pool relift-local: created" in printed, printed
    assert f"{env['PREFECT_API_URL'].removesuffix('/api')}/deployments" in printed
    # The worker command as printed (its environment given inline).
    (command,) = [line.strip() for line in printed.splitlines() if "prefect worker start" in line]
    assert command.endswith("prefect worker start --pool relift-local")
    assert f"RELIFT_REPO_DIR={REPO}" in command
    r = run("deployment", "ls")
    for name in ("train/train", "evaluate/evaluate", "sweep/weekly-rl-sft-relift"):
        assert name in r.stdout.replace("\n", " ") or name.split("/")[1] in r.stdout, r.stdout
    overrides = tiny_overrides + [
        "algorithm.name=relift",
        "run.name=deployed",
        f"run.workdir={tmp_path / 'runs'}",
        "eval.benchmarks=[]",
    ]
    log = open(tmp_path / "worker.log", "w")  # noqa: SIM115  (closed in finally)
    worker_env = {**env, **dict(part.split("=", 1) for part in command.split()[:2])}
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "relift-local"],
        env=worker_env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        r = run(
            "deployment",
            "run",
            "train/train",
            "--param",
            "preset=toy",
            "--param",
            f"overrides={json.dumps(overrides)}",
            "--watch",
            "--watch-timeout",
            "600",
            timeout=700,
        )
        out = r.stdout + r.stderr
        assert r.returncode == 0 and "Completed" in out, (
            out + (tmp_path / "worker.log").read_text()[-4000:] + log_path.read_text()[-2000:]
        )
        assert (tmp_path / "runs" / "deployed" / "checkpoints").is_dir()
    finally:
        stop_process(worker, grace_s=20)
        log.close()


def test_relift_deploy_again_keeps_the_pool(deployed):
    env, _, _, _ = deployed
    again = run_command([RELIFT, "deploy"], env=env, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "work pool relift-local: exists" in again.stdout
    assert "weekly-rl-sft-relift" in again.stdout


def test_relift_deploy_without_a_prefect_api_says_what_to_do(tmp_path):
    env = own_prefect_env(PREFECT_HOME=str(tmp_path / "prefect-home"))  # no profile's API
    done = run_command([RELIFT, "deploy", "--workdir", str(tmp_path)], env=env, timeout=120)
    assert done.returncode == 2
    assert "set PREFECT_API_URL" in done.stderr and "relift ui" in done.stderr


def test_deployment_parameters_are_typed_and_documented(deployed):
    """The Prefect UI's run form shows each parameter's type and what it means."""
    env, _, _, _ = deployed
    url = f"{env['PREFECT_API_URL']}/deployments/name/train/train"
    with urllib.request.urlopen(url, timeout=10) as response:
        schema = json.loads(response.read())["parameter_openapi_schema"]["properties"]
    assert "array" in json.dumps(schema["overrides"])  # a list of strings, not free text
    for name in ("preset", "overrides", "parent_mlflow_run_id"):
        assert schema[name].get("description"), (name, schema[name])
    assert "sweep" in schema["parent_mlflow_run_id"]["description"]
