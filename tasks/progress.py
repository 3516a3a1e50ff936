"""Terminal progress for CLI runs: a rich progress bar per training run and per long phase
(transient: gone once done), `say`, one line per finished phase, and `log_and_say`, a flow log
line the terminal shows too. Flows report to it; under a Prefect worker or a flow called from
Python (no CLI) nothing is shown here, and the flow's logs, the Prefect UI's progress artifact
and task states carry the same information."""

from __future__ import annotations

import logging
from contextlib import contextmanager

from rich import get_console
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

_progress: Progress | None = None
# Whether the flows' logs reach the terminal too (`relift --verbose`): then `log_and_say`
# leaves its line to the log handler instead of printing it twice.
_logs_on_terminal = True


@contextmanager
def terminal_progress(console: Console | None = None):
    """Bars and `say` lines on `console` (the CLI's terminal). Given a console, the display
    leaves sys.stdout and sys.stderr alone: rich would otherwise route them onto the terminal,
    and with them the libraries' output the CLI sends to its log file (flows.cli)."""
    global _progress, _logs_on_terminal
    redirect = console is None
    _logs_on_terminal = redirect
    shown_on = console or get_console()
    _progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        redirect_stdout=redirect,
        redirect_stderr=redirect,
        transient=True,  # the lines said stay; the bars were only the meantime
        disable=not shown_on.is_terminal,  # a file or a pipe gets the lines said only
    )
    try:
        with _progress:
            yield _progress
    finally:
        _progress = None
        _logs_on_terminal = True


def say(line: str) -> None:
    """One line on the CLI's terminal, above any bars (nothing without a CLI)."""
    if _progress is not None:
        _progress.console.print(line, markup=False, highlight=False, soft_wrap=True)


def log_and_say(logger: logging.Logger | logging.LoggerAdapter, line: str, warn: bool = False):
    """`line` in the flow's log (the Prefect UI keeps it) and on the CLI's terminal, where the
    CLI sends the logs to a file: a training's iteration lines and its resume notices."""
    logger.log(logging.WARNING if warn else logging.INFO, line)
    if not _logs_on_terminal:
        say(f"warning: {line}" if warn else line)


def start(description: str, total: int, completed: int = 0):
    if _progress is None:
        return None
    return _progress.add_task(description, total=total, completed=completed, info="")


def advance(task_id, info: str = "") -> None:
    """One step more on the bar `start` drew; a finished bar is removed (a sweep's next run
    draws its own)."""
    if _progress is not None and task_id is not None:
        _update(_progress, task_id, advance=1, info=info)


def callback(description: str):
    """A `progress(done, total)` callback drawing one bar, for library functions that take one;
    the bar is removed once done reaches total."""
    if _progress is None:
        return None
    progress = _progress
    task_id = progress.add_task(description, total=None, info="")

    def update(done: int, total: int) -> None:
        _update(progress, task_id, completed=done, total=total)

    return update


def _update(progress: Progress, task_id, **fields) -> None:
    """Update a bar, and remove it once finished (a removed bar takes no more updates)."""
    task = next((t for t in progress.tasks if t.id == task_id), None)
    if task is None:
        return
    progress.update(task_id, **fields)
    if task.finished:
        progress.remove_task(task_id)


class HideRoutineTaskStates(logging.Filter):
    """Drops a task run's "Finished in state Completed()" record; failures, retries and flow
    runs pass. A task run that completed says nothing a user needs (seven per iteration buried
    the one `iter i:` line), and the Prefect UI keeps every task run's state."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.name.startswith("prefect.task_runs")
            and record.getMessage().startswith("Finished in state Completed")
        )
