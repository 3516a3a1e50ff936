"""Which task failures are worth a retry. An engine hiccup may pass; bad data, a bad config, a
checkpoint that cannot be written (a full disk, an I/O error: CheckpointWriteError) or a
diverged update fails the same way every time, so retrying only delays the error."""

from __future__ import annotations

from relift_core.config import ConfigError
from relift_core.data.examples import DataError
from relift_core.runtime.checkpoint import CheckpointError
from relift_core.runtime.trainer import DivergenceError


def is_permanent_error(exc: BaseException) -> bool:
    """DataError and ConfigError are ValueErrors, and so is pydantic's ValidationError."""
    return isinstance(exc, (DataError, ConfigError, ValueError, DivergenceError, CheckpointError))


def retry_unless_permanent(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry a failed run unless its error `is_permanent_error`."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 (the failure being judged, whatever it is)
        return not is_permanent_error(exc)
    return True
