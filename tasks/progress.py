"""Terminal progress for CLI runs: a rich progress bar per training run, and `say`, one line
per finished phase. Flows report to it; under a Prefect worker or a flow called from Python (no
CLI) nothing is shown here, and the flow's logs, the Prefect UI's progress artifact and task
states carry the same information."""

from __future__ import annotations

import logging
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

_progress: Progress | None = None


@contextmanager
def terminal_progress(console: Console | None = None):
    """Bars and `say` lines on `console` (the CLI's terminal). Given a console, the display
    leaves sys.stdout and sys.stderr alone: rich would otherwise route them onto the terminal,
    and with them the libraries' output the CLI sends to its log file (`relift demo`)."""
    global _progress
    redirect = console is None
    _progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        redirect_stdout=redirect,
        redirect_stderr=redirect,
    )
    try:
        with _progress:
            yield _progress
    finally:
        _progress = None


def say(line: str) -> None:
    """One line on the CLI's terminal, above any bars (nothing without a CLI)."""
    if _progress is not None:
        _progress.console.print(line, markup=False, highlight=False, soft_wrap=True)


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
        return not (
            record.name.startswith("prefect.task_runs")
            and record.getMessage().startswith("Finished in state Completed")
        )
