"""Terminal progress for CLI runs: a rich progress bar per training run. Flows report to it;
under a Prefect worker (no CLI) nothing is shown here and the Prefect UI's progress artifact
and task states carry the same information."""

from __future__ import annotations

import logging
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

_progress: Progress | None = None


@contextmanager
def terminal_progress():
    global _progress
    _progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                         TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
    try:
        with _progress:
            yield _progress
    finally:
        _progress = None


def start(description: str, total: int, completed: int = 0):
    if _progress is None:
        return None
    return _progress.add_task(description, total=total, completed=completed, info="")


def advance(task_id, info: str = "") -> None:
    if _progress is not None and task_id is not None:
        _progress.update(task_id, advance=1, info=info)


def callback(description: str):
    """A `progress(done, total)` callback drawing one bar, for library functions that take one."""
    if _progress is None:
        return None
    task_id = _progress.add_task(description, total=None, info="")

    def update(done: int, total: int) -> None:
        _progress.update(task_id, completed=done, total=total)

    return update


class HideRoutineTaskStates(logging.Filter):
    """Drops a task run's "Finished in state Completed()" record; failures, retries and flow
    runs pass. A task run that completed says nothing a user needs (seven per iteration buried
    the one `iter i:` line), and the Prefect UI keeps every task run's state."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("prefect.task_runs")
                    and record.getMessage().startswith("Finished in state Completed"))
