"""One run across ranks on Ray (cluster.backend=ray), the way verl and OpenRLHF place workers.

    driver (the process running the train flow)         Ray actors, one per GPU / CPU rank
    ----------------------------------------------      -------------------------------------
    run state: buffer, ledger, data position, RNG        TrainerRank r, one torch.distributed
    RayRolloutEngine: shards the prompts over ranks  ->    group (NCCL on GPU, gloo on CPU):
                      and gathers their samples            its shard of the float32 masters
    RayTrainer: sends each batch to every rank      ->     and of both optimizers (FSDP2 or
                and returns rank 0's (reduced) stats       DeepSpeed ZeRO-3), an unsharded
    checkpoint: the full float32 weights (gathered         copy in the compute dtype for its
                to the driver) + every rank's              rollout engine (HF, or vLLM, which
                optimizer shard (written by the rank       sleeps while the trainer steps)
                into the same atomic directory)

Actors are placed by one placement group of `world_size` bundles ({"GPU": 1, "CPU": 1} per
GPU rank, {"CPU": 1} per CPU rank; PACK: ranks of a node stay together). After every update
each rank refreshes its generation copy from the shards (one all-gather per parameter, the same
on every rank) and hands it to its engine (`sync_weights`); decoding then runs with no
collective, whatever number of steps each rank's prompts need. The driver keeps a copy of the
weights only for checkpoints and the final model (`gather_weights`). Every call that touches
weights is made on all ranks at once (`RayRanks.call`).

Nothing here imports Prefect or MLflow; Ray is imported only when a run asks for it.
"""

from __future__ import annotations

import contextlib
import copy
import socket
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from relift_core.config import ExperimentConfig
from relift_core.errors import UserError
from relift_core.runtime.assembly import build_engine, seed_everything, trainer_options
from relift_core.runtime.batches import TokenBatch
from relift_core.runtime.distributed import ShardCountError
from relift_core.runtime.models import export_dtype, load_policy
from relift_core.runtime.rollout import RolloutEngine, Sample, SamplingRequest, engine_asleep
from relift_core.runtime.trainer import STATE_VERSION

if TYPE_CHECKING:  # both import their backends (torch.distributed, DeepSpeed) at import time
    from relift_core.runtime.deepspeed_trainer import DeepSpeedTrainer
    from relift_core.runtime.fsdp_trainer import FSDPTrainer

RAY_HINT = "pip install 'relift[cluster]' (Ray 2.60)"


class RayUnavailableError(UserError, ImportError):
    """cluster.backend=ray without Ray installed."""


def _ray():
    try:
        import ray
    except ImportError as e:
        raise RayUnavailableError(f"cluster.backend=ray needs Ray: {RAY_HINT}") from e
    return ray


class TrainerRank:
    """One rank: its process group membership, its shard of the policy (FSDP2 or ZeRO-3), an
    unsharded copy of the weights in the compute dtype for its rollout engine, and the engine.
    Created through Ray (`ray.remote(TrainerRank)`); every method runs in the actor, and every
    method that touches weights is collective: the driver calls it on all ranks at once."""

    def __init__(self, cfg_json: dict[str, Any], rank: int, world_size: int) -> None:
        self.cfg = ExperimentConfig.model_validate(cfg_json)
        self.rank, self.world_size = rank, world_size
        # Built by join(), which the driver calls on every rank before any other method.
        self.trainer: FSDPTrainer | DeepSpeedTrainer

    def address(self) -> str:
        """tcp://<this node's IP>:<a free port>: rank 0 hosts the group's rendezvous (on
        loopback when the run has one node)."""
        multi_node = self.cfg.cluster.nodes > 1
        host = socket.gethostbyname(socket.gethostname()) if multi_node else "127.0.0.1"
        with socket.socket() as s:
            s.bind(("" if multi_node else "127.0.0.1", 0))
            return f"tcp://{host}:{s.getsockname()[1]}"

    def join(self, init_method: str, weights: dict[str, torch.Tensor]) -> None:
        """Join the group and build this rank's trainer from the driver's `weights`."""
        import os

        import torch.distributed as dist

        cfg = self.cfg
        on_gpu = cfg.cluster.gpus_per_node > 0
        # Launchers (torchrun, deepspeed) set these; DeepSpeed asserts LOCAL_RANK. Ray gives a
        # GPU actor one visible device (cuda:0); CPU ranks of a node count from 0.
        per_node = cfg.cluster.gpus_per_node or cfg.cluster.cpu_ranks_per_node
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0" if on_gpu else str(self.rank % per_node),
        )
        dist.init_process_group(
            "nccl" if on_gpu else "gloo",
            init_method=init_method,
            rank=self.rank,
            world_size=self.world_size,
        )
        seed_everything(cfg.run.seed)
        self.device = torch.device("cuda:0" if on_gpu else "cpu")
        if on_gpu:
            torch.cuda.set_device(self.device)
        # Built on the CPU in float32, given the driver's weights, then sharded by the engine.
        model, self.tokenizer = load_policy(cfg.model, device="cpu", seed=cfg.run.seed)
        with torch.no_grad():
            model.load_state_dict(weights)
        # The rollout engine's unsharded weights in the compute dtype: decoding never waits on
        # a collective (each rank decodes a different number of steps). vLLM keeps its own
        # copy on the GPU, so for it this one stays on the CPU as the staging buffer.
        copy_device = "cpu" if cfg.rollout.engine == "vllm" else self.device
        self.generation_model = copy.deepcopy(model).to(copy_device, export_dtype(cfg.model))
        self.trainer = build_rank_trainer(cfg, model, trainer_options(cfg, self.device))
        self.engine = build_engine(
            cfg,
            self.generation_model,
            self.tokenizer,
            self.device,
            vllm_model_dir=cfg.run_dir() / f"vllm_model_rank{self.rank}",
        )

    def _weights_changed(self) -> None:
        self.trainer.refresh_generation_copy(self.generation_model)
        self.engine.sync_weights(self.generation_model)

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.trainer.load_full_weights(weights)
        self._weights_changed()

    def weights(self) -> dict[str, torch.Tensor] | None:
        """The float32 masters of the whole model on rank 0 (None elsewhere), on the CPU."""
        return self.trainer.full_weights()

    def rl_step(self, batch: TokenBatch, rows_per_minibatch: int | None) -> dict[str, float]:
        try:
            with engine_asleep(self.engine):
                return self.trainer.rl_step(batch, rows_per_minibatch=rows_per_minibatch)
        finally:
            self._weights_changed()

    def sft_step(self, batch: TokenBatch) -> dict[str, float]:
        try:
            with engine_asleep(self.engine):
                return self.trainer.sft_step(batch)
        finally:
            self._weights_changed()

    def sample(self, request: SamplingRequest) -> list[list[Sample]]:
        return self.engine._sample_ids(request)

    def state_dict(self) -> dict:
        return self.trainer.state_dict()

    def memory_bytes(self) -> dict[str, int]:
        return self.trainer.memory_bytes()

    def save_sharded(self, directory: str) -> None:
        self.trainer.save_sharded(Path(directory))

    def load_sharded(self, directory: str, state: dict) -> None:
        self.trainer.load_state_dict(state)
        self.trainer.load_sharded(Path(directory))
        self._weights_changed()

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def build_rank_trainer(
    cfg: ExperimentConfig, model: torch.nn.Module, options: dict
) -> FSDPTrainer | DeepSpeedTrainer:
    """cluster.trainer_strategy's trainer for one rank of an initialised process group."""
    if cfg.cluster.trainer_strategy == "deepspeed_zero3":
        from relift_core.runtime.deepspeed_trainer import DeepSpeedTrainer

        return DeepSpeedTrainer(model, zero_stage=3, **options)
    from relift_core.runtime.fsdp_trainer import FSDPTrainer

    return FSDPTrainer(model, **options)


class RayRanks:
    """The driver's handle on the rank actors: started together, joined in one group."""

    def __init__(self, cfg: ExperimentConfig, model: torch.nn.Module) -> None:
        ray = _ray()
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cluster = cfg.cluster
        if not ray.is_initialized():
            # None starts a one-node Ray here; "auto" / "ray://..." joins a running cluster.
            ray.init(
                address=cluster.ray_address,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        self.world_size = cluster.world_size
        bundle = {"CPU": 1, "GPU": 1} if cluster.gpus_per_node else {"CPU": 1}
        self._remove_pg = remove_placement_group
        self.pg = placement_group([bundle] * self.world_size, strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=120)
        except Exception as e:
            remove_placement_group(self.pg)
            raise RuntimeError(
                f"the Ray cluster cannot place {self.world_size} ranks of {bundle} within 120 s "
                f"(it has {ray.cluster_resources()}); lower cluster.nodes/gpus_per_node/"
                "cpu_ranks_per_node or add nodes"
            ) from e
        actor = ray.remote(TrainerRank)
        cfg_json = cfg.model_dump(mode="json")
        self.actors = [
            actor.options(
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=rank
                ),
            ).remote(cfg_json, rank, self.world_size)
            for rank in range(self.world_size)
        ]
        init_method = ray.get(self.actors[0].address.remote())
        # Every rank starts from the driver's weights (sent once, through the object store).
        weights = ray.put({k: v.detach().to("cpu") for k, v in model.state_dict().items()})
        ray.get([a.join.remote(init_method, weights) for a in self.actors])

    def call(self, method: str, *args: Any) -> list[Any]:
        """`method(*args)` on every rank at once (collective calls need all ranks); their
        results in rank order. Large arguments travel once, through Ray's object store."""
        ray = _ray()
        refs = [ray.put(a) if isinstance(a, (TokenBatch, dict)) else a for a in args]
        return ray.get([getattr(a, method).remote(*refs) for a in self.actors])

    def push_weights(self, model: torch.nn.Module) -> None:
        weights = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
        self.call("set_weights", weights)

    def close(self) -> None:
        ray = _ray()
        with contextlib.suppress(ray.exceptions.RayError):  # a rank already gone: killed below
            ray.get([a.shutdown.remote() for a in self.actors], timeout=30)
        for a in self.actors:
            ray.kill(a)
        self._remove_pg(self.pg)


class RayTrainer:
    """The trainer interface of TorchTrainer (rl_step, sft_step, state_dict, ...) on the ranks.
    `model` is the driver's copy of the weights (float32 masters), refreshed by
    `gather_weights` for checkpoints and the final model."""

    def __init__(self, ranks: RayRanks, model: torch.nn.Module, strategy: str) -> None:
        self.ranks, self.model, self.strategy = ranks, model, strategy
        self.rl_optimizer_steps = 0
        self.sft_optimizer_steps = 0

    def rl_step(
        self, batch: TokenBatch, *, rows_per_minibatch: int | None = None
    ) -> dict[str, float]:
        stats = self.ranks.call("rl_step", batch, rows_per_minibatch)[0]
        self.rl_optimizer_steps += int(stats.get("optimizer_steps", 0))
        return stats

    def sft_step(self, batch: TokenBatch) -> dict[str, float]:
        stats = self.ranks.call("sft_step", batch)[0]
        self.sft_optimizer_steps += int(stats.get("optimizer_steps", 0))
        return stats

    def gather_weights(self) -> None:
        weights = self.ranks.call("weights")[0]
        with torch.no_grad():
            self.model.load_state_dict(weights)

    def state_dict(self) -> dict:
        """Step counters and the layout; the optimizer states are the ranks' own files
        (`save_sharded`), written into the same checkpoint."""
        return {
            "version": STATE_VERSION,
            "strategy": self.strategy,
            "world_size": self.ranks.world_size,
            "ranks": self.ranks.call("state_dict"),
            "rl_optimizer_steps": self.rl_optimizer_steps,
            "sft_optimizer_steps": self.sft_optimizer_steps,
        }

    def save_sharded(self, directory: Path) -> None:
        """Every rank writes its optimizer shard into `directory` (inside the checkpoint's
        temporary directory, so it appears atomically with the rest; the driver and the ranks
        share its filesystem)."""
        self.ranks.call("save_sharded", str(directory))

    def load_state_dict(self, state: dict) -> None:
        """The layout is checked here, before anything is loaded; `load_sharded` loads."""
        saved = (state.get("strategy"), state.get("world_size"))
        here = (self.strategy, self.ranks.world_size)
        if saved != here:
            raise ShardCountError(
                f"the checkpoint was written by {saved[1] or 1} trainer rank(s) with "
                f"cluster.trainer_strategy={saved[0]}; this run has {here[1]} with {here[0]} "
                "(trainer_state keys strategy, world_size). Resume with the same strategy and as "
                "many ranks (cluster.nodes, gpus_per_node, cpu_ranks_per_node)"
            )
        self._pending_state = state

    def load_sharded(self, directory: Path) -> None:
        """The driver's weights (just loaded from the checkpoint) to every rank, then every
        rank's optimizer shard from `directory`."""
        state = self._pending_state
        self.ranks.push_weights(self.model)
        ray = _ray()
        ray.get(
            [
                a.load_sharded.remote(str(directory), s)
                for a, s in zip(self.ranks.actors, state["ranks"], strict=True)
            ]
        )
        self.rl_optimizer_steps = int(state["rl_optimizer_steps"])
        self.sft_optimizer_steps = int(state["sft_optimizer_steps"])

    def close(self) -> None:
        self.ranks.close()


class RayRolloutEngine(RolloutEngine):
    """Rollouts on the ranks: the prompts in contiguous shards, one per rank, each shard seeded
    from its first prompt's index (seed + first * n), so prompt i's samples draw the same
    streams whichever rank samples them and no two ranks' streams overlap."""

    def __init__(self, ranks: RayRanks, tokenizer) -> None:
        self.ranks, self.tokenizer = ranks, tokenizer

    def _sample_ids(self, request: SamplingRequest) -> list[list[Sample]]:
        ray = _ray()
        count, world = len(request.prompt_ids), self.ranks.world_size
        bounds = [count * r // world for r in range(world + 1)]
        refs = []
        for r, actor in enumerate(self.ranks.actors):
            lo, hi = bounds[r], bounds[r + 1]
            if lo == hi:
                continue
            # Offset by the shard's first prompt: prompt i is seeded as one engine seeds it
            # (seed + i * n, its samples + j), so no two ranks' samples share a stream.
            shard = replace(
                request,
                prompt_ids=request.prompt_ids[lo:hi],
                progress=None,
                seed=None if request.seed is None else request.seed + lo * request.n,
            )
            refs.append((lo, actor.sample.remote(shard)))
        out: list[list[Sample]] = []
        for lo, ref in refs:
            for group in ray.get(ref):
                out.append([replace(s, prompt_index=s.prompt_index + lo) for s in group])
        if request.progress is not None:
            request.progress(count, count)
        return out

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing to send: each rank's engine samples from the weights that rank trains."""

    def sleep(self) -> None:
        """The ranks put their engines to sleep around each update themselves."""

    def wake(self) -> None:
        """See `sleep`."""
