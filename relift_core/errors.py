"""UserError: the one family of errors a user fixes -- a config value, a data row, a checkpoint,
a run directory another process holds, a missing engine. Whatever raises one, the CLI prints its
message as one line and exits with its `exit_code` (2 for a config, 1 otherwise), and a Prefect
task does not retry it (tasks/retry.py): it fails the same way every time. Anything else is a
bug or a hiccup: a full traceback, and a retry where the task allows one."""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors a user fixes. Subclasses also derive from the builtin they stand for
    (ValueError, RuntimeError, ImportError), so code catching those keeps working."""

    exit_code = 1


def user_error_exit_code(exc: BaseException) -> int | None:
    """The exit code of a user error, None for anything else. pydantic's ValidationError (a
    config value of the wrong type or range, raised before our ConfigError wraps it) counts as
    a config error."""
    if isinstance(exc, UserError):
        return exc.exit_code
    from pydantic import ValidationError

    return 2 if isinstance(exc, ValidationError) else None
