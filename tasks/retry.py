"""Which task failures are worth a retry. An engine hiccup may pass; bad data, a bad config, a
checkpoint that cannot be written (a full disk, an I/O error: CheckpointWriteError) or a
diverged update fails the same way every time, so retrying only delays the error."""

from __future__ import annotations

from relift_core.errors import user_error_exit_code


def is_permanent_error(exc: BaseException) -> bool:
    """A user error (relift_core.errors.UserError: config, data, checkpoint, divergence, a
    locked or refused run) fails the same way every time; the CLI reports the same family as
    one line. Anything else may be a hiccup."""
    return user_error_exit_code(exc) is not None


def retry_unless_permanent(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry a failed run unless its error `is_permanent_error`."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 (the failure being judged, whatever it is)
        return not is_permanent_error(exc)
    return True
