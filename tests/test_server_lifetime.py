"""No server outlives the command that started it: a SIGKILLed `relift train` takes its
temporary Prefect server with it, and `relift ui` stops both UIs on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request

import psutil
import pytest

from tests.commands import RELIFT, REPO, command_log, own_prefect_env, run_command, start_relift_ui

pytestmark = pytest.mark.slow


def _temporary_servers(parent: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "flows.temporary_server" in cmd and str(parent) in cmd:
            found.append(proc)
    return found


def test_a_killed_train_takes_its_temporary_prefect_server_with_it(
    wait_until, tiny_overrides, tmp_path
):
    overrides = tiny_overrides + [
        f"run.workdir={tmp_path}",
        "run.iterations=500",
        "eval.benchmarks=[]",
        "run.name=killed",
    ]
    cli = subprocess.Popen(
        [RELIFT, "train", "-p", "toy", *overrides],
        cwd=REPO,
        env=own_prefect_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        (server,) = wait_until(lambda: _temporary_servers(cli.pid), 120, "the temporary server")
        # Training has started: the run directory exists, so the server is in use.
        wait_until(lambda: (tmp_path / "killed").exists(), 240, "the run to start")
        assert server.is_running()
        cli.send_signal(signal.SIGKILL)
        cli.wait(timeout=10)
        server.wait(timeout=30)  # raises psutil.TimeoutExpired if it outlives the CLI
    finally:
        if cli.poll() is None:
            cli.kill()
        for leftover in _temporary_servers(cli.pid):
            leftover.kill()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _answers(request) -> bool:
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def test_relift_ui_stops_both_servers_on_sigterm(wait_until, tmp_path):
    env = own_prefect_env(PREFECT_HOME=str(tmp_path / "prefect-home"))
    ui, prefect_port, mlflow_port = start_relift_ui(tmp_path, env)
    try:
        wait_until(
            lambda: _listening(prefect_port) and _listening(mlflow_port), 180, "both UIs to listen"
        )
        children = psutil.Process(ui.pid).children(recursive=True)
        assert children
        # Another site's page may not call the Prefect API (Prefect's default answers any origin).
        request = urllib.request.Request(
            f"http://127.0.0.1:{prefect_port}/api/health", headers={"Origin": "http://evil.example"}
        )
        wait_until(lambda: _answers(request), 60, "the Prefect API")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.headers.get("access-control-allow-origin") in (None, ""), dict(
                response.headers
            )
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=60)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
        assert not _listening(prefect_port) and not _listening(mlflow_port)
    finally:
        if ui.poll() is None:
            ui.kill()
        for child in psutil.Process().children(recursive=True):
            if child.pid != os.getpid():
                with_cmd = " ".join(child.cmdline())
                if "ui" in with_cmd or "server" in with_cmd:
                    child.kill()


def test_links_outlive_the_command_and_runs_stay_in_the_work_directory(
    wait_until, tiny_overrides, tmp_path
):
    """A train on a temporary server: its links (console, MLflow tag, description) name the UI
    `relift ui` serves (:4200), never the temporary port; the flow run is kept in
    <workdir>/prefect.db, so `relift ui --workdir` shows it later; while that UI runs, commands
    on the work directory report to it."""
    train = run_command(
        [
            RELIFT,
            "train",
            "-p",
            "toy",
            *tiny_overrides,
            "run.name=linked",
            f"run.workdir={tmp_path}",
            "eval.benchmarks=[]",
            "run.iterations=1",
        ],
        env=own_prefect_env(),
        timeout=600,
    )
    out = train.stdout + train.stderr
    assert train.returncode == 0, out
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(
        [client.get_experiment_by_name("relift").experiment_id],
        filter_string="attributes.run_name = 'linked'",
    )
    flow_run_id = run.data.tags["prefect.flow_run_id"]
    link = f"http://127.0.0.1:4200/runs/flow-run/{flow_run_id}"
    assert run.data.tags["prefect.flow_run_url"] == link
    assert link in run.data.tags["mlflow.note.content"]
    assert f"Prefect {link}" in out
    views = [line for line in command_log(tmp_path, "train").splitlines() if "View at" in line]
    assert views and all("http://127.0.0.1:4200/" in line for line in views), views
    assert (tmp_path / "prefect.db").exists()

    ui, prefect_port, mlflow_port = start_relift_ui(tmp_path, own_prefect_env())
    try:
        api = f"http://127.0.0.1:{prefect_port}/api"
        wait_until(lambda: _answers(f"{api}/health"), 180, "the Prefect API of relift ui")
        with urllib.request.urlopen(f"{api}/flow_runs/{flow_run_id}", timeout=10) as response:
            assert json.loads(response.read())["name"] == "train-linked"
        # A command on this work directory now reports to the UI's server, links included.
        from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

        from flows.temporary_server import prefect_api

        env_before = os.environ.get("PREFECT_API_URL")
        os.environ.pop("PREFECT_API_URL", None)
        try:
            # As in a fresh CLI process: no API set (the suite's session server sets one in
            # this process's settings context once any earlier test has used it).
            with (
                temporary_settings(restore_defaults={PREFECT_API_URL, PREFECT_UI_URL}),
                prefect_api(tmp_path) as temporary,
            ):
                assert temporary is None
                assert PREFECT_API_URL.value() == api
                assert PREFECT_UI_URL.value() == f"http://127.0.0.1:{prefect_port}"
        finally:
            if env_before is not None:
                os.environ["PREFECT_API_URL"] = env_before
    finally:
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=60)
    assert not (tmp_path / "ui.json").exists()


_PROCESS_POOL_FLOW = """
import sys
from prefect import flow, task
from prefect.task_runners import ProcessPoolTaskRunner

from flows.temporary_server import prefect_api


@task(name="counted")
def counted(x):
    return x + 1


@flow(name="pooled", task_runner=ProcessPoolTaskRunner(max_workers=1))
def pooled():
    return [f.result() for f in counted.map([1, 2])]


if __name__ == "__main__":
    with prefect_api(sys.argv[1]):
        print("result", pooled())
"""


def test_process_pool_workers_report_to_the_commands_server(tmp_path):
    """The demo's task runner (ProcessPoolTaskRunner) forwards its workers' events from a thread
    that reads Prefect's process-global settings: with those left as they were at import (no
    API), Prefect started an ephemeral server for that thread, whose database has none of the
    flow runs, and logged FOREIGN KEY failures for every event until the command ended
    (127,000 lines in one `make demo`)."""
    script = tmp_path / "pooled.py"
    script.write_text(_PROCESS_POOL_FLOW)
    home = tmp_path / "prefect-home"
    done = run_command(
        [sys.executable, str(script), str(tmp_path / "work")],
        env=own_prefect_env(PYTHONPATH=str(REPO), PREFECT_HOME=str(home)),
        timeout=300,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "result [2, 3]" in out
    assert "Starting temporary server" not in out, out
    assert "FOREIGN KEY" not in out and "Error flushing" not in out, out
    assert not (home / "prefect.db").exists()  # no ephemeral server's store was made
