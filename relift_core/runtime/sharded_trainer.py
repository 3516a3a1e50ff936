"""TorchTrainer over a torch.distributed group, ZeRO stage 1: every rank holds the weights,
each rank holds the optimizer states of its own share of them.

One optimizer step, on every rank at once (cluster.trainer_strategy=zero1):

    micro-batches  rank r computes micro-batches r, r + W, r + 2W, ... of the mini-batch, each
                   weighted by its share of the whole mini-batch (trainer.py), so the gradients
                   summed over ranks are exactly the one-process gradient;
    all-reduce     the gradients (one flat buffer, SUM), the finite-loss verdict (MIN) and the
                   stats (sums and weights), so every rank sees the same figures;
    clip           the same norm on every rank (the gradients are identical);
    step           AdamW on the parameters this rank owns (a greedy split by size), with the
                   moments of only those: optimizer memory / W;
    broadcast      each owner sends its updated parameters to the others;
    check          the weight checks and roll-back of trainer.py, on identical weights, so every
                   rank takes the same decision.

Works with gloo (CPU, tested against a one-process TorchTrainer) and NCCL (GPU, not yet run on
one). A checkpoint holds every rank's optimizer shard; it resumes only with as many ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from relift_core.runtime.trainer import TorchTrainer, _WeightedMeans


class ShardCountError(RuntimeError):
    """A checkpoint's optimizer shards were written by another number of ranks."""


def owners_by_size(sizes: list[int], world_size: int) -> list[int]:
    """Owner rank of each parameter: largest first, each to the least loaded rank (ties: the
    lowest rank), so shards differ by at most one parameter's size. Deterministic."""
    load = [0] * world_size
    owner = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[index] = rank
        load[rank] += sizes[index]
    return owner


def combine_across_ranks(loss_finite: bool, means: _WeightedMeans,
                         world_size: int) -> tuple[bool, _WeightedMeans]:
    """Finite only if finite on every rank; the stats as if one process had computed them all."""
    verdict = torch.tensor([1 if loss_finite else 0], dtype=torch.int64)
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
    gathered: list[dict] = [{} for _ in range(world_size)]
    dist.all_gather_object(gathered, means.sums())
    combined = _WeightedMeans()
    for sums in gathered:
        combined.merge(sums)
    return bool(verdict.item()), combined


class ShardedTrainer(TorchTrainer):
    """The trainer of one rank; construct it on every rank of an initialised process group."""

    def __init__(self, model: nn.Module, **trainer_options) -> None:
        if not dist.is_initialized():
            raise RuntimeError("ShardedTrainer needs torch.distributed.init_process_group first")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        super().__init__(model, **trainer_options)

    def _build_optimizers(self) -> None:
        params = self.trainable_parameters()
        self.owner = owners_by_size([p.numel() for p in params], self.world_size)
        mine = [p for p, r in zip(params, self.owner, strict=True) if r == self.rank]
        if not mine:
            raise RuntimeError(f"rank {self.rank} owns no parameter: more ranks "
                               f"({self.world_size}) than parameters ({len(params)})")
        self.optimizers = {
            "rl": torch.optim.AdamW(mine, lr=self.rl.lr, weight_decay=self.rl.weight_decay),
            "sft": torch.optim.AdamW(mine, lr=self.sft.lr, weight_decay=0.0),
        }

    def _local_micro_batches(self, count: int) -> list[int]:
        return list(range(self.rank, count, self.world_size))

    def _across_ranks(self, loss_finite: bool,
                      means: _WeightedMeans) -> tuple[bool, _WeightedMeans]:
        return combine_across_ranks(loss_finite, means, self.world_size)

    def _zero_grad(self, kind) -> None:
        # Every parameter's: the optimizer only knows this rank's share, and a gradient left on
        # another share would be all-reduced again with the next step's.
        for p in self.trainable_parameters():
            p.grad = None

    def _clip_and_step(self, kind, grad_clip: float) -> float:
        self._all_reduce_gradients()
        try:
            return super()._clip_and_step(kind, grad_clip)
        finally:
            self._zero_grad(kind)

    def _all_reduce_gradients(self) -> None:
        params = self.trainable_parameters()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for p, g in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
            p.grad = g.view_as(p)

    def _after_optimizer_step(self) -> None:
        """Each owner's updated parameters to every rank (one broadcast per owner)."""
        params = self.trainable_parameters()
        with torch.no_grad():
            for rank in range(self.world_size):
                owned = [p for p, r in zip(params, self.owner, strict=True) if r == rank]
                flat = _flatten_dense_tensors([p.data for p in owned])
                dist.broadcast(flat, src=rank)
                for p, new in zip(owned, _unflatten_dense_tensors(flat, owned), strict=True):
                    p.copy_(new)

    def full_weights(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("world_size", 1)
        if saved != self.world_size or state.get("rank", 0) != self.rank:
            raise ShardCountError(
                f"this optimizer shard was written by rank {state.get('rank', 0)} of {saved}; "
                f"this is rank {self.rank} of {self.world_size}. Resume with as many trainer "
                "ranks as the run had (cluster.nodes, gpus_per_node, cpu_ranks_per_node)")
        super().load_state_dict(state)
