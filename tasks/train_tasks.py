"""The phases of a training iteration as Prefect tasks: one task per `relift_core.iteration.Phases`
method, nothing else. The loop itself (order of phases, run-state bookkeeping) is
`relift_core.iteration.run_iteration`; the `train` flow hands it `PREFECT_PHASES`.

`PHASE_TABLE` is the one list of them: each row names a `Phases` method, the task name shown in
the Prefect UI and the task's retry options; the tasks (`PHASE_TASKS`) and `PrefectPhases` are
built from it.

Tasks take the in-memory TrainSession (model, engine, trainer), so they never hash or persist
their inputs (NO_CACHE). quote() keeps Prefect from walking every object reachable from a task's
arguments (the dataset, token lists, the buffer) looking for upstream futures: measured at ~90%
of a tiny model's iteration (scripts/bench_orchestration.py). Engine and training tasks retry
with backoff; a task that still fails fails the flow, and its error shows in the Prefect UI.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from relift_core.iteration import Phases
from tasks.progress import HideRoutineTaskStates
from tasks.retry import retry_unless_permanent

# An engine hiccup may pass on a retry; bad data or a diverged update never does.
ENGINE_RETRIES: Mapping[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": [2, 10],
    "retry_condition_fn": retry_unless_permanent,
}
# Writing a checkpoint is local disk I/O: retried sooner than an engine.
CHECKPOINT_RETRIES: Mapping[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": [1, 5],
    "retry_condition_fn": retry_unless_permanent,
}


@dataclass(frozen=True)
class PhaseTask:
    """One phase as a Prefect task: the `Phases` method it runs, the task's name in the
    Prefect UI, and its retry options (none: a failure fails the flow at once)."""

    method: str
    name: str
    retries: Mapping[str, Any] = field(default_factory=dict)


# Every Phases method but draw_questions: an in-memory read of the question stream that cannot
# fail or be retried usefully, so a task run's bookkeeping would only cost time.
PHASE_TABLE: tuple[PhaseTask, ...] = (
    PhaseTask("rollout", "rollout", ENGINE_RETRIES),
    PhaseTask("grade", "grade", ENGINE_RETRIES),
    PhaseTask("classify", "classify-difficulty"),  # bookkeeping in memory: nothing to retry
    PhaseTask("collect_demonstrations", "collect-demonstrations", ENGINE_RETRIES),
    PhaseTask("mix_demonstrations", "mix-demonstrations", ENGINE_RETRIES),
    PhaseTask("rl_update", "rl-update", ENGINE_RETRIES),
    PhaseTask("sft_update", "sft-update", ENGINE_RETRIES),
    PhaseTask("checkpoint", "checkpoint", CHECKPOINT_RETRIES),
)

_CORE = Phases()
# Phases method name -> its Prefect task (running the plain Phases method).
PHASE_TASKS: dict[str, Task] = {
    row.method: task(name=row.name, cache_policy=NO_CACHE, **row.retries)(
        getattr(_CORE, row.method)
    )
    for row in PHASE_TABLE
}


def _as_task_run(method: str) -> Callable[..., Any]:
    """The override of `Phases.<method>` that runs it as its task, every argument quoted (the
    module docstring says why); same signature and docstring as the method it replaces."""
    phase_task = PHASE_TASKS[method]

    @functools.wraps(getattr(Phases, method))
    def run_as_task(self: Phases, *args: Any, **kwargs: Any) -> Any:
        return phase_task(
            *(quote(a) for a in args), **{name: quote(v) for name, v in kwargs.items()}
        )

    return run_as_task


class PrefectPhases(Phases):
    """Each phase of `PHASE_TABLE` as its Prefect task run; the others (drawing the next
    questions) run directly, as in `Phases`. Its methods are set from the table below."""


for _row in PHASE_TABLE:
    setattr(PrefectPhases, _row.method, _as_task_run(_row.method))

PREFECT_PHASES = PrefectPhases()


@contextlib.contextmanager
def quiet_completed_phases() -> Iterator[None]:
    """Within the training loop, a phase's successful end is not logged at all (the CLI hides
    it from the console anyway, HideRoutineTaskStates): under a worker or a direct call each line
    would be printed and sent to the API, seven times an iteration
    (`scripts/bench_orchestration.py --parts` times a task run with and without it)."""
    logger = logging.getLogger("prefect.task_runs")
    drop = HideRoutineTaskStates()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
