"""The phases of one ReLIFT iteration, as plain functions (DESIGN.md, "One iteration").

    questions -> rollout (n each) -> grade -> classify difficulty -> collect demonstrations
              -> RL update (group advantages) -> SFT update when the buffer is full enough

Prefect tasks in `tasks/` wrap these one to one; `run_iteration` chains them for plain-Python
use (tests, notebooks). Nothing here knows about Prefect or MLflow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from relift_core.algorithms import grpo_advantages
from relift_core.batches import rl_batch, sft_batch
from relift_core.config import ExperimentConfig
from relift_core.data import Example, render_prompt
from relift_core.demo_buffer import DemoBuffer, DemoEntry
from relift_core.demonstrations import DemonstrationSource
from relift_core.difficulty import DifficultyLedger, Level
from relift_core.grader import BatchGrader, Grade, answer_type_for
from relift_core.question_stream import QuestionStream
from relift_core.rollout import RolloutEngine, Sample
from relift_core.strategies import Strategy


@dataclass
class RunState:
    """Everything a run carries between iterations; all of it is checkpointed together."""

    iteration: int
    buffer: DemoBuffer
    ledger: DifficultyLedger
    stream: QuestionStream
    demos_used: int = 0
    sft_steps: int = 0
    # Every demonstration fine-tuned on: (iteration used, uid, iteration added, level when added).
    sft_log: list[dict[str, Any]] = field(default_factory=list)

    def extra_state(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "buffer": self.buffer.state_dict(),
            "ledger": self.ledger.state_dict(),
            "stream": self.stream.state_dict(),
            "demos_used": self.demos_used,
            "sft_steps": self.sft_steps,
            "sft_log": self.sft_log,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self.buffer.load_state_dict(state["buffer"])
        self.ledger.load_state_dict(state["ledger"])
        self.stream.load_state_dict(state["stream"])
        self.demos_used = int(state["demos_used"])
        self.sft_steps = int(state["sft_steps"])
        self.sft_log = list(state.get("sft_log", []))


@dataclass
class Rollouts:
    questions: list[Example]
    samples: list[list[Sample]]  # per question, n samples
    grades: list[list[Grade]] = field(default_factory=list)
    seconds: float = 0.0


def draw_questions(stream: QuestionStream, dataset: list[Example], k: int) -> list[Example]:
    return [dataset[i] for i in stream.next_indices(min(k, len(dataset)))]


def rollout(engine: RolloutEngine, tokenizer, questions: list[Example], cfg: ExperimentConfig,
            *, seed: int, progress=None) -> Rollouts:
    start = time.perf_counter()
    prompts = [render_prompt(tokenizer, list(q.prompt)) for q in questions]
    samples = engine.generate(prompts, n=cfg.rollout.n, temperature=cfg.rollout.temperature,
                              top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens,
                              seed=seed, progress=progress)
    return Rollouts(questions, samples, seconds=time.perf_counter() - start)


def grade(rollouts: Rollouts, grader: BatchGrader, *, require_think: bool) -> Rollouts:
    """Grades every sample; one pool call for the whole iteration keeps both processes busy."""
    start = time.perf_counter()
    texts, golds, types = [], [], []
    for q, group in zip(rollouts.questions, rollouts.samples, strict=True):
        for s in group:
            texts.append(s.text)
            golds.append(q.ground_truth)
            types.append(answer_type_for(q.data_source))
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


def classify(ledger: DifficultyLedger, iteration: int, rollouts: Rollouts) -> list[Level]:
    return [ledger.record(iteration, q.uid, acc)
            for q, acc in zip(rollouts.questions, accuracies(rollouts), strict=True)]


def collect_demonstrations(buffer: DemoBuffer, strategy: Strategy, iteration: int,
                           questions: list[Example], levels: list[Level],
                           source: DemonstrationSource) -> int:
    """Buffers the demonstrations the strategy asks for; returns how many entered the buffer."""
    wanted = [(q, lv) for q, lv in zip(questions, levels, strict=True)
              if strategy.collects(iteration, lv)]
    if not wanted:
        return 0
    demos = source.demonstrations([q for q, _ in wanted])
    before = len(buffer)
    for (q, level), demo in zip(wanted, demos, strict=True):
        if demo:
            buffer.add(DemoEntry(uid=q.uid, prompt=list(q.prompt), demonstration=demo,
                                 iteration_added=iteration, level_when_added=level.value))
    return len(buffer) - before


def rl_update(trainer, rollouts: Rollouts, *, pad_id: int, norm_adv_by_std: bool) -> dict[str, float]:
    """GRPO: each sample's advantage is its reward against its own question's group."""
    samples = [s for group in rollouts.samples for s in group]
    rewards = torch.tensor([g.reward for gs in rollouts.grades for g in gs], dtype=torch.float32)
    group_index = torch.tensor([qi for qi, group in enumerate(rollouts.samples) for _ in group])
    advantages = grpo_advantages(rewards, group_index, norm_by_std=norm_adv_by_std)
    if not torch.any(advantages != 0):
        # Every group all-right or all-wrong: the policy gradient is exactly zero, skip the step.
        return {"rl_skipped": 1.0}
    return trainer.rl_step(rl_batch(samples, advantages, pad_id))


def sft_update(trainer, tokenizer, entries: list[DemoEntry], *, max_target_tokens: int) -> dict[str, float]:
    prompts = [render_prompt(tokenizer, e.prompt) for e in entries]
    batch = sft_batch(tokenizer, prompts, [e.demonstration for e in entries], max_target_tokens)
    return trainer.sft_step(batch)


def rollout_metrics(rollouts: Rollouts, levels: list[Level]) -> dict[str, float]:
    """Per-step figures the paper tracks: reward, solve-none/solve-all, difficulty shares, length."""
    accs = accuracies(rollouts)
    flat = [g for gs in rollouts.grades for g in gs]
    lengths = [s.length for group in rollouts.samples for s in group]
    n_q = max(len(accs), 1)
    out = {
        "reward_mean": sum(g.reward for g in flat) / max(len(flat), 1),
        "accuracy": sum(accs) / n_q,
        "solve_none": float(sum(a == 0 for a in accs)),
        "solve_all": float(sum(a == 1 for a in accs)),
        "format_failure_rate": sum(not g.format_ok for g in flat) / max(len(flat), 1),
        "response_length_mean": sum(lengths) / max(len(lengths), 1),
        "response_length_max": float(max(lengths, default=0)),
        "truncated_rate": sum(s.finish_reason == "length" for group in rollouts.samples
                              for s in group) / max(len(lengths), 1),
    }
    for level in Level:
        out[f"frac_{level.value}"] = sum(lv is level for lv in levels) / n_q
    return out
