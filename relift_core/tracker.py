"""The Tracker seam: what the core reports about a run. MLflow implements it in `tasks/`;
the core only sees this protocol, so it never imports MLflow."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None: ...


@dataclass
class InMemoryTracker:
    """Keeps everything in lists: for tests and for runs without MLflow."""

    params: dict[str, Any] = field(default_factory=dict)
    metrics: list[tuple[int | None, dict[str, float]]] = field(default_factory=list)
    artifacts: list[tuple[str, str | None]] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((str(path), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.texts[artifact_file] = text

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        self.tables[artifact_file] = list(rows)

    def history(self, key: str) -> list[float]:
        return [m[key] for _, m in self.metrics if key in m]
