"""The commands the end-to-end tests run as a user runs them: the `relift` CLI (its entry point,
or `python -m flows.cli`), scripts, `prefect`, and `relift ui` with its two servers. Each runs in
the repository root, in the environment its test chose; the test asserts on what comes back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import IO

from flows.temporary_server import free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RELIFT = str(BIN / "relift")
PREFECT = str(BIN / "prefect")
MLFLOW = str(BIN / "mlflow")


def own_prefect_env(**extra: str) -> dict[str, str]:
    """This process's environment, on one thread, without PREFECT_API_URL: the command finds
    its own Prefect server (a temporary one, or the work directory's `relift ui`), as a user's
    fresh shell does. `extra` is set on top."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env.pop("PREFECT_API_URL", None)
    return env


def python_cli(*args: str) -> list[str]:
    """`relift ARGS` as `python -m flows.cli ARGS`, with this interpreter."""
    return [sys.executable, "-m", "flows.cli", *args]


def run_command(
    argv: list[str], *, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `argv` to its end in the repository root (this process's environment unless `env`),
    its output captured as text. A failing exit does not raise: the test asserts on it, with the
    output in its message; running past `timeout` seconds raises TimeoutExpired."""
    return subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def start_relift_ui(
    workdir: Path, env: dict[str, str], output: int | IO = subprocess.DEVNULL
) -> tuple[subprocess.Popen, int, int]:
    """`relift ui --workdir WORKDIR` on two free ports, its stdout and stderr to `output`.
    Returns (the process, the Prefect port, the MLflow port); the test stops it."""
    prefect_port, mlflow_port = free_port(), free_port()
    ui = subprocess.Popen(
        [
            RELIFT,
            "ui",
            "--workdir",
            str(workdir),
            "--prefect-port",
            str(prefect_port),
            "--mlflow-port",
            str(mlflow_port),
        ],
        cwd=REPO,
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    return ui, prefect_port, mlflow_port


def command_log(workdir: str | Path, command: str) -> str:
    """What the libraries printed during the one `relift <command>` run on `workdir`: the log
    file flows.cli.command_console names on the command's first line (without --verbose)."""
    [log] = (Path(workdir) / "logs").glob(f"{command}-*.log")
    return log.read_text()
