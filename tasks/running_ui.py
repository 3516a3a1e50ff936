"""The `relift ui` running for a work directory, as `<workdir>/ui.json` names it while it runs:
its Prefect API and UI and its MLflow UI. Commands on that work directory report to its Prefect
server, and the links they store and print name its pages (flows/temporary_server.py,
tasks/tracking.py)."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

UI_FILE = "ui.json"


def running_ui(workdir: str | Path) -> dict[str, str] | None:
    """{"api", "ui", "mlflow", "pid"} of the work directory's `relift ui` if that process is
    alive and its Prefect API answers; None otherwise (no file, a stale one)."""
    path = Path(workdir) / UI_FILE
    try:
        info = json.loads(path.read_text())
        os.kill(int(info["pid"]), 0)  # raises if that process is gone
        with urllib.request.urlopen(f"{info['api']}/health", timeout=2) as response:
            return info if response.status == 200 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
