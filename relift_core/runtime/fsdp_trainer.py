"""TorchTrainer on FSDP2 (`torch.distributed.fsdp.fully_shard`): cluster.trainer_strategy=fsdp2.

The default multi-rank strategy, as in verl: every decoder layer and the root are one FSDP unit
each, with a mixed-precision policy -- float32 sharded parameters (the masters, 1/W of the model
per rank), compute in `model.dtype` (FSDP casts each unit's parameters when it all-gathers them),
gradients reduce-scattered in float32. Both AdamW optimizers (RL and SFT) step the float32
shards, so their moments are sharded too.

What TorchTrainer's loop needs, and where it comes from here:
- micro-batches: rank r computes r, r + W, ... of each mini-batch, padded with zero-weight
  micro-batches so every rank runs as many forwards/backwards (distributed.rank_micro_batches);
  each is weighted by its share of the *whole* mini-batch, so the gradients summed over ranks
  are the one-process gradient. FSDP's reduce-scatter would average them: its divide factor is
  set to 1 (a sum).
- clipping: `clip_grad_norm_` over the DTensor gradients is the global norm (torch reduces it).
- the weight checks and roll-back: max and norm combined over the shards (collective, so every
  rank takes the same decision); a snapshot is a copy of this rank's shards and optimizer state.
- scoring goes through the root module's forward (FSDP's hooks gather the root's parameters
  there), with `logits_to_keep` so the head sees only the columns from the first target on.

Weights in and out (`full_weights`, `load_full_weights`) and the optimizer states in a checkpoint
(`save_sharded` / `load_sharded`) use torch.distributed.checkpoint's state-dict API, as
torchtitan does: full float32 tensors for the driver's model, sharded optimizer states written
by every rank into the checkpoint directory (DCP), which reshards on load.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from relift_core.runtime.distributed import RankTrainer, global_weight_stats
from relift_core.runtime.models import _DTYPES


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a transformers causal LM (Qwen2/Llama/Mistral:
    model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(
            f"fsdp2 shards decoder layers, and {type(model).__name__} has no "
            "model.layers (a transformers causal LM has)"
        )
    return list(layers)


class FSDPTrainer(RankTrainer):
    """The trainer of one rank; construct it on every rank of an initialised process group."""

    def __init__(self, model: nn.Module, **trainer_options) -> None:
        if not dist.is_initialized():
            raise RuntimeError("FSDPTrainer needs torch.distributed.init_process_group first")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        super().__init__(model, **trainer_options)

    def _build_optimizers(self) -> None:
        # Shard before the optimizers exist: they must hold the sharded (DTensor) parameters.
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(
            param_dtype=_DTYPES[self.compute_dtype], reduce_dtype=torch.float32
        )
        for layer in decoder_layers(self.model):
            fully_shard(layer, mp_policy=policy)
        fully_shard(self.model, mp_policy=policy)
        # Our micro-batch weights make the ranks' gradients add up to the mini-batch gradient:
        # a plain sum (factor 1, SUM only: gloo has no PREMUL_SUM), on every FSDP unit.
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        super()._build_optimizers()

    # ------------------------------------------------------------------------- scoring

    def _scoring_root(self) -> nn.Module:
        # The head is gathered inside the root forward only (the root FSDP unit).
        return self.model

    # ------------------------------------------------------------------------- rank hooks

    def _weight_stats(self, params: list[nn.Parameter]) -> tuple[float, float]:
        with torch.no_grad():
            shards = [p.to_local() if hasattr(p, "to_local") else p for p in params]
            shards = [s for s in shards if s.numel()]
            if not shards:
                return global_weight_stats(0.0, 0.0)
            peak = max(float(s.detach().abs().max()) for s in shards)
            sq = sum(
                float(torch.linalg.vector_norm(s.detach(), 2, dtype=torch.float32)) ** 2
                for s in shards
            )
        return global_weight_stats(peak, sq)

    def _clip_and_step(self, kind, grad_clip: float) -> float:
        # Parameters a rank's micro-batches never reached still take part in the reduction.
        for p in self.trainable_parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.measured_gradient_bytes = sum(
            _local_bytes(p.grad) for p in self.trainable_parameters()
        )
        return super()._clip_and_step(kind, grad_clip)

    def memory_bytes(self) -> dict[str, int]:
        """This rank's bytes of parameters (float32 shards), gradients (float32 shards, as of
        the last step) and both optimizers' states: what memory_plan.py predicts."""
        optimizer = sum(
            _local_bytes(v)
            for opt in self.optimizers.values()
            for state in opt.state.values()
            for v in state.values()
            if torch.is_tensor(v) and v.dim() > 0
        )
        return {
            "weights": sum(_local_bytes(p) for p in self.model.parameters()),
            "gradients": getattr(self, "measured_gradient_bytes", 0),
            "optimizer": optimizer,
        }

    # ------------------------------------------------------------------------- weights in and out

    def full_weights(self) -> dict[str, Tensor] | None:
        """The float32 masters of the whole model, on the CPU, on rank 0 (None elsewhere).
        Collective: call it on every rank."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return state if self.rank == 0 else None

    def load_full_weights(self, weights: dict[str, Tensor]) -> None:
        """Every rank takes its shard of the full `weights` (given on every rank)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(
            self.model, weights, options=StateDictOptions(full_state_dict=True, strict=False)
        )

    def refresh_generation_copy(self, copy_model: nn.Module) -> None:
        """`copy_model` (unsharded, in the compute dtype) takes the current weights, one
        parameter at a time, so rollouts run with no collective while decoding. Collective."""
        targets = dict(copy_model.named_parameters())
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                full = param.full_tensor() if hasattr(param, "full_tensor") else param
                targets[name].copy_(full)

    # ------------------------------------------------------------------------- checkpoints

    def _optimizer_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return {
            kind: get_optimizer_state_dict(self.model, optimizer)
            for kind, optimizer in self.optimizers.items()
        }

    def save_sharded(self, directory: Path) -> None:
        """Both optimizers' sharded states into `directory` (DCP; every rank writes its own
        file, rank 0 the metadata). Collective."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._optimizer_state(), checkpoint_id=str(directory))

    def load_sharded(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        state = self._optimizer_state()
        dcp.load(state, checkpoint_id=str(directory))
        for kind, optimizer in self.optimizers.items():
            set_optimizer_state_dict(self.model, optimizer, state[kind])

    def state_dict(self) -> dict:
        """Step counters (the optimizer states are in the sharded files: `save_sharded`)."""
        return {
            "version": self.STATE_VERSION_SHARDED,
            "engine": "fsdp2",
            "world_size": self.world_size,
            "rl_optimizer_steps": self.rl_optimizer_steps,
            "sft_optimizer_steps": self.sft_optimizer_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("engine") != "fsdp2":
            raise ValueError(f"not an FSDP2 trainer state (engine {state.get('engine')!r})")
        self.rl_optimizer_steps = int(state["rl_optimizer_steps"])
        self.sft_optimizer_steps = int(state["sft_optimizer_steps"])

    STATE_VERSION_SHARDED = 1


def _local_bytes(tensor: Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()
