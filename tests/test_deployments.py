"""prefect.yaml for real: a `prefect server`, `prefect deploy --all`, a process worker, and a
deployment run of a tiny train that must complete."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_flows import TINY

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(api: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError("prefect server did not become healthy")


def test_deploy_all_and_run_train_through_a_worker(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "RELIFT_REPO_DIR": str(REPO), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_CLI_PROMPT": "false"}
    env.pop("PREFECT_API_KEY", None)
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115  (closed in finally)
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    worker = None
    try:
        _wait_healthy(api, server)
        def run(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=REPO,
                                  capture_output=True, text=True, timeout=300, check=False)

        r = run("work-pool", "create", "relift-local", "--type", "process")
        assert r.returncode == 0, r.stdout + r.stderr
        r = run("--no-prompt", "deploy", "--all")
        assert r.returncode == 0, r.stdout + r.stderr
        r = run("deployment", "ls")
        for name in ("train/train", "evaluate/evaluate", "sweep/weekly-rl-sft-relift"):
            assert name in r.stdout.replace("\n", " ") or name.split("/")[1] in r.stdout, r.stdout

        overrides = TINY + ["algorithm.name=relift", "run.name=deployed",
                            f"run.workdir={tmp_path / 'runs'}", "eval.benchmarks=[]"]
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "relift-local"],
                                  env=env, cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT)
        r = run("deployment", "run", "train/train", "--param", "preset=toy",
                "--param", f"overrides={json.dumps(overrides)}", "--watch", "--watch-timeout", "600")
        out = r.stdout + r.stderr
        assert r.returncode == 0 and "Completed" in out, out + (tmp_path / "server.log").read_text()[-4000:]
        assert (tmp_path / "runs" / "deployed" / "checkpoints").is_dir()
    finally:
        for p in (worker, server):
            if p is not None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
        log.close()
