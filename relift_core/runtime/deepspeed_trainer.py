"""The same trainer interface over DeepSpeed ZeRO-2 (GPU, optional `gpu` extra).

`DeepSpeedTrainer` reuses TorchTrainer's loop (mini-batches, exact micro-batch weighting, stats)
and replaces only the hooks that touch gradients and the optimizer: backward goes through the
engine (which reduces and partitions gradients across ranks), and the engine steps the ZeRO
optimizer once per mini-batch, at a boundary we mark ourselves so a short last mini-batch still
steps.

Differences from TorchTrainer, by design of DeepSpeed (one engine owns one optimizer):
- RL and SFT share one AdamW; their learning rates, weight decay and grad clip are switched on
  it before each update, so the two kinds share moment estimates.
- bf16 is DeepSpeed's own mixed precision (bf16 weights, fp32 master copy), not autocast.
- `state_dict` holds this rank's optimizer partition; the Ray driver gathers every rank's into
  one checkpoint (ray_cluster.py), which resumes with as many ranks.
This module is exercised on CPU only up to the missing import; the config builder is pure.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor, nn

from relift_core.config import RLConfig
from relift_core.runtime.trainer import (
    STATE_VERSION,
    TorchTrainer,
    UpdateKind,
    position_ids_from_mask,
)

GPU_EXTRA_HINT = "pip install 'relift[gpu]'"


class DeepSpeedUnavailableError(ImportError):
    """deepspeed is not installed (it comes with the `gpu` extra)."""


def build_deepspeed_config(
    *,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    grad_clip: float,
    lr: float,
    weight_decay: float = 0.0,
    world_size: int = 1,
    bf16: bool = True,
    zero_stage: int = 2,
) -> dict[str, Any]:
    """A DeepSpeed config dict: ZeRO stage 2 (optimizer states and gradients partitioned, weights
    replicated; right for models that fit one GPU), bf16, AdamW, gradient clipping.

    `gradient_accumulation_steps` is the nominal count DeepSpeed checks its batch arithmetic
    with; the trainer marks the real boundaries itself.
    """
    for name, value in (
        ("micro_batch_size", micro_batch_size),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
        ("world_size", world_size),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": {
            "stage": zero_stage,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_scatter": True,
            "reduce_bucket_size": 5e8,
            "allgather_bucket_size": 5e8,
        },
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": weight_decay},
        },
        "steps_per_print": 10**9,  # our Tracker logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def deepspeed_config_for_rl(rl: RLConfig, *, rows_per_minibatch: int, world_size: int = 1,
                            zero_stage: int = 2) -> dict:
    """The config for RL updates of `rows_per_minibatch` rows split over `world_size` ranks."""
    rows_per_rank = max(1, math.ceil(rows_per_minibatch / world_size))
    return build_deepspeed_config(
        micro_batch_size=rl.micro_batch_size,
        gradient_accumulation_steps=max(1, math.ceil(rows_per_rank / rl.micro_batch_size)),
        grad_clip=rl.grad_clip,
        lr=rl.lr,
        weight_decay=rl.weight_decay,
        world_size=world_size,
        zero_stage=zero_stage,
    )


class DeepSpeedTrainer(TorchTrainer):
    """TorchTrainer's interface (rl_step, sft_step, token_logprobs, state_dict) on DeepSpeed."""

    def __init__(
        self,
        model: nn.Module,
        *,
        rl: RLConfig,
        device: str | torch.device | None = None,
        rows_per_minibatch: int | None = None,
        zero_stage: int = 2,
        **trainer_options: Any,
    ) -> None:
        """`trainer_options` are TorchTrainer's (algo, sft, max_response_len, dtype, ...).
        `zero_stage` 3 also partitions the weights (cluster.trainer_strategy=deepspeed_zero3);
        with several ranks each computes its share of every mini-batch's micro-batches."""
        try:
            import deepspeed
        except ImportError as e:
            raise DeepSpeedUnavailableError(
                "DeepSpeedTrainer needs deepspeed, which comes with the `gpu` extra "
                f"({GPU_EXTRA_HINT}, on a CUDA machine); use TorchTrainer otherwise"
            ) from e
        self._deepspeed = deepspeed
        self._rows_per_minibatch = rows_per_minibatch or rl.mini_batch_size
        self.zero_stage = zero_stage
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}"
        # The base __init__ moves the model and calls _build_optimizers, which builds the engine.
        super().__init__(model, rl=rl, device=device, **trainer_options)

    # ------------------------------------------------------------------------ engine set-up

    def _build_optimizers(self) -> None:
        if not torch.distributed.is_initialized():
            self._deepspeed.init_distributed()
        self.world_size = torch.distributed.get_world_size()
        self.rank = torch.distributed.get_rank()
        config = deepspeed_config_for_rl(
            self.rl, rows_per_minibatch=self._rows_per_minibatch, world_size=self.world_size,
            zero_stage=self.zero_stage,
        )
        self.engine, optimizer, _, _ = self._deepspeed.initialize(
            model=self.model, model_parameters=self.trainable_parameters(), config=config
        )
        # One ZeRO optimizer serves both kinds; _use_settings_of switches lr/decay/clip on it.
        self.optimizers = {"rl": optimizer, "sft": optimizer}
        self._settings: dict[UpdateKind, dict[str, float]] = {
            "rl": {"lr": self.rl.lr, "weight_decay": self.rl.weight_decay},
            "sft": {"lr": self.sft.lr, "weight_decay": 0.0},
        }

    def _use_settings_of(self, kind: UpdateKind, grad_clip: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group.update(self._settings[kind])
        # ZeRO's optimizer reads its clip value from this attribute at each step.
        if hasattr(self.engine.optimizer, "clip_grad"):
            self.engine.optimizer.clip_grad = grad_clip

    def _autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine holds bf16 weights itself

    def _forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.engine(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        return out.logits[:, :-1]

    # ------------------------------------------------------------------------ gradient hooks

    def _zero_grad(self, kind: UpdateKind) -> None:
        self.engine.zero_grad()

    def _local_micro_batches(self, count: int) -> list[int]:
        return list(range(self.rank, count, self.world_size))

    def _across_ranks(self, loss_finite, means):
        if self.world_size == 1:
            return loss_finite, means
        from relift_core.runtime.sharded_trainer import combine_across_ranks

        return combine_across_ranks(loss_finite, means, self.world_size)

    def _backward(self, loss: Tensor, *, last_micro_batch: bool) -> None:
        # Our micro-batch weights already make the sum the mini-batch loss: no 1/gas scaling;
        # DeepSpeed averages gradients over the ranks, our weights want their sum.
        self.engine.set_gradient_accumulation_boundary(last_micro_batch)
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def _clip_and_step(self, kind: UpdateKind, grad_clip: float) -> float:
        self._use_settings_of(kind, grad_clip)
        self.engine.step()  # clips, steps, and skips on overflow (bf16 rarely overflows)
        norm = self.engine.get_global_grad_norm()
        self._count_step(kind)
        return float(norm) if norm is not None else float("nan")

    def current_lr(self, kind: UpdateKind) -> float:
        return float(self._settings[kind]["lr"])

    # ------------------------------------------------------------------------- checkpointing

    def full_weights(self) -> dict[str, Tensor]:
        """The whole model's weights (under ZeRO-3 gathered from every rank: call on all)."""
        if self.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.model.state_dict()

    def state_dict(self) -> dict:
        """This rank's optimizer partition (ZeRO): a run resumes with as many ranks."""
        return {
            "version": STATE_VERSION,
            "engine": "deepspeed",
            "rank": self.rank,
            "world_size": self.world_size,
            "optimizer": self.engine.optimizer.state_dict(),
            "rl_optimizer_steps": self.rl_optimizer_steps,
            "sft_optimizer_steps": self.sft_optimizer_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("engine") != "deepspeed":
            raise ValueError("not a DeepSpeedTrainer state (saved by another trainer or version)")
        if (state.get("world_size", 1), state.get("rank", 0)) != (self.world_size, self.rank):
            from relift_core.runtime.sharded_trainer import ShardCountError

            raise ShardCountError(
                f"this ZeRO partition was written by rank {state.get('rank', 0)} of "
                f"{state.get('world_size', 1)}; this is rank {self.rank} of {self.world_size}")
        self.engine.optimizer.load_state_dict(state["optimizer"])
        self.rl_optimizer_steps = int(state["rl_optimizer_steps"])
        self.sft_optimizer_steps = int(state["sft_optimizer_steps"])
