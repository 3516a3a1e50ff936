"""TorchTrainer on DeepSpeed ZeRO-3 (cluster.trainer_strategy=deepspeed_zero3; the `deepspeed`
package comes with the `gpu` and `dev` extras and runs on CPU ranks with gloo too).

`DeepSpeedTrainer` keeps TorchTrainer's loop (mini-batches, exact micro-batch weighting, stats)
and replaces only what touches gradients, the optimizer and the weights:

- **Precision.** With model.dtype bfloat16, DeepSpeed's bf16 mode: bf16 parameters for compute,
  float32 master partitions in the ZeRO optimizer, which AdamW steps (`torch_adam`: torch's own
  AdamW, on every accelerator). With float32, plain float32 parameters. `weights` and
  `full_weights` are the float32 masters (`deepspeed.utils.safe_get_full_fp32_param`).
- **Two optimizers on one engine.** DeepSpeed owns one optimizer; RL and SFT keep their own
  moment estimates as in TorchTrainer by swapping the inner torch optimizer's per-parameter
  state (`state`, keyed by the float32 partitions) before each kind steps, and switching lr,
  weight decay and the clip value on it.
- **Micro-batches** are split over the ranks like FSDP2's (distributed.rank_micro_batches: every
  rank runs as many forwards and backwards, short ranks a zero-weight copy), backward goes
  through the engine, and we mark the accumulation boundary ourselves so a short last
  mini-batch still steps. DeepSpeed averages gradients over ranks; our weights want their sum.
- **Checkpoints**: each rank writes its own ZeRO partition (the engine's optimizer state dict:
  float32 master partitions and moments, once per update kind) into the checkpoint directory;
  a run resumes with as many ranks (DeepSpeed's rigid format; another count is refused).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from relift_core.config import RLConfig
from relift_core.errors import UserError
from relift_core.runtime.distributed import RankTrainer, ShardCountError, collective_device
from relift_core.runtime.trainer import UpdateKind

GPU_EXTRA_HINT = "pip install 'relift[gpu]'"
STATE_VERSION = 2


class DeepSpeedUnavailableError(UserError, ImportError):
    """deepspeed is not installed (it comes with the `gpu` and `dev` extras)."""


def build_deepspeed_config(
    *,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    grad_clip: float,
    lr: float,
    weight_decay: float = 0.0,
    world_size: int = 1,
    bf16: bool = True,
    zero_stage: int = 3,
    torch_adam: bool = True,
) -> dict[str, Any]:
    """A DeepSpeed config dict: ZeRO (stage 3: weights, gradients and optimizer states
    partitioned), bf16 with float32 masters (or plain float32), AdamW, gradient clipping.

    `gradient_accumulation_steps` is the nominal count DeepSpeed checks its batch arithmetic
    with; the trainer marks the real boundaries itself. Bucket sizes are DeepSpeed's defaults
    (5e8 elements), which memory_plan.py counts.
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
        # Gradients reduced and accumulated in float32, as FSDP2's reduce_dtype (fsdp_trainer.py).
        "communication_data_type": "fp32",
        "data_types": {"grad_accum_dtype": "fp32"},
        "zero_optimization": {
            "stage": zero_stage,
            "overlap_comm": False,
            "contiguous_gradients": True,
            "reduce_scatter": True,
            "reduce_bucket_size": 5e8,
            "allgather_bucket_size": 5e8,
        },
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": lr,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": weight_decay,
                "torch_adam": torch_adam,
            },
        },
        "steps_per_print": 10**9,  # our Tracker logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def deepspeed_config_for_rl(
    rl: RLConfig,
    *,
    rows_per_minibatch: int,
    world_size: int = 1,
    zero_stage: int = 3,
    bf16: bool = True,
) -> dict:
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
        bf16=bf16,
    )


def import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise DeepSpeedUnavailableError(
            "cluster.trainer_strategy=deepspeed_zero3 needs deepspeed, which comes with the `gpu` "
            f"extra ({GPU_EXTRA_HINT}); use cluster.trainer_strategy=fsdp2 otherwise"
        ) from e
    return deepspeed


class DeepSpeedTrainer(RankTrainer):
    """TorchTrainer's interface on a ZeRO-3 engine; construct it on every rank of an initialised
    process group (or let DeepSpeed initialise one from the launcher's environment)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        rl: RLConfig,
        rows_per_minibatch: int | None = None,
        zero_stage: int = 3,
        **trainer_options: Any,
    ) -> None:
        """`trainer_options` are TorchTrainer's (algo, sft, max_response_len, device, dtype...)."""
        self._deepspeed = import_deepspeed()
        self._rows_per_minibatch = rows_per_minibatch or rl.mini_batch_size
        self.zero_stage = zero_stage
        # The base __init__ moves the model and calls _build_optimizers, which builds the engine.
        super().__init__(model, rl=rl, **trainer_options)

    # ------------------------------------------------------------------------ engine set-up

    def _place(self, model: nn.Module) -> nn.Module:
        # On the CPU: deepspeed.initialize casts the module to the compute dtype and moves it
        # to the device itself, so the full float32 model never sits on the GPU.
        return model.to(device="cpu", dtype=torch.float32)

    def _build_optimizers(self) -> None:
        # deepspeed.initialize asserts LOCAL_RANK even when torch.distributed is already up
        # (engine.py, _configure_distributed_model): a Ray actor has no launcher to set it.
        os.environ.setdefault("LOCAL_RANK", "0")
        self._deepspeed.init_distributed(
            dist_backend="nccl" if self.device.type == "cuda" else "gloo"
        )
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        config = deepspeed_config_for_rl(
            self.rl,
            rows_per_minibatch=self._rows_per_minibatch,
            world_size=self.world_size,
            zero_stage=self.zero_stage,
            bf16=self.compute_dtype == "bfloat16",
        )
        self.engine, optimizer, _, _ = self._deepspeed.initialize(
            model=self.model, model_parameters=self.trainable_parameters(), config=config
        )
        # One ZeRO optimizer serves both kinds; _use_settings_of switches lr/decay/clip on it
        # and the inner optimizer's moments (see the module docstring).
        self.optimizers = {"rl": optimizer, "sft": optimizer}
        self._settings: dict[UpdateKind, dict[str, float]] = {
            "rl": {"lr": self.rl.lr, "weight_decay": self.rl.weight_decay},
            "sft": {"lr": self.sft.lr, "weight_decay": self.sft.weight_decay},
        }
        self._moments: dict[UpdateKind, Any] = {"rl": defaultdict(dict), "sft": defaultdict(dict)}
        self._inner().state = self._moments["rl"]

    def _inner(self) -> torch.optim.Optimizer:
        """The torch AdamW that steps the float32 partitions."""
        return self.engine.optimizer.optimizer

    def _use_settings_of(self, kind: UpdateKind, grad_clip: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group.update(self._settings[kind])
        self._inner().state = self._moments[kind]
        # ZeRO's optimizer reads its clip value from this attribute at each step.
        if hasattr(self.engine.optimizer, "clip_grad"):
            self.engine.optimizer.clip_grad = grad_clip

    def _scoring_root(self) -> nn.Module | None:
        if self.model is not self.engine.module:  # the KL reference: an ordinary module
            return None
        # ZeRO-3 gathers the head inside the engine's forward only.
        return self.engine

    def _shared_chunk_span(self, positions: int) -> int | None:
        """ZeRO-3 gathers a module's parameters at each call of it (and again when backward
        recomputes a chunk): every rank calls the head as many times, the most chunks any rank
        needs for this micro-batch, short ranks on empty chunks."""
        if self.model is not self.engine.module:
            return None
        most = torch.tensor([positions], dtype=torch.int64, device=collective_device())
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return int(most.item())

    # ------------------------------------------------------------------------ gradient hooks

    def _zero_grad(self, kind: UpdateKind) -> None:
        self.engine.zero_grad()

    def _backward(self, loss: Tensor, *, last_micro_batch: bool) -> None:
        # Our micro-batch weights already make the sum the mini-batch loss: no 1/gas scaling;
        # DeepSpeed averages gradients over the ranks, our weights want their sum.
        self.engine.set_gradient_accumulation_boundary(last_micro_batch)
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def _clip_and_step(self, kind: UpdateKind, grad_clip: float) -> float:
        self._use_settings_of(kind, grad_clip)
        self.engine.step()  # clips and steps (bf16 has no loss scale to overflow)
        norm = self.engine.get_global_grad_norm()
        self._count_step(kind)
        norm = float(norm) if norm is not None else float("nan")
        self._step_outcome = "ok" if math.isfinite(norm) else "nonfinite"
        return norm

    def current_lr(self, kind: UpdateKind) -> float:
        return float(self._settings[kind]["lr"])

    # ------------------------------------------------------------------------ weights in and out

    def _named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        # remove_duplicate=False: a tied lm_head is listed under its own name too.
        return list(self.model.named_parameters(remove_duplicate=False))

    def full_weights(self) -> dict[str, Tensor] | None:
        """The float32 masters of the whole model, on the CPU, on rank 0 (None elsewhere).
        Collective (one all-gather per parameter): call it on every rank."""
        from deepspeed.utils import safe_get_full_fp32_param

        out: dict[str, Tensor] = {}
        for name, param in self._named_parameters():
            full = safe_get_full_fp32_param(param)
            if self.rank == 0:
                out[name] = full.detach().to("cpu", copy=True).view(param.ds_shape)
        return out if self.rank == 0 else None

    def load_full_weights(self, weights: dict[str, Tensor]) -> None:
        """Every rank's float32 partitions (and the bf16 parameters made from them) from the
        full `weights`, given on every rank."""
        from deepspeed.utils import safe_set_full_fp32_param

        for name, param in self._named_parameters():
            safe_set_full_fp32_param(param, weights[name].to(self.device, torch.float32))
        optimizer = self.engine.optimizer
        for group in range(len(optimizer.fp32_partitioned_groups_flat)):
            # ZeRO-3's own copy of the masters into the compute parameters (as after a step).
            optimizer._reassign_or_swap_out_partitioned_parameters(group)

    def refresh_generation_copy(self, copy_model: nn.Module) -> None:
        """`copy_model` (unsharded, compute dtype) takes the current weights, one module's
        parameters at a time, so rollouts run with no collective while decoding. Collective."""
        targets = dict(copy_model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, param in self._named_parameters():
                with self._deepspeed.zero.GatheredParameters([param]):
                    targets[name].copy_(param.data.view(targets[name].shape))

    def memory_bytes(self) -> dict[str, int]:
        """This rank's bytes of compute parameters (partitions), gradient partitions and
        optimizer states (float32 master partitions + both kinds' moments): what
        memory_plan.py predicts."""
        opt = self.engine.optimizer

        def size(tensors) -> int:
            seen = {}
            for t in tensors:
                if torch.is_tensor(t) and t.dim() > 0:
                    seen[t.data_ptr()] = t.numel() * t.element_size()
            return sum(seen.values())

        compute = list(opt.fp16_partitioned_groups_flat)
        compute_ptrs = {t.data_ptr() for t in compute}
        masters = [t for t in opt.fp32_partitioned_groups_flat if t.data_ptr() not in compute_ptrs]
        moments = [
            v for kind in self._moments.values() for state in kind.values() for v in state.values()
        ]
        flat = opt.grad_partitions_flat_buffer
        gradients = [flat] if flat is not None else []
        return {
            "weights": size(compute),
            "gradients": size(gradients),
            "optimizer": size(masters) + size(moments),
        }

    # ------------------------------------------------------------------------- checkpointing

    def _partition_states(self) -> dict[str, dict]:
        """This rank's ZeRO partition, once per update kind (each with its own moments)."""
        states = {}
        current = self._inner().state
        for kind in ("rl", "sft"):
            self._inner().state = self._moments[kind]
            states[kind] = self.engine.optimizer.state_dict()
        self._inner().state = current
        return states

    def save_sharded(self, directory: Path) -> None:
        """This rank's partition into `directory`/zero_rank<r>.pt (every rank writes its own)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "rank": self.rank,
                "world_size": self.world_size,
                "partitions": self._partition_states(),
            },
            directory / f"zero_rank{self.rank:03d}.pt",
        )
        dist.barrier()

    def load_sharded(self, directory: Path) -> None:
        path = Path(directory) / f"zero_rank{self.rank:03d}.pt"
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if (saved["rank"], saved["world_size"]) != (self.rank, self.world_size):
            raise ShardCountError(
                f"{path} is the ZeRO partition of rank {saved['rank']} of {saved['world_size']}; "
                f"this is rank {self.rank} of {self.world_size}: resume with as many ranks"
            )
        for kind in ("sft", "rl"):  # rl last: its float32 masters are the ones left loaded
            listed: list[dict | None] = [None] * self.world_size
            listed[self.rank] = saved["partitions"][kind]  # the engine indexes the list by rank
            self.engine.optimizer.load_state_dict(listed)
            self._moments[kind] = self._inner().state
        self._inner().state = self._moments["rl"]

    def state_dict(self) -> dict:
        """Step counters (the partitions are in the sharded files: `save_sharded`)."""
        return {
            "version": STATE_VERSION,
            "engine": "deepspeed_zero3",
            "world_size": self.world_size,
            "rl_optimizer_steps": self.rl_optimizer_steps,
            "sft_optimizer_steps": self.sft_optimizer_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("engine") != "deepspeed_zero3":
            raise ValueError("not a DeepSpeedTrainer state (saved by another trainer or version)")
        self.rl_optimizer_steps = int(state["rl_optimizer_steps"])
        self.sft_optimizer_steps = int(state["sft_optimizer_steps"])
