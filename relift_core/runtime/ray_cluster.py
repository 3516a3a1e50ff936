"""One run across ranks on Ray (cluster.backend=ray), the way verl and OpenRLHF place workers.

    driver (the process running the train flow)         Ray actors, one per GPU / CPU rank
    ----------------------------------------------      -------------------------------------
    run state: buffer, ledger, data position, RNG        TrainerRank r: the policy's weights,
    RayRolloutEngine: shards the prompts over ranks  ->    a rollout engine over them (HF on
                      and gathers their samples            CPU, vLLM on GPU: sleeps while the
    RayTrainer: sends each batch to every rank      ->     trainer steps), and a ShardedTrainer
                and returns rank 0's (reduced) stats       in one torch.distributed group
    checkpoint: rank 0's weights + every rank's                (gloo on CPU, NCCL on GPU)
                optimizer shard, written atomically
                by the driver (checkpoint.py)

Actors are placed by one placement group of `world_size` bundles ({"GPU": 1, "CPU": 1} per
GPU rank, {"CPU": 1} per CPU rank; PACK: ranks of a node stay together). A rank samples from the
weights it trains, so new weights reach the HF engines with no copy; a vLLM engine loads them in
memory after every update (`sync_weights`). The driver keeps a copy of the weights only for
checkpoints and the final model (`gather_weights`).

Nothing here imports Prefect or MLflow; Ray is imported only when a run asks for it.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import replace
from typing import Any

import torch

from relift_core.config import ExperimentConfig
from relift_core.iteration import engine_asleep
from relift_core.runtime.batches import TokenBatch
from relift_core.runtime.rollout import RolloutEngine, Sample, SamplingRequest
from relift_core.runtime.trainer import STATE_VERSION

RAY_HINT = "pip install 'relift[cluster]' (Ray 2.60)"


class RayUnavailableError(ImportError):
    """cluster.backend=ray without Ray installed."""


def _ray():
    try:
        import ray
    except ImportError as e:
        raise RayUnavailableError(f"cluster.backend=ray needs Ray: {RAY_HINT}") from e
    return ray


class TrainerRank:
    """One rank: its process group membership, its copy of the policy, its trainer and engine.
    Created through Ray (`ray.remote(TrainerRank)`); every method runs in the actor."""

    def __init__(self, cfg_json: dict[str, Any], rank: int, world_size: int) -> None:
        self.cfg = ExperimentConfig.model_validate(cfg_json)
        self.rank, self.world_size = rank, world_size
        self.trainer = None

    def address(self) -> str:
        """tcp://<this node's IP>:<a free port>: rank 0 hosts the group's rendezvous."""
        host = socket.gethostbyname(socket.gethostname()) if self.cfg.cluster.nodes > 1 else "127.0.0.1"
        with socket.socket() as s:
            s.bind(("", 0))
            return f"tcp://{host}:{s.getsockname()[1]}"

    def join(self, init_method: str) -> None:
        import torch.distributed as dist

        from relift_core.runtime.models import load_policy
        from relift_core.runtime.session import build_engine, seed_everything, trainer_options
        from relift_core.runtime.sharded_trainer import ShardedTrainer

        cfg = self.cfg
        on_gpu = cfg.cluster.gpus_per_node > 0
        dist.init_process_group("nccl" if on_gpu else "gloo", init_method=init_method,
                                rank=self.rank, world_size=self.world_size)
        seed_everything(cfg.run.seed)
        # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU: it is cuda:0 here.
        self.device = torch.device("cuda:0" if on_gpu else "cpu")
        self.model, self.tokenizer = load_policy(cfg.model, device=str(self.device),
                                                 seed=cfg.run.seed)
        options = trainer_options(cfg, self.device)
        if cfg.cluster.trainer_strategy == "deepspeed_zero3":  # GPU only; not yet run on one
            from relift_core.runtime.deepspeed_trainer import DeepSpeedTrainer

            self.trainer = DeepSpeedTrainer(self.model, zero_stage=3, **options)
        else:
            self.trainer = ShardedTrainer(self.model, **options)
        self.engine = build_engine(cfg, self.model, self.tokenizer, self.device)

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.model.load_state_dict(weights)
        self.engine.sync_weights(self.model)

    def weights(self) -> dict[str, torch.Tensor] | None:
        """The whole weights on rank 0 (None elsewhere); every rank must be called (ZeRO-3
        gathers its partitions collectively)."""
        full = self.trainer.full_weights()
        if self.rank != 0:
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in full.items()}

    def local_weights(self) -> dict[str, torch.Tensor]:
        """This rank's own copy (a ZeRO-3 rank holds only its partition)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def rl_step(self, batch: TokenBatch, rows_per_minibatch: int | None) -> dict[str, float]:
        try:
            with engine_asleep(self.engine):
                return self.trainer.rl_step(batch, rows_per_minibatch=rows_per_minibatch)
        finally:
            self.engine.sync_weights(self.model)

    def sft_step(self, batch: TokenBatch) -> dict[str, float]:
        try:
            with engine_asleep(self.engine):
                return self.trainer.sft_step(batch)
        finally:
            self.engine.sync_weights(self.model)

    def sample(self, request: SamplingRequest) -> list[list[Sample]]:
        return self.engine._sample_ids(request)

    def state_dict(self) -> dict:
        return self.trainer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.trainer.load_state_dict(state)

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class RayRanks:
    """The driver's handle on the rank actors: started together, joined in one group."""

    def __init__(self, cfg: ExperimentConfig, model: torch.nn.Module) -> None:
        ray = _ray()
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cluster = cfg.cluster
        if not ray.is_initialized():
            # None starts a one-node Ray here; "auto" / "ray://..." joins a running cluster.
            ray.init(address=cluster.ray_address, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
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
                "cpu_ranks_per_node or add nodes") from e
        actor = ray.remote(TrainerRank)
        cfg_json = cfg.model_dump(mode="json")
        self.actors = [
            actor.options(
                num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=rank),
            ).remote(cfg_json, rank, self.world_size)
            for rank in range(self.world_size)
        ]
        init_method = ray.get(self.actors[0].address.remote())
        ray.get([a.join.remote(init_method) for a in self.actors])
        self.push_weights(model)  # every rank starts from the driver's weights

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
    `model` is the driver's copy of the weights, refreshed by `gather_weights`."""

    def __init__(self, ranks: RayRanks, model: torch.nn.Module) -> None:
        self.ranks, self.model = ranks, model
        self.rl_optimizer_steps = 0
        self.sft_optimizer_steps = 0

    def rl_step(self, batch: TokenBatch, *, rows_per_minibatch: int | None = None) -> dict[str, float]:
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
        return {"version": STATE_VERSION, "world_size": self.ranks.world_size,
                "ranks": self.ranks.call("state_dict"),
                "rl_optimizer_steps": self.rl_optimizer_steps,
                "sft_optimizer_steps": self.sft_optimizer_steps}

    def load_state_dict(self, state: dict) -> None:
        """Every rank's optimizer shard, and the driver's weights (just loaded by
        load_checkpoint) to every rank."""
        from relift_core.runtime.sharded_trainer import ShardCountError

        saved = state.get("world_size")
        if saved != self.ranks.world_size:
            raise ShardCountError(
                f"the checkpoint holds optimizer shards of {saved or 1} trainer rank(s); this run "
                f"has {self.ranks.world_size}. Resume with as many ranks (cluster.nodes, "
                "gpus_per_node, cpu_ranks_per_node)")
        ray = _ray()
        ray.get([a.load_state_dict.remote(s)
                 for a, s in zip(self.ranks.actors, state["ranks"], strict=True)])
        self.ranks.push_weights(self.model)
        self.rl_optimizer_steps = int(state["rl_optimizer_steps"])
        self.sft_optimizer_steps = int(state["sft_optimizer_steps"])

    def close(self) -> None:
        self.ranks.close()


class RayRolloutEngine(RolloutEngine):
    """Rollouts on the ranks: the prompts in contiguous shards, one per rank, each sampled with
    its own seed (seed + shard index, so a run is reproducible for a fixed number of ranks)."""

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
            shard = replace(request, prompt_ids=request.prompt_ids[lo:hi], progress=None,
                            seed=None if request.seed is None else request.seed + lo * request.n)
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
