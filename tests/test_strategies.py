"""The methods as rows of one table (relift_core.algorithm.strategies), and the loop's use of
them (relift_core.iteration.run_iteration) on a real tiny session."""

from __future__ import annotations

import ast
import inspect
import typing

import pytest

from relift_core.algorithm import strategies
from relift_core.algorithm.difficulty import Level
from relift_core.algorithm.strategies import METHODS, Strategy, strategy_from_config
from relift_core.config import AlgorithmConfig
from tests.conftest import TINY_SESSION, world_session


def strategy(name: str, **settings) -> Strategy:
    return strategy_from_config(AlgorithmConfig(name=name, **settings))


def test_relift_collects_only_hardest_and_runs_rl():
    s = strategy("relift", sft_buffer_threshold=4)
    assert s.runs_rl(0) and not s.mixes_demonstrations(0)
    assert [s.collects(0, lv) for lv in Level] == [lv is Level.HARDEST for lv in Level]


def test_relift_fine_tunes_once_per_iteration_on_threshold_entries():
    s = strategy("relift", sft_buffer_threshold=4)
    assert s.sft_batch_size(0, 3) == 0  # not enough yet
    assert s.sft_batch_size(0, 4) == 4 and s.sft_batch_size(0, 11) == 4
    assert s.max_sft_steps(0) == 1  # the paper: at most one step per iteration
    drain = strategy("relift", sft_buffer_threshold=4, sft_steps_per_iteration="drain")
    assert drain.max_sft_steps(0) is None  # the ablation: bounded only by the buffer
    assert drain.sft_batch_size(0, 11) == 4


def test_rl_and_dapo_never_collect_or_fine_tune():
    for name in ("rl", "dapo"):
        s = strategy(name, sft_buffer_threshold=4)
        assert s.runs_rl(0) and not any(s.collects(0, lv) for lv in Level)
        assert s.sft_batch_size(0, 100) == 0 and s.max_sft_steps(0) == 0


def test_luffy_mixes_demonstrations_into_rl_groups_and_buffers_nothing():
    s = strategy("luffy")
    assert s.runs_rl(0) and s.mixes_demonstrations(0)
    assert not any(s.collects(0, lv) for lv in Level) and s.max_sft_steps(0) == 0


def test_sft_collects_everything_and_consumes_it_in_one_step():
    s = strategy("sft", sft_buffer_threshold=128)
    assert not s.runs_rl(0) and not s.runs_rl(10**6) and all(s.collects(0, lv) for lv in Level)
    assert s.sft_batch_size(0, 7) == 7 and s.max_sft_steps(0) == 1


def test_sft_then_rl_switches_at_the_configured_iteration():
    s = strategy("sft_then_rl", sft_buffer_threshold=4, sft_then_rl_switch=2)
    assert [s.runs_rl(i) for i in range(4)] == [False, False, True, True]
    assert s.collects(1, Level.EASY) and not s.collects(2, Level.HARDEST)
    # One default, the config's: one SFT iteration.
    assert [strategy("sft_then_rl").runs_rl(i) for i in range(2)] == [False, True]


def test_the_table_and_the_config_know_the_same_methods():
    names = typing.get_args(AlgorithmConfig.model_fields["name"].annotation)
    assert set(names) == set(METHODS)
    for name, method in METHODS.items():
        for key in method.settings:
            assert key in AlgorithmConfig.model_fields, (name, key)


def test_strategy_never_branches_on_a_method_name():
    """Strategy holds no name, and its source compares no string with anything."""
    assert "name" not in {f for f in Strategy.__dataclass_fields__}
    tree = ast.parse(inspect.getsource(Strategy))
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            assert not any(
                isinstance(o, ast.Constant) and isinstance(o.value, str) for o in operands
            ), ast.unparse(node)
    assert "1_000_000" not in inspect.getsource(strategies)


def test_method_settings_apply_unless_given():
    dapo = AlgorithmConfig(name="dapo")
    assert (dapo.clip_ratio, dapo.clip_ratio_high, dapo.loss_agg) == (0.2, 0.28, "token_mean")
    assert dapo.dynamic_sampling and dapo.overlong == "soft_penalty"
    assert AlgorithmConfig(name="dapo", clip_ratio_high=0.3).clip_ratio_high == 0.3
    rl = AlgorithmConfig(name="rl")
    assert rl.clip_ratio is None and not rl.dynamic_sampling and rl.overlong == "off"


TINY = [
    *TINY_SESSION,
    "rollout.n=4",
    "rollout.max_new_tokens=16",
    "rl.prompts_per_step=6",
    "rl.mini_batch_size=6",
    "sft.mini_batch_size=4",
    "sft.max_target_tokens=48",
    "algorithm.sft_buffer_threshold=2",
    "run.iterations=2",
]


@pytest.fixture
def tiny_session(tmp_path):
    from relift_core.config import load_config

    def make(algo: str, *extra: str):
        cfg = load_config(
            "toy",
            [
                *TINY,
                f"algorithm.name={algo}",
                f"run.workdir={tmp_path}",
                f"run.name={algo}",
                *extra,
            ],
        )
        return world_session(cfg)

    return make


def test_run_iteration_relift_buffers_hardest_and_fine_tunes(tiny_session):
    from relift_core.iteration import run_iteration
    from relift_core.tracker import InMemoryTracker

    session = tiny_session("relift")  # a random model: every question is hardest
    tracker = InMemoryTracker()
    try:
        m = run_iteration(session, 0, tracker=tracker)
    finally:
        session.close()
    assert m["frac_hardest"] == 1.0 and m["demos_collected"] == 6
    # One fine-tuning step on the threshold (2) newest entries; the other 4 wait.
    assert m["sft_steps"] == 1 and m["demos_used"] == 2 and m["buffer_size"] == 4
    assert {e["level_when_added"] for e in session.state.sft_log} == {"hardest"}
    # Every group all-wrong: zero advantages, the RL step is skipped rather than run on nothing.
    assert m["rl/rl_skipped"] == 1.0
    assert session.state.iteration == 1
    assert (session.checkpoint_dir / "step_000001").is_dir()
    assert tracker.metrics[0][0] == 0 and tracker.history("rollout_accuracy") == [0.0]


def test_run_iteration_sft_uses_every_question(tiny_session):
    from relift_core.iteration import run_iteration

    session = tiny_session("sft")
    try:
        m = run_iteration(session, 0)
    finally:
        session.close()
    assert m["demos_used"] == 6 and m["buffer_size"] == 0 and "rl/rl_skipped" not in m


def test_teacher_demonstrations_enter_the_buffer_only_when_verified(tiny_session, tmp_path):
    """A teacher (here a policy dir) answers the hardest questions; only answers the grader
    accepts are buffered, and the counts say how many were verified and rejected."""
    from relift_core.algorithm.demonstrations import TeacherDemonstrations
    from relift_core.iteration import collect_demonstrations
    from relift_core.runtime.models import save_policy
    from relift_core.runtime.rollout import Sample

    first = tiny_session("relift")
    teacher_dir = tmp_path / "teacher"
    save_policy(first.model, first.tokenizer, teacher_dir)
    first.close()
    session = tiny_session(
        "relift",
        "algorithm.demonstrations=teacher",
        f"algorithm.teacher_model={teacher_dir}",
        "run.name=teach",
    )
    try:
        source = session.demonstration_source
        assert isinstance(source, TeacherDemonstrations)
        questions = session.dataset[:4]

        class Scripted:  # a teacher that is right on the first two questions only
            def generate(self, prompts, **kw):
                return [
                    [
                        Sample(
                            prompt_index=i,
                            prompt_ids=[],
                            response_ids=[],
                            text=(
                                f"<think>x</think> \\boxed{{{q.ground_truth if i < 2 else 'nope'}}}"
                            ),
                            length=1,
                            finish_reason="eos",
                        )
                    ]
                    * kw["n"]
                    for i, (q, _) in enumerate(zip(questions, prompts, strict=True))
                ]

        source.engine = Scripted()
        from relift_core.algorithm.difficulty import Level

        counts = collect_demonstrations(
            session.state.buffer, session.strategy, 0, questions, [Level.HARDEST] * 4, source
        )
        assert counts["demos_collected"] == 2 and counts["demos_unavailable"] == 2
        assert counts["teacher_verified"] == 2 and counts["teacher_rejected"] == 2
        buffered = session.state.buffer.peek(2)
        assert {e.uid for e in buffered} == {q.uid for q in questions[:2]}
    finally:
        session.close()


def test_teacher_without_a_model_is_refused():
    from relift_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="teacher_model"):
        load_config("toy", ["algorithm.demonstrations=teacher"])


# --- DAPO's dynamic sampling and LUFFY's mixed groups in the loop ------------------------------


def _rollouts(correct: list[list[bool]], tag: str = "q"):
    """Graded rollouts: one group per row of `correct` (real Examples, Samples and Grades)."""
    from relift_core.data.examples import Example
    from relift_core.grading.grader import Grade
    from relift_core.iteration import Rollouts
    from relift_core.runtime.rollout import Sample

    questions = [
        Example(
            uid=f"{tag}{i}",
            prompt=({"role": "user", "content": "1+1="},),
            ground_truth="2",
            data_source="world/add/1",
            target="2",
        )
        for i in range(len(correct))
    ]
    samples = [
        [
            Sample(
                prompt_index=i,
                prompt_ids=[5, 6],
                response_ids=[7, 8],
                text="x",
                length=2,
                finish_reason="eos",
            )
            for _ in row
        ]
        for i, row in enumerate(correct)
    ]
    grades = [
        [Grade(correct=c, format_ok=True, extracted="2" if c else "3") for c in row]
        for row in correct
    ]
    return Rollouts(questions, samples, grades)


def test_dynamic_sampling_keeps_groups_with_signal_and_fills_the_batch():
    from relift_core.iteration import dynamic_sampling

    first = _rollouts([[True, False], [True, True], [False, False], [False, True]], "a")
    second = _rollouts([[False, False], [True, False], [False, True]], "b")
    calls = []

    def draw_more(draw):
        calls.append(draw)
        return second

    everything, kept, stats = dynamic_sampling(first, draw_more, target=3, max_draws=5)
    assert calls == [1]  # one more draw filled the batch
    assert [q.uid for q in kept.questions] == ["a0", "a3", "b1"]  # first 3 with signal
    assert len(everything.questions) == 7
    assert stats == {
        "dynamic_sampling/draws": 2.0,
        "dynamic_sampling/prompts_drawn": 7.0,
        "dynamic_sampling/groups_kept": 3.0,
        "dynamic_sampling/batch_filled": 1.0,
    }


def test_dynamic_sampling_stops_at_the_bound():
    from relift_core.iteration import dynamic_sampling

    calls = []

    def draw_more(draw):
        calls.append(draw)
        return _rollouts([[True, True], [False, False]], f"d{draw}-")

    _, kept, stats = dynamic_sampling(
        _rollouts([[True, False], [True, True]]), draw_more, target=4, max_draws=3
    )
    assert calls == [1, 2] and [q.uid for q in kept.questions] == ["q0"]
    assert stats["dynamic_sampling/draws"] == 3 and stats["dynamic_sampling/prompts_drawn"] == 6
    assert stats["dynamic_sampling/groups_kept"] == 1
    assert stats["dynamic_sampling/batch_filled"] == 0


class RecordingTrainer:
    """Stands in for TorchTrainer.rl_step: keeps the batch the loop built."""

    def rl_step(self, batch):
        self.batch = batch
        return {"policy_loss": 0.0}


def test_luffy_rows_join_each_group_with_mixed_advantages(tokenizer):
    from relift_core.config import AlgorithmConfig
    from relift_core.grading.grader import Grade
    from relift_core.iteration import rl_update
    from relift_core.runtime.rollout import Sample

    rollouts = _rollouts([[True, False, False], [False, False, False]])
    demo = Sample(
        prompt_index=0,
        prompt_ids=[5, 6],
        response_ids=[9, 9, 9],
        text="d",
        length=3,
        finish_reason="eos",
    )
    rollouts.demonstrations = [demo, demo]
    rollouts.demonstration_grades = [Grade(correct=True, format_ok=True, extracted="2")] * 2
    trainer = RecordingTrainer()
    rl_update(trainer, rollouts, pad_id=0, algo=AlgorithmConfig(name="luffy"), max_new_tokens=8)
    b = trainer.batch
    # Group 0: rewards 1, 0, 0 and the demonstration's 1 -> mean 0.5. Group 1: 0, 0, 0, 1.
    assert b.advantages.tolist() == [0.5, -0.5, -0.5, 0.5, -0.25, -0.25, -0.25, 0.75]
    assert b.off_policy.tolist() == [False, False, False, True] * 2
    assert b.input_ids[3].tolist() == [5, 6, 9, 9, 9] and b.loss_mask[3].tolist() == [0, 1, 1, 1]


def test_overlong_mask_leaves_truncated_rows_out_of_the_loss():
    from relift_core.config import AlgorithmConfig
    from relift_core.iteration import rl_update

    rollouts = _rollouts([[True, False]])
    rollouts.samples[0][1].finish_reason = "length"
    trainer = RecordingTrainer()
    stats = rl_update(
        trainer, rollouts, pad_id=0, algo=AlgorithmConfig(overlong="mask"), max_new_tokens=2
    )
    assert trainer.batch.loss_mask.sum(-1).tolist() == [2.0, 0.0]
    assert trainer.batch.off_policy is None and stats["overlong_rows"] == 1


def test_run_iteration_luffy_learns_from_the_demonstration_when_no_rollout_is_right(tiny_session):
    """A random model solves nothing: GRPO would skip the step, LUFFY's demonstration gives
    every group signal; KL to the reference is 0 at the first step (policy == reference)."""
    from relift_core.iteration import run_iteration

    session = tiny_session("luffy", "algorithm.kl_coef=0.1")
    try:
        m = run_iteration(session, 0)
    finally:
        session.close()
    assert m["frac_hardest"] == 1.0 and "rl/rl_skipped" not in m
    assert m["rl/optimizer_steps"] == 1 and 0 < m["rl/off_policy_prob"] < 1
    assert m["rl/kl_to_reference"] == 0.0
    # One demonstration per question, used in the RL step; nothing buffered.
    assert m["demos_used"] == 6 and m["rl/off_policy_rows"] == 6 and m["buffer_size"] == 0


def test_run_iteration_dapo_draws_until_the_bound_and_logs_it(tiny_session):
    from relift_core.iteration import run_iteration

    session = tiny_session(
        "dapo", "algorithm.dynamic_sampling_max_draws=3", "algorithm.overlong_buffer_len=4"
    )
    try:
        m = run_iteration(session, 0)
    finally:
        session.close()
    # Every group all-wrong: three draws of 6 prompts, none kept, no step.
    assert m["dynamic_sampling/draws"] == 3 and m["dynamic_sampling/prompts_drawn"] == 18
    assert m["dynamic_sampling/groups_kept"] == 0 and m["rl/rl_skipped"] == 1.0
