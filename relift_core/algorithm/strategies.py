"""Algorithms as rows of one table over one loop (ARCHITECTURE.md).

A method differs from another only in what a row of `METHODS` says:

- does an iteration run an RL update, or is it (still) a plain fine-tuning iteration?
- which questions' demonstrations are collected?
- how are they used: buffered for a fine-tuning step, or mixed into the question's RL group as
  an off-policy sample (LUFFY)?
- which loss settings the method brings (DAPO's clip-higher, dynamic sampling, ...), as
  defaults of `AlgorithmConfig` keys that an explicit value still overrides.

Everything else (rollout, grading, difficulty, checkpoints) is shared, so a comparison between
runs differs in the row alone. Adding a method is adding a row (and, where its update needs one,
a pure loss function in `objectives.py`). `Strategy` is the row resolved against a config by
`strategy_from_config`; it never looks at a method's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from relift_core.algorithm.difficulty import Level

if TYPE_CHECKING:
    from relift_core.config import AlgorithmConfig

# Which iterations are plain fine-tuning ones (no RL, every question's demonstration, one step):
# none, all of them, or the first `algorithm.sft_then_rl_switch`.
SFTPhase = Literal["none", "all", "first_iterations"]


def _frozen(settings: dict[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(settings))


@dataclass(frozen=True)
class Method:
    """One row of the table."""

    sft_phase: SFTPhase = "none"
    # After the SFT phase: the levels whose questions' demonstrations enter the buffer.
    buffers_levels: frozenset[Level] = frozenset()
    # Every question's demonstration joins its RL group as one extra, off-policy sample.
    demonstrations_in_rl_group: bool = False
    # AlgorithmConfig defaults this method brings; a value given in a preset or override wins.
    settings: Mapping[str, Any] = field(default_factory=lambda: _frozen({}))


METHODS: Mapping[str, Method] = MappingProxyType(
    {
        "rl": Method(),
        "sft": Method(sft_phase="all"),
        "sft_then_rl": Method(sft_phase="first_iterations"),
        # ReLIFT: only what RL cannot learn (0 of n solved) is buffered, fine-tuned on beside RL.
        "relift": Method(buffers_levels=frozenset({Level.HARDEST})),
        # LUFFY (Yan et al. 2025, exp_scripts/train.sh): GRPO without std normalisation over the
        # group of n rollouts plus the demonstration; no ratio clipping on the on-policy tokens
        # (loss_remove_clip), sequence sums over the max response length (loss_remove_token_mean).
        # The off-policy tokens' shaping p / (p + gamma) is algorithm.off_policy_shaping_gamma's,
        # 0.1 by default (off_policy_reshape p_div_p_0.1); a preset may tune it.
        "luffy": Method(
            demonstrations_in_rl_group=True,
            settings=_frozen(
                {"clip_ratio": None, "norm_adv_by_std": False, "loss_agg": "seq_sum_div_max_len"}
            ),
        ),
        # DAPO (Yu et al. 2025; verl's recipe/dapo): clip-higher 0.2 / 0.28, dynamic sampling,
        # token-level loss aggregation, the soft overlong penalty.
        "dapo": Method(
            settings=_frozen(
                {
                    "clip_ratio": 0.2,
                    "clip_ratio_high": 0.28,
                    "loss_agg": "token_mean",
                    "dynamic_sampling": True,
                    "overlong": "soft_penalty",
                }
            )
        ),
    }
)


@dataclass(frozen=True)
class Strategy:
    """A method's row resolved against the config: the decisions the loop asks of it."""

    # Iterations [0, sft_iterations) are plain fine-tuning ones; None: every iteration.
    sft_iterations: int | None
    buffers_levels: frozenset[Level]
    sft_batch_size_threshold: int  # buffered demonstrations that make one fine-tuning step
    # Fine-tuning steps an iteration may run outside the SFT phase; None drains the buffer in
    # steps of `sft_batch_size_threshold` while it holds that many (an ablation).
    sft_steps_per_iteration: int | None
    demonstrations_in_rl_group: bool

    def _in_sft_phase(self, iteration: int) -> bool:
        return self.sft_iterations is None or iteration < self.sft_iterations

    def runs_rl(self, iteration: int) -> bool:
        return not self._in_sft_phase(iteration)

    def collects(self, iteration: int, level: Level) -> bool:
        """Whether a question at `level` this iteration has its demonstration buffered."""
        if self._in_sft_phase(iteration):
            return True  # plain SFT learns from every question's demonstration
        return level in self.buffers_levels

    def mixes_demonstrations(self, iteration: int) -> bool:
        """Whether this iteration's RL groups each get their question's demonstration."""
        return self.demonstrations_in_rl_group and self.runs_rl(iteration)

    def max_sft_steps(self, iteration: int) -> int | None:
        """At most how many fine-tuning steps iteration `iteration` runs (None: no bound but the
        buffer's size, see `sft_batch_size`)."""
        if self._in_sft_phase(iteration):
            return 1  # one step over the iteration's demonstrations (mini-batched inside)
        if not self.buffers_levels:
            return 0
        return self.sft_steps_per_iteration

    def sft_batch_size(self, iteration: int, buffered: int) -> int:
        """How many buffered demonstrations the next fine-tuning step takes (0: none now)."""
        if self._in_sft_phase(iteration):
            return buffered  # SFT consumes the iteration's demonstrations at once
        if self.buffers_levels and buffered >= self.sft_batch_size_threshold:
            return self.sft_batch_size_threshold
        return 0


def strategy_from_config(algo: AlgorithmConfig) -> Strategy:
    """The strategy of `algo.name`'s row, with the config's settings filled in."""
    if algo.name not in METHODS:
        raise ValueError(f"unknown algorithm {algo.name!r}: expected one of {', '.join(METHODS)}")
    method = METHODS[algo.name]
    sft_iterations = {"none": 0, "all": None, "first_iterations": algo.sft_then_rl_switch}[
        method.sft_phase
    ]
    return Strategy(
        sft_iterations=sft_iterations,
        buffers_levels=method.buffers_levels,
        sft_batch_size_threshold=algo.sft_buffer_threshold,
        sft_steps_per_iteration=1 if algo.sft_steps_per_iteration == "one" else None,
        demonstrations_in_rl_group=method.demonstrations_in_rl_group,
    )
