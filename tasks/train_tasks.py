"""The phases of a training iteration as Prefect tasks: one task per `relift_core.iteration.Phases`
method, nothing else. The loop itself (order of phases, run-state bookkeeping) is
`relift_core.iteration.run_iteration`; the `train` flow hands it `PREFECT_PHASES`.

Tasks take the in-memory TrainSession (model, engine, trainer), so they never hash or persist
their inputs (NO_CACHE). quote() keeps Prefect from walking every object reachable from a task's
arguments (the dataset, token lists, the buffer) looking for upstream futures: measured at ~90%
of a tiny model's iteration (scripts/bench_orchestration.py). Engine and training tasks retry
with backoff; a task that still fails fails the flow, and its error shows in the Prefect UI.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from relift_core.iteration import Phases
from tasks.progress import HideRoutineTaskStates
from tasks.retry import retry_unless_permanent

# An engine hiccup may pass on a retry; bad data or a diverged update never does.
ENGINE_RETRIES = {
    "retries": 2,
    "retry_delay_seconds": [2, 10],
    "retry_condition_fn": retry_unless_permanent,
}
_CORE = Phases()

rollout_task = task(name="rollout", cache_policy=NO_CACHE, **ENGINE_RETRIES)(_CORE.rollout)
grade_task = task(name="grade", cache_policy=NO_CACHE, **ENGINE_RETRIES)(_CORE.grade)
classify_task = task(name="classify-difficulty", cache_policy=NO_CACHE)(_CORE.classify)
collect_task = task(name="collect-demonstrations", cache_policy=NO_CACHE, **ENGINE_RETRIES)(
    _CORE.collect_demonstrations
)
mix_task = task(name="mix-demonstrations", cache_policy=NO_CACHE, **ENGINE_RETRIES)(
    _CORE.mix_demonstrations
)
rl_update_task = task(name="rl-update", cache_policy=NO_CACHE, **ENGINE_RETRIES)(_CORE.rl_update)
sft_update_task = task(name="sft-update", cache_policy=NO_CACHE, **ENGINE_RETRIES)(_CORE.sft_update)
checkpoint_task = task(
    name="checkpoint",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[1, 5],
    retry_condition_fn=retry_unless_permanent,
)(_CORE.checkpoint)


class PrefectPhases(Phases):
    """Each phase as its Prefect task run (arguments quoted, see the module docstring), except
    drawing the next questions: an in-memory read of the question stream that cannot fail or
    be retried usefully, so a task run's bookkeeping would only cost time."""

    def rollout(self, session, questions, iteration, draw=0):
        return rollout_task(quote(session), quote(questions), iteration, draw)

    def grade(self, session, rollouts):
        return grade_task(quote(session), quote(rollouts))

    def classify(self, session, iteration, rollouts):
        return classify_task(quote(session), iteration, quote(rollouts))

    def collect_demonstrations(self, session, iteration, rollouts, levels):
        return collect_task(quote(session), iteration, quote(rollouts), quote(levels))

    def mix_demonstrations(self, session, rollouts):
        return mix_task(quote(session), quote(rollouts))

    def rl_update(self, session, rollouts):
        return rl_update_task(quote(session), quote(rollouts))

    def sft_update(self, session, k, iteration):
        return sft_update_task(quote(session), k, iteration)

    def checkpoint(self, session):
        return checkpoint_task(quote(session))


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
