"""One ReLIFT iteration (Algorithm 1 of the paper), the only place the loop is written.

    questions -> rollout (n each) -> grade -> classify difficulty -> collect demonstrations
              -> RL update (group advantages) -> SFT update when the buffer is full enough
              -> evaluate every k iterations -> checkpoint

`run_iteration(session, i)` runs it in plain Python (tests, notebooks, benchmarks, the demo's
tuning script). The `train` flow runs the very same function, handing it `phases` whose members
are Prefect tasks wrapping the `Phases` methods below one to one, so every phase is a retryable
task run in the UI while the order of the phases and the run-state bookkeeping live here only.
Nothing here knows about Prefect or MLflow (metrics go to any `Tracker`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from relift_core.algorithm.demonstration_buffer import DemoBuffer, DemoEntry
from relift_core.algorithm.demonstrations import DemonstrationSource
from relift_core.algorithm.difficulty import DifficultyLedger, Level
from relift_core.algorithm.objectives import grpo_advantages, overlong_shaping
from relift_core.algorithm.strategies import Strategy
from relift_core.config import AlgorithmConfig, ExperimentConfig
from relift_core.data.examples import Example, render_prompt
from relift_core.data.question_stream import QuestionStream
from relift_core.grading.extraction import answer_type_for
from relift_core.grading.grader import BatchGrader, Grade
from relift_core.runtime.batches import demonstration_ids, pack_rows, sft_batch
from relift_core.runtime.rollout import RolloutEngine, Sample, engine_asleep
from relift_core.runtime.session import TrainSession
from relift_core.tracker import Tracker


@dataclass
class Rollouts:
    questions: list[Example]
    samples: list[list[Sample]]  # per question, n samples
    grades: list[list[Grade]] = field(default_factory=list)
    seconds: float = 0.0
    # LUFFY: per question, its demonstration as one more (off-policy) sample of its group, and
    # that sample's grade; None where the source has none. Empty unless the strategy mixes.
    demonstrations: list[Sample | None] = field(default_factory=list)
    demonstration_grades: list[Grade | None] = field(default_factory=list)

    def select(self, indices: list[int]) -> Rollouts:
        """The groups of questions `indices` (graded, not yet mixed)."""
        return Rollouts(
            [self.questions[i] for i in indices],
            [self.samples[i] for i in indices],
            [self.grades[i] for i in indices],
            self.seconds,
        )

    @staticmethod
    def concat(parts: list[Rollouts]) -> Rollouts:
        return Rollouts(
            [q for r in parts for q in r.questions],
            [g for r in parts for g in r.samples],
            [g for r in parts for g in r.grades],
            sum(r.seconds for r in parts),
        )


def draw_questions(stream: QuestionStream, dataset: list[Example], k: int) -> list[Example]:
    return [dataset[i] for i in stream.next_indices(min(k, len(dataset)))]


def rollout(
    engine: RolloutEngine,
    tokenizer,
    questions: list[Example],
    cfg: ExperimentConfig,
    *,
    seed: int,
    progress=None,
) -> Rollouts:
    start = time.perf_counter()
    prompts = [render_prompt(tokenizer, list(q.prompt)) for q in questions]
    samples = engine.generate(
        prompts,
        n=cfg.rollout.n,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        max_new_tokens=cfg.rollout.max_new_tokens,
        seed=seed,
        progress=progress,
    )
    return Rollouts(questions, samples, seconds=time.perf_counter() - start)


def grade(rollouts: Rollouts, grader: BatchGrader, *, require_think: bool) -> Rollouts:
    """Grades every sample; one pool call for the whole iteration keeps both processes busy."""
    start = time.perf_counter()
    texts, golds, types = [], [], []
    for q, group in zip(rollouts.questions, rollouts.samples, strict=True):
        for s in group:
            texts.append(s.text)
            golds.append(q.ground_truth)
            types.append(answer_type_for(q.data_source, q.ground_truth))
    flat = grader.grade(texts, golds, types, require_think=require_think)
    grades, i = [], 0
    for group in rollouts.samples:
        grades.append(flat[i : i + len(group)])
        i += len(group)
    rollouts.grades = grades
    rollouts.seconds += time.perf_counter() - start
    return rollouts


def accuracies(rollouts: Rollouts) -> list[float]:
    return [sum(g.correct for g in gs) / len(gs) for gs in rollouts.grades]


def record_levels(ledger: DifficultyLedger, iteration: int, rollouts: Rollouts) -> list[Level]:
    """Each question's level this iteration, recorded in the run's ledger."""
    return [
        ledger.record(iteration, q.uid, acc)
        for q, acc in zip(rollouts.questions, accuracies(rollouts), strict=True)
    ]


def collect_demonstrations(
    buffer: DemoBuffer,
    strategy: Strategy,
    iteration: int,
    questions: list[Example],
    levels: list[Level],
    source: DemonstrationSource,
) -> dict[str, float]:
    """Buffers the demonstrations the strategy asks for.

    Returns counts: `demos_collected` (entered the buffer), `demos_unavailable` (the source had
    none, e.g. a teacher whose answers the grader rejected)."""
    wanted = [
        (q, lv) for q, lv in zip(questions, levels, strict=True) if strategy.collects(iteration, lv)
    ]
    if not wanted:
        return {"demos_collected": 0.0, "demos_unavailable": 0.0}
    demos = source.demonstrations([q for q, _ in wanted])
    before = len(buffer)
    buffer.add_all(
        [
            DemoEntry(
                uid=q.uid,
                prompt=tuple(q.prompt),
                demonstration=demo,
                iteration_added=iteration,
                level_when_added=level.value,
            )
            for (q, level), demo in zip(wanted, demos, strict=True)
            if demo
        ]
    )
    return {
        "demos_collected": float(len(buffer) - before),
        "demos_unavailable": float(sum(not d for d in demos)),
        **source.counts(),
    }


def has_signal(grades: list[Grade]) -> bool:
    """Whether a group's rewards differ: an all-right or all-wrong group has no advantage."""
    return len({g.reward for g in grades}) > 1


def dynamic_sampling(
    first: Rollouts, draw_more: Callable[[int], Rollouts], *, target: int, max_draws: int
) -> tuple[Rollouts, Rollouts, dict[str, float]]:
    """DAPO's dynamic sampling: (everything drawn, the groups kept, stats).

    Groups without reward variance are dropped, and `draw_more(d)` (the d-th draw of graded
    rollouts, d = 1, 2, ...) is called until `target` groups have signal or `max_draws` draws
    (`first` included) were made; the kept groups are the first `target` with signal. Stats:
    draws, prompts drawn, groups kept, and whether the batch was filled."""
    if max_draws < 1 or target < 1:
        raise ValueError(f"target and max_draws must be >= 1, got {target} and {max_draws}")
    drawn = [first]
    kept = [(0, qi) for qi, grades in enumerate(first.grades) if has_signal(grades)]
    while len(kept) < target and len(drawn) < max_draws:
        more = draw_more(len(drawn))
        kept += [(len(drawn), qi) for qi, grades in enumerate(more.grades) if has_signal(grades)]
        drawn.append(more)
    kept = kept[:target]
    chosen = Rollouts.concat(
        [drawn[d].select([qi for dd, qi in kept if dd == d]) for d in range(len(drawn))]
    )
    everything = Rollouts.concat(drawn)
    stats = {
        "dynamic_sampling/draws": float(len(drawn)),
        "dynamic_sampling/prompts_drawn": float(len(everything.questions)),
        "dynamic_sampling/groups_kept": float(len(kept)),
        "dynamic_sampling/batch_filled": float(len(kept) == target),
    }
    return everything, chosen, stats


def mix_demonstrations(
    rollouts: Rollouts,
    source: DemonstrationSource,
    tokenizer,
    grader: BatchGrader,
    *,
    max_new_tokens: int,
    require_think: bool,
) -> Rollouts:
    """LUFFY: each question's demonstration becomes one more sample of its group, graded like
    the rollouts, its response cut at `max_new_tokens` as a rollout would be."""
    texts = source.demonstrations(rollouts.questions)
    present = [qi for qi, t in enumerate(texts) if t]
    chosen = [t for t in texts if t]  # the texts of `present`, in its order
    ids = demonstration_ids(tokenizer, chosen, max_new_tokens)
    grades = (
        grader.grade(
            chosen,
            [rollouts.questions[qi].ground_truth for qi in present],
            [answer_type_for(rollouts.questions[qi].data_source) for qi in present],
            require_think=require_think,
        )
        if present
        else []
    )
    rollouts.demonstrations = [None] * len(texts)
    rollouts.demonstration_grades = [None] * len(texts)
    for qi, text, response, g in zip(present, chosen, ids, grades, strict=True):
        stopped = bool(response) and response[-1] == tokenizer.eos_token_id
        rollouts.demonstrations[qi] = Sample(
            prompt_index=qi,
            prompt_ids=list(rollouts.samples[qi][0].prompt_ids),
            response_ids=response,
            text=text,
            length=len(response),
            finish_reason="eos" if stopped else "length",
        )
        rollouts.demonstration_grades[qi] = g
    return rollouts


def rl_update(
    trainer, rollouts: Rollouts, *, pad_id: int, algo: AlgorithmConfig, max_new_tokens: int
) -> dict[str, float]:
    """GRPO: each sample's advantage is its reward against its own question's group, which
    holds the question's demonstration too when the rollouts were mixed (LUFFY). Over-long
    samples are masked or penalised as algorithm.overlong says."""
    samples: list[Sample] = []
    rewards: list[float] = []
    group: list[int] = []
    off_policy: list[bool] = []
    for qi, (group_samples, grades) in enumerate(
        zip(rollouts.samples, rollouts.grades, strict=True)
    ):
        rows = list(zip(group_samples, grades, [False] * len(grades), strict=True))
        demo = rollouts.demonstrations[qi] if rollouts.demonstrations else None
        if demo is not None:
            demo_grade = rollouts.demonstration_grades[qi]
            assert demo_grade is not None  # mix_demonstrations grades every demonstration it adds
            rows.append((demo, demo_grade, True))
        for sample, grade_, off in rows:
            samples.append(sample)
            rewards.append(grade_.reward)
            group.append(qi)
            off_policy.append(off)
    if not samples:
        return {"rl_skipped": 1.0}
    shaped, keep = overlong_shaping(
        torch.tensor(rewards, dtype=torch.float32),
        torch.tensor([s.length for s in samples]),
        torch.tensor([s.finish_reason == "length" for s in samples]),
        algo.overlong,
        max_len=max_new_tokens,
        buffer_len=algo.overlong_buffer_len,
        penalty_factor=algo.overlong_penalty_factor,
    )
    advantages = grpo_advantages(shaped, torch.tensor(group), norm_by_std=algo.norm_adv_by_std)
    if not torch.any((advantages * keep) != 0):
        # Every group all-right or all-wrong: the policy gradient is exactly zero, skip the step.
        return {"rl_skipped": 1.0}
    batch = pack_rows(
        [s.prompt_ids for s in samples], [s.response_ids for s in samples], pad_id, advantages
    )
    batch.loss_mask = batch.loss_mask * keep.unsqueeze(-1)
    if any(off_policy):
        batch.off_policy = torch.tensor(off_policy)
    stats = trainer.rl_step(batch)
    if any(off_policy):
        stats["off_policy_rows"] = float(sum(off_policy))
    if algo.overlong != "off":
        stats["overlong_rows"] = float(sum(s.finish_reason == "length" for s in samples))
    return stats


def sft_update(
    trainer, tokenizer, entries: list[DemoEntry], *, max_target_tokens: int, prefill: str = ""
) -> dict[str, float]:
    prompts = [render_prompt(tokenizer, e.prompt) for e in entries]
    batch = sft_batch(
        tokenizer, prompts, [e.demonstration for e in entries], max_target_tokens, prefill=prefill
    )
    return trainer.sft_step(batch)


def rollout_metrics(rollouts: Rollouts, levels: list[Level]) -> dict[str, float]:
    """Per-step figures the paper tracks: reward, solve-none/solve-all, difficulty shares,
    length."""
    accs = accuracies(rollouts)
    flat = [g for gs in rollouts.grades for g in gs]
    lengths = [s.length for group in rollouts.samples for s in group]
    n_q = max(len(accs), 1)
    out = {
        "reward_mean": sum(g.reward for g in flat) / max(len(flat), 1),
        # Of this step's rollouts on training questions (held-out scores are heldout/...).
        "rollout_accuracy": sum(accs) / n_q,
        "solve_none": float(sum(a == 0 for a in accs)),
        "solve_all": float(sum(a == 1 for a in accs)),
        "format_failure_rate": sum(not g.format_ok for g in flat) / max(len(flat), 1),
        "response_length_mean": sum(lengths) / max(len(lengths), 1),
        "response_length_max": float(max(lengths, default=0)),
        "truncated_rate": sum(
            s.finish_reason == "length" for group in rollouts.samples for s in group
        )
        / max(len(lengths), 1),
    }
    for level in Level:
        out[f"frac_{level.value}"] = sum(lv is level for lv in levels) / n_q
    return out


def rollout_seed(run_seed: int, iteration: int, draw: int = 0) -> int:
    """The rollout seed depends on the iteration (and on the draw within it, for dynamic
    sampling), so a resumed run samples what the crashed one would have sampled (and two seeds
    never share an iteration's samples)."""
    return run_seed * 100_003 + iteration + draw * 1_000_033


class Phases:
    """The phases of an iteration over a TrainSession. Each method but draw_questions is one
    Prefect task, a row of `PHASE_TABLE` in `tasks/train_tasks.py`; a method that changes run
    state changes it here, never in a task."""

    def draw_questions(self, session: TrainSession) -> list[Example]:
        return draw_questions(
            session.state.stream, session.dataset, session.cfg.rl.prompts_per_step
        )

    def rollout(
        self, session: TrainSession, questions: list[Example], iteration: int, draw: int = 0
    ) -> Rollouts:
        return rollout(
            session.engine,
            session.tokenizer,
            questions,
            session.cfg,
            seed=rollout_seed(session.cfg.run.seed, iteration, draw),
        )

    def grade(self, session: TrainSession, rollouts: Rollouts) -> Rollouts:
        return grade(rollouts, session.grader, require_think=session.cfg.algorithm.require_think)

    def classify(self, session: TrainSession, iteration: int, rollouts: Rollouts) -> list[Level]:
        return record_levels(session.state.ledger, iteration, rollouts)

    def collect_demonstrations(
        self, session: TrainSession, iteration: int, rollouts: Rollouts, levels: list[Level]
    ) -> dict[str, float]:
        return collect_demonstrations(
            session.state.buffer,
            session.strategy,
            iteration,
            rollouts.questions,
            levels,
            session.demonstration_source,
        )

    def mix_demonstrations(self, session: TrainSession, rollouts: Rollouts) -> Rollouts:
        return mix_demonstrations(
            rollouts,
            session.demonstration_source,
            session.tokenizer,
            session.grader,
            max_new_tokens=session.cfg.rollout.max_new_tokens,
            require_think=session.cfg.algorithm.require_think,
        )

    def rl_update(self, session: TrainSession, rollouts: Rollouts) -> dict[str, float]:
        start = time.perf_counter()
        with engine_asleep(session.engine):
            stats = rl_update(
                session.trainer,
                rollouts,
                pad_id=session.tokenizer.pad_token_id,
                algo=session.cfg.algorithm,
                max_new_tokens=session.cfg.rollout.max_new_tokens,
            )
        # LUFFY's demonstrations are trained on in the RL step: they count as used.
        session.state.demos_used += int(stats.get("off_policy_rows", 0))
        session.engine.sync_weights(session.model)
        return {**stats, "seconds": time.perf_counter() - start}

    def sft_update(self, session: TrainSession, k: int, iteration: int) -> dict[str, float]:
        """One fine-tuning step on the k demonstrations the buffer hands out next.

        Entries leave the buffer only after the step succeeded, so a retry never drops one."""
        start = time.perf_counter()
        state = session.state
        entries = state.buffer.peek(k)
        with engine_asleep(session.engine):
            stats = sft_update(
                session.trainer,
                session.tokenizer,
                entries,
                max_target_tokens=session.cfg.sft.max_target_tokens,
                prefill=session.cfg.model.prefill,
            )
        state.buffer.take(k)
        state.demos_used += k
        state.sft_log.extend(
            {
                "iteration": iteration,
                "uid": e.uid,
                "iteration_added": e.iteration_added,
                "level_when_added": e.level_when_added,
            }
            for e in entries
        )
        state.sft_steps += 1
        session.engine.sync_weights(session.model)
        return {**stats, "seconds": time.perf_counter() - start}

    def checkpoint(self, session: TrainSession) -> str:
        return str(session.save())


DIRECT_PHASES = Phases()


def run_iteration(
    session: TrainSession,
    i: int,
    *,
    phases: Phases = DIRECT_PHASES,
    tracker: Tracker | None = None,
    evaluate: Callable[[int], object] | None = None,
) -> dict[str, float]:
    """Iteration `i` of the run: Algorithm 1's body. Returns (and logs) the step's metrics.

    `evaluate(step)` is called every `eval.every` iterations (not after the last one: the caller
    evaluates the final policy). The checkpoint is written after the metrics are logged, so a
    run killed in between re-runs (and re-logs) the iteration instead of losing its metrics.
    """
    cfg, state, strategy = session.cfg, session.state, session.strategy
    phase: dict[str, float] = {}
    start = time.perf_counter()

    questions = phases.draw_questions(session)
    rollouts = phases.rollout(session, questions, i)
    phase["rollout"] = rollouts.seconds
    rollouts = phases.grade(session, rollouts)
    phase["grade"] = rollouts.seconds - phase["rollout"]
    trained = rollouts  # the groups the RL update sees
    sampling_stats: dict[str, float] = {}
    if cfg.algorithm.dynamic_sampling and strategy.runs_rl(i):
        sampling_start = time.perf_counter()

        def draw_more(draw: int) -> Rollouts:
            more = phases.rollout(session, phases.draw_questions(session), i, draw)
            return phases.grade(session, more)

        rollouts, trained, sampling_stats = dynamic_sampling(
            rollouts,
            draw_more,
            target=cfg.rl.prompts_per_step,
            max_draws=cfg.algorithm.dynamic_sampling_max_draws,
        )
        phase["dynamic_sampling"] = time.perf_counter() - sampling_start
    levels = phases.classify(session, i, rollouts)
    metrics = rollout_metrics(rollouts, levels)
    metrics.update(sampling_stats)

    # ReLIFT: the questions no rollout solved (hardest) send their demonstrations to the buffer.
    metrics.update(phases.collect_demonstrations(session, i, rollouts, levels))
    if strategy.runs_rl(i):
        if strategy.mixes_demonstrations(i):
            trained = phases.mix_demonstrations(session, trained)
        rl_stats = phases.rl_update(session, trained)
        phase["rl_update"] = rl_stats.pop("seconds")
        metrics.update({f"rl/{key}": v for key, v in rl_stats.items()})
    max_steps, steps = strategy.max_sft_steps(i), 0
    while max_steps is None or steps < max_steps:
        size = strategy.sft_batch_size(i, len(state.buffer))
        if not size:
            break
        steps += 1
        sft_stats = phases.sft_update(session, size, i)
        phase["sft_update"] = phase.get("sft_update", 0.0) + sft_stats.pop("seconds")
        metrics.update({f"sft/{key}": v for key, v in sft_stats.items()})
    metrics.update(
        buffer_size=float(len(state.buffer)),
        demos_used=float(state.demos_used),
        sft_steps=float(state.sft_steps),
    )

    if evaluate is not None and (i + 1) % cfg.eval.every == 0 and (i + 1) < cfg.run.iterations:
        eval_start = time.perf_counter()
        evaluate(i + 1)
        phase["evaluate"] = time.perf_counter() - eval_start

    phase["iteration"] = time.perf_counter() - start
    metrics.update({f"time/{key}": v for key, v in phase.items()})
    if tracker is not None:
        tracker.log_metrics(metrics, step=i)
    state.iteration = i + 1  # the checkpoint records the next iteration to run
    if (i + 1) % cfg.run.checkpoint_every == 0 or (i + 1) == cfg.run.iterations:
        ckpt_start = time.perf_counter()
        phases.checkpoint(session)
        metrics["time/checkpoint"] = time.perf_counter() - ckpt_start
    return metrics
