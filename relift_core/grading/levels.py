"""How hard questions are for a policy, measured outside training: each question's difficulty
level (hardest..easy) from cfg.rollout.n graded samples, and its sampled accuracy at the
evaluation settings. The samples are drawn and graded by the training loop's own `rollout` and
`grade`, so a level measured here is the level an iteration would record. The demo, the
difficulty-dynamics flow, the demo's tuning script and the learning tests read levels here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from relift_core.algorithm.difficulty import DifficultyLedger, Level
from relift_core.config import ExperimentConfig
from relift_core.data.examples import Example
from relift_core.grading.grader import BatchGrader
from relift_core.iteration import Rollouts, accuracies, grade, record_levels, rollout
from relift_core.runtime.assembly import build_engine, seed_everything
from relift_core.runtime.models import export_dtype, load_policy, resolve_device
from relift_core.runtime.rollout import RolloutEngine


class AnswerSampler(NamedTuple):
    """What draws a policy's answers (its rollout engine and tokenizer) and grades them."""

    engine: RolloutEngine
    tokenizer: Any
    grader: BatchGrader


def _graded(
    sampler: AnswerSampler, questions: list[Example], cfg: ExperimentConfig, seed: int
) -> Rollouts:
    """The questions' rollouts at cfg.rollout's settings, graded as training grades them."""
    rollouts = rollout(sampler.engine, sampler.tokenizer, questions, cfg, seed=seed)
    return grade(rollouts, sampler.grader, require_think=cfg.algorithm.require_think)


def measure_levels(
    sampler: AnswerSampler,
    questions: list[Example],
    cfg: ExperimentConfig,
    *,
    seed: int,
    ledger: DifficultyLedger | None = None,
    iteration: int = 0,
) -> dict[str, Level]:
    """uid -> level of each question under the engine's current policy: cfg.rollout.n samples
    at the rollout temperature, exactly as a training iteration sees the question."""
    ledger = ledger if ledger is not None else DifficultyLedger()
    rollouts = _graded(sampler, questions, cfg, seed)
    return {
        q.uid: lv
        for q, lv in zip(questions, record_levels(ledger, iteration, rollouts), strict=True)
    }


def policy_levels(
    cfg: ExperimentConfig, questions: list[Example], init_from: str | None = None
) -> dict[str, Level]:
    """uid -> level of each question under a saved policy (`init_from`, default the config's
    model), loaded fresh on cfg.run.device: the demo's and the difficulty-dynamics' measure."""
    model_cfg = cfg.model.model_copy(update={"init_from": init_from} if init_from else {})
    seed_everything(cfg.run.seed)
    device = resolve_device(cfg.run.device)
    model, tokenizer = load_policy(
        model_cfg, device=str(device), seed=cfg.run.seed, dtype=export_dtype(cfg.model)
    )
    engine = build_engine(cfg, model, tokenizer, device)
    with BatchGrader(workers=cfg.run.grader_workers, timeout_s=cfg.run.grader_timeout_s) as grader:
        sampler = AnswerSampler(engine, tokenizer, grader)
        return measure_levels(sampler, questions, cfg, seed=cfg.run.seed)


def sampled_accuracy(
    sampler: AnswerSampler, questions: list[Example], cfg: ExperimentConfig, *, seed: int
) -> dict[str, float]:
    """uid -> share of eval.samples answers (at the evaluation temperature) that are right:
    avg@k per question, as the evaluation flow measures it, without writing records."""
    eval_cfg = cfg.model_copy(
        update={
            "rollout": cfg.rollout.model_copy(
                update={
                    "n": cfg.eval.samples or 1,
                    "temperature": cfg.eval.temperature,
                    "top_p": cfg.eval.top_p,
                    "max_new_tokens": cfg.eval.max_new_tokens,
                }
            )
        }
    )
    rollouts = _graded(sampler, questions, eval_cfg, seed)
    return {q.uid: acc for q, acc in zip(questions, accuracies(rollouts), strict=True)}
