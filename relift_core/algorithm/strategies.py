"""Algorithms as strategies over one loop (ARCHITECTURE.md): they differ only in three decisions.

- does this iteration run an RL update?
- which questions' demonstrations go into the buffer?
- when does a fine-tuning step run, and on how many buffered demonstrations?

Everything else (rollout, grading, difficulty, checkpoints) is shared, so a comparison between
runs differs in the strategy alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from relift_core.algorithm.difficulty import Level


@dataclass(frozen=True)
class Strategy:
    name: str
    sft_threshold: int  # buffer size that triggers a fine-tuning step
    sft_then_rl_switch: int = 0  # sft_then_rl: iterations [0, switch) are SFT, then RL
    # ReLIFT's fine-tuning steps per iteration: 1 in the paper; None drains the buffer in
    # steps of `sft_threshold` while it holds that many (the earlier behaviour, an ablation).
    relift_steps_per_iteration: int | None = 1

    def _in_sft_phase(self, iteration: int) -> bool:
        return self.name == "sft" or (self.name == "sft_then_rl" and iteration < self.sft_then_rl_switch)

    def runs_rl(self, iteration: int) -> bool:
        return not self._in_sft_phase(iteration)

    def collects(self, iteration: int, level: Level) -> bool:
        """Whether a question at `level` this iteration has its demonstration buffered."""
        if self._in_sft_phase(iteration):
            return True  # plain SFT learns from every question's demonstration
        if self.name == "relift":
            return level is Level.HARDEST  # only what RL cannot learn: 0 of n solved
        return False

    def max_sft_steps(self, iteration: int) -> int:
        """At most how many fine-tuning steps iteration `iteration` runs."""
        if self._in_sft_phase(iteration):
            return 1  # one step over the iteration's demonstrations (mini-batched inside)
        if self.name == "relift":
            # Draining: the buffer shrinks by sft_threshold a step, so this bound is never hit.
            return self.relift_steps_per_iteration or 1_000_000
        return 0

    def sft_batch_size(self, iteration: int, buffered: int) -> int:
        """How many buffered demonstrations the next fine-tuning step takes (0: none now)."""
        if self._in_sft_phase(iteration):
            return buffered  # SFT consumes the iteration's demonstrations at once
        if self.name == "relift" and buffered >= self.sft_threshold:
            return self.sft_threshold
        return 0


def strategy_for(name: str, *, sft_threshold: int, sft_then_rl_switch: int = 0,
                 relift_steps_per_iteration: int | None = 1) -> Strategy:
    if name not in ("relift", "rl", "sft", "sft_then_rl"):
        raise ValueError(f"unknown algorithm {name!r}: expected relift, rl, sft or sft_then_rl")
    return Strategy(name, sft_threshold, sft_then_rl_switch, relift_steps_per_iteration)
