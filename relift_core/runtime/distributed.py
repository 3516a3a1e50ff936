"""What every multi-rank trainer (FSDP2, DeepSpeed ZeRO-3) needs from torch.distributed.

Two rules hold on every rank, whatever the engine:

- **Tensors reduced across ranks live where the backend can reduce them**
  (`collective_device`): NCCL reduces CUDA tensors only, gloo CPU tensors. A CPU tensor handed
  to NCCL's all_reduce fails at the first optimizer step of every GPU run.
- **Every rank runs the same number of forwards and backwards** (`rank_micro_batches`): FSDP2
  all-gathers each layer in forward and reduce-scatters its gradients in backward, ZeRO-3 does
  the same per module; a rank with one micro-batch fewer would leave the others waiting in a
  collective forever. Ranks short of real micro-batches run a zero-weight copy of one.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from relift_core.errors import UserError
from relift_core.runtime.trainer import TorchTrainer, _WeightedMeans


class ShardCountError(UserError, RuntimeError):
    """A checkpoint's trainer state was written by another number of ranks than this run has."""


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device whose tensors the group's backend reduces: this process's CUDA device for
    NCCL, the CPU for gloo (and for a process with no group)."""
    if not dist.is_initialized():
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_micro_batches(count: int, rank: int, world_size: int) -> list[int | None]:
    """Which of a mini-batch's `count` micro-batches rank `rank` computes: r, r + W, r + 2W, ...,
    padded with None (a zero-weight micro-batch) to ceil(count / W) on every rank."""
    if count < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad split: {count} micro-batches, rank {rank} of {world_size}")
    per_rank = math.ceil(count / world_size)
    mine: list[int | None] = list(range(rank, count, world_size))
    return mine + [None] * (per_rank - len(mine))


def combine_across_ranks(loss_finite: bool, means: _WeightedMeans) -> tuple[bool, _WeightedMeans]:
    """Finite only if finite on every rank; the stats as if one process had computed them all.
    One all_reduce on the backend's device (keys are the same on every rank: the same loss
    function produced them; they are checked)."""
    device = collective_device()
    sums = means.sums()
    keys = sorted(sums)
    world = dist.get_world_size()
    gathered: list[list[str]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, keys)
    if any(k != keys for k in gathered):
        raise RuntimeError(f"ranks computed different step stats: {gathered}")
    packed = torch.tensor(
        [0.0 if loss_finite else 1.0] + [v for k in keys for v in sums[k]],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    values = packed.tolist()
    combined = _WeightedMeans()
    combined.merge({k: (values[1 + 2 * i], values[2 + 2 * i]) for i, k in enumerate(keys)})
    return values[0] == 0.0, combined


def global_weight_stats(local_max: float, local_sq_norm: float) -> tuple[float, float]:
    """(max |w|, ||w||) over every rank's shard, from each rank's max and squared norm. A NaN on
    any rank makes both NaN."""
    device = collective_device()
    peak = torch.tensor([local_max], dtype=torch.float64, device=device)
    sq = torch.tensor([local_sq_norm], dtype=torch.float64, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    dist.all_reduce(sq, op=dist.ReduceOp.SUM)
    peak_value, sq_value = float(peak.item()), float(sq.item())
    if math.isnan(sq_value):
        # MAX may drop a NaN (max(nan, x) is backend-defined); the sum never does, so every
        # rank sees the same verdict.
        return float("nan"), float("nan")
    return peak_value, math.sqrt(sq_value)


def check_world_size(saved: int | None, world_size: int, what: str) -> None:
    if saved != world_size:
        raise ShardCountError(
            f"the checkpoint's {what} was written by {saved or 1} trainer rank(s) "
            f"(trainer_state.world_size={saved}); this run has {world_size}. Resume with as "
            "many ranks (cluster.nodes, gpus_per_node, cpu_ranks_per_node)"
        )


class RankTrainer(TorchTrainer):
    """TorchTrainer as one rank of `world_size` (FSDP2's and ZeRO-3's trainers): it computes
    its share of each mini-batch's micro-batches and combines its verdict and stats with the
    other ranks'. The engine sets `rank` and `world_size` once the process group is up."""

    rank: int
    world_size: int

    def _local_micro_batches(self, count: int) -> list[int | None]:
        return rank_micro_batches(count, self.rank, self.world_size)

    def _across_ranks(
        self, loss_finite: bool, means: _WeightedMeans
    ) -> tuple[bool, _WeightedMeans]:
        return combine_across_ranks(loss_finite, means)
