"""A temporary Prefect server that never outlives the process that started it.

With no `PREFECT_API_URL`, Prefect starts a temporary server itself (a uvicorn subprocess) and
stops it from an `atexit` hook. A CLI process that is SIGKILLed never runs that hook, so every
killed run used to leave a server behind (~200 MB each). The CLI therefore starts the same
server itself (Prefect's own app factory, UI off, as Prefect does) under a watchdog thread that
shuts it down as soon as its parent is gone, whatever killed the parent, and points Prefect at
it for the duration. With `PREFECT_API_URL` set, a real server is used and nothing is started.

Links that last: the temporary server keeps its flow runs in the work directory's own database
(`<workdir>/prefect.db`, as MLflow's store is `<workdir>/mlflow.db`), the one `relift ui
--workdir <workdir>` serves, and Prefect's UI address (PREFECT_UI_URL: the "View at" lines, the
MLflow runs' `prefect.flow_run_url`) is that UI's, `http://127.0.0.1:4200`, never the temporary
server's port, gone when the command ends. While `relift ui` runs for the work directory
(`<workdir>/ui.json`, tasks/running_ui.py), commands report to it instead of starting a server.

    python -m flows.temporary_server --parent PID --port PORT --database DB  # `prefect_api()`
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tasks.running_ui import running_ui

# How often the watchdog looks for its parent, and how long uvicorn gets to stop cleanly.
WATCH_INTERVAL_S = 0.5
SHUTDOWN_GRACE_S = 10.0
# Where `relift ui` serves the Prefect UI by default: the address stored links point at.
DEFAULT_UI_PORT = 4200


def prefect_database(workdir: str | Path) -> Path:
    """The work directory's Prefect database (flow runs, artifacts, deployments)."""
    return Path(workdir).resolve() / "prefect.db"


# How long the server's SQLite connections wait for the writer lock. Prefect's default, 10 s,
# is shorter than a loaded 2-core machine can hold it while two trainings and their flow report
# at once: the server then answers 503 and, after the client's retries, a training's subflow
# fails to start (seen in a 6-method demo).
SQLITE_BUSY_TIMEOUT_S = 60


def database_env(database: str | Path) -> dict[str, str]:
    """What points a Prefect server at `database` (a SQLite file)."""
    return {
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{Path(database).resolve()}",
        "PREFECT_SERVER_DATABASE_TIMEOUT": str(SQLITE_BUSY_TIMEOUT_S),
    }


def lasting_ui_url(workdir: str | Path) -> str:
    """The Prefect UI that `relift ui --workdir <workdir>` serves (or serves now)."""
    running = running_ui(workdir)
    if running:
        return running["ui"]
    return f"http://127.0.0.1:{DEFAULT_UI_PORT}"


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Until `url`/health answers 200; raises if `proc` (the server) exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server at {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the server at {url} did not answer in {timeout_s:.0f} s")


@contextlib.contextmanager
def prefect_api(workdir: str | Path = "runs", timeout_s: float = 180.0) -> Iterator[str | None]:
    """Use `PREFECT_API_URL` if set; else the work directory's running `relift ui`; otherwise
    run a temporary server on the work directory's database for the block. Yields the
    temporary server's API URL (None when a lasting server is used)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        yield None
        return
    Path(workdir).mkdir(parents=True, exist_ok=True)
    ui = running_ui(workdir)
    if ui is not None:
        with _pointed_at(ui["api"], ui["ui"]):
            yield None
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.temporary_server",
            "--parent",
            str(os.getpid()),
            "--port",
            str(port),
            "--database",
            str(prefect_database(workdir)),
        ],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        wait_healthy(url, proc, timeout_s)
        # The UI named in links: the user's PREFECT_UI_URL, else the one `relift ui` serves.
        with _pointed_at(url, os.environ.get("PREFECT_UI_URL") or lasting_ui_url(workdir)):
            yield url
    finally:
        if proc.poll() is None:  # a server already gone (the same Ctrl-C) takes nothing more
            drain_prefect_clients()  # queued logs and events reach the server before it stops
        stop_process(proc)


@contextlib.contextmanager
def _pointed_at(api_url: str, ui_url: str) -> Iterator[None]:
    """Prefect's API and UI addresses for the block, in this process's settings and in the
    environment (worker processes the flows start inherit them)."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    previous = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_UI_URL")}
    os.environ.update({"PREFECT_API_URL": api_url, "PREFECT_UI_URL": ui_url})
    # Threads that Prefect starts without copying the caller's context (ProcessPoolTaskRunner's
    # forwarder of its workers' events and logs) read the process-global settings, made at
    # import with no API: their events went to an ephemeral server Prefect started for them,
    # whose database has none of the flow runs (FOREIGN KEY failures logged without end).
    refresh_global_settings_context()
    try:
        with temporary_settings({PREFECT_API_URL: api_url, PREFECT_UI_URL: ui_url}):
            yield
    finally:
        drain_prefect_clients()  # logs and events still queued reach the server before it stops
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        refresh_global_settings_context()


def drain_prefect_clients(timeout_s: float = 5.0) -> None:
    """Send the log and event batches Prefect still holds (otherwise they are sent after the
    server is gone and print "Error logging to API")."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout_s)
        except Exception as e:  # noqa: BLE001 - shutting down: a failed drain only loses logs
            print(f"prefect {worker.__name__} not drained: {e}", file=sys.stderr)


def stop_process(proc: subprocess.Popen, grace_s: float = SHUTDOWN_GRACE_S) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `grace_s`."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _watch_parent(parent: int) -> None:
    """Stop this server once `parent` is gone (re-parented: os.getppid() changes)."""
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL_S)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
    time.sleep(SHUTDOWN_GRACE_S)
    os._exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database", required=True, help="the work directory's prefect.db")
    args = parser.parse_args()
    if os.getppid() != args.parent:
        sys.exit(f"parent {args.parent} is already gone")
    # What Prefect's own temporary server sets: no UI, an ephemeral server's settings.
    os.environ.update(
        {
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            # Prefect answers any origin by default; only its own may call it.
            "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": f"http://127.0.0.1:{args.port}",
            # A 503 names its cause in the command's log (the database error behind it).
            "PREFECT_SERVER_LOG_RETRYABLE_ERRORS": "1",
            **database_env(args.database),
        }
    )
    threading.Thread(target=_watch_parent, args=(args.parent,), daemon=True).start()
    import uvicorn

    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=args.port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    main()
