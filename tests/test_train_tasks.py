"""The Prefect phases are built from one table (tasks/train_tasks.py): every `Phases` method
but drawing questions runs as its task, with the method's signature, under its UI name."""

from __future__ import annotations

import inspect

from relift_core.iteration import Phases
from tasks.retry import retry_unless_permanent
from tasks.train_tasks import PHASE_TABLE, PHASE_TASKS, PREFECT_PHASES, PrefectPhases


def _phase_methods() -> set[str]:
    return {n for n, v in vars(Phases).items() if inspect.isfunction(v) and not n.startswith("_")}


def test_every_phase_but_drawing_questions_is_a_task_of_the_table():
    assert {row.method for row in PHASE_TABLE} == _phase_methods() - {"draw_questions"}
    assert PrefectPhases.draw_questions is Phases.draw_questions
    assert isinstance(PREFECT_PHASES, Phases)
    for row in PHASE_TABLE:
        override, plain = getattr(PrefectPhases, row.method), getattr(Phases, row.method)
        assert override is not plain, row.method
        # run_iteration calls the override exactly as it calls the plain method
        assert inspect.signature(override) == inspect.signature(plain), row.method
        assert PHASE_TASKS[row.method].name == row.name


def test_task_names_and_retries_are_those_the_prefect_ui_shows():
    names = {row.method: row.name for row in PHASE_TABLE}
    assert names == {
        "rollout": "rollout",
        "grade": "grade",
        "classify": "classify-difficulty",
        "collect_demonstrations": "collect-demonstrations",
        "mix_demonstrations": "mix-demonstrations",
        "rl_update": "rl-update",
        "sft_update": "sft-update",
        "checkpoint": "checkpoint",
    }
    for method, phase_task in PHASE_TASKS.items():
        if method == "classify":  # in-memory bookkeeping: a failure is a bug, not a hiccup
            assert phase_task.retries == 0
            continue
        assert phase_task.retries == 2, method
        assert phase_task.retry_condition_fn is retry_unless_permanent, method
    assert PHASE_TASKS["rollout"].retry_delay_seconds == [2, 10]
    assert PHASE_TASKS["checkpoint"].retry_delay_seconds == [1, 5]
