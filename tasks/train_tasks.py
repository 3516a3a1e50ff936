"""Prefect tasks of one training iteration: thin, retryable wrappers over relift_core.iteration.

Tasks take the in-memory TrainSession (model, engine, trainer), so they never hash or persist
their inputs (NO_CACHE). Engine and training tasks retry with backoff; a task that still fails
fails the flow, and its error shows on the task run in the Prefect UI.
"""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from relift_core import iteration as it
from relift_core.data import Example
from relift_core.difficulty import Level
from relift_core.runtime import TrainSession

ENGINE_RETRIES = {"retries": 2, "retry_delay_seconds": [2, 10]}


@task(name="draw-questions", cache_policy=NO_CACHE)
def draw_questions(session: TrainSession) -> list[Example]:
    return it.draw_questions(session.state.stream, session.dataset, session.cfg.rl.prompts_per_step)


@task(name="rollout", cache_policy=NO_CACHE, **ENGINE_RETRIES)
def rollout(session: TrainSession, questions: list[Example], iteration: int) -> it.Rollouts:
    # The seed depends on the iteration so a resumed run samples what the crashed one would have.
    seed = session.cfg.run.seed * 100_003 + iteration
    return it.rollout(session.engine, session.tokenizer, questions, session.cfg, seed=seed)


@task(name="grade", cache_policy=NO_CACHE, **ENGINE_RETRIES)
def grade(session: TrainSession, rollouts: it.Rollouts) -> it.Rollouts:
    return it.grade(rollouts, session.grader, require_think=session.cfg.algorithm.require_think)


@task(name="classify-difficulty", cache_policy=NO_CACHE)
def classify(session: TrainSession, iteration: int, rollouts: it.Rollouts) -> list[Level]:
    return it.classify(session.state.ledger, iteration, rollouts)


@task(name="collect-demonstrations", cache_policy=NO_CACHE, **ENGINE_RETRIES)
def collect_demonstrations(session: TrainSession, iteration: int, rollouts: it.Rollouts,
                           levels: list[Level]) -> int:
    return it.collect_demonstrations(session.state.buffer, session.strategy, iteration,
                                     rollouts.questions, levels, session.demos)


@task(name="rl-update", cache_policy=NO_CACHE, **ENGINE_RETRIES)
def rl_update(session: TrainSession, rollouts: it.Rollouts) -> dict[str, float]:
    start = time.perf_counter()
    stats = it.rl_update(session.trainer, rollouts, pad_id=session.tokenizer.pad_token_id,
                         norm_adv_by_std=session.cfg.algorithm.norm_adv_by_std)
    session.engine.sync_weights(session.model)
    return {**stats, "seconds": time.perf_counter() - start}


@task(name="sft-update", cache_policy=NO_CACHE, **ENGINE_RETRIES)
def sft_update(session: TrainSession, k: int, iteration: int) -> dict[str, float]:
    """One fine-tuning step on the k oldest buffered demonstrations.

    Entries leave the buffer only after the step succeeded, so a retry never drops one."""
    start = time.perf_counter()
    entries = session.state.buffer.peek(k)
    stats = it.sft_update(session.trainer, session.tokenizer, entries,
                          max_target_tokens=session.cfg.sft.max_target_tokens)
    session.state.buffer.take(k)
    session.state.demos_used += k
    session.state.sft_log.extend(
        {"iteration": iteration, "uid": e.uid, "iteration_added": e.iteration_added,
         "level_when_added": e.level_when_added} for e in entries)
    session.state.sft_steps += 1
    session.engine.sync_weights(session.model)
    return {**stats, "seconds": time.perf_counter() - start}


@task(name="checkpoint", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5])
def checkpoint(session: TrainSession) -> str:
    return str(session.save())
