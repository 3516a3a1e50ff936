"""Assembles a training session from the config: policy, rollout engine, trainer, grader, and
the run state (buffer, ledger, data position), resumed from the run's last checkpoint if any."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from relift_core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from relift_core.config import ExperimentConfig
from relift_core.data import Example
from relift_core.demo_buffer import DemoBuffer
from relift_core.demonstrations import DatasetDemonstrations, DemonstrationSource
from relift_core.difficulty import DifficultyLedger
from relift_core.grader import BatchGrader
from relift_core.iteration import RunState
from relift_core.models import load_policy, resolve_device
from relift_core.question_stream import QuestionStream
from relift_core.rollout import HFRolloutEngine, RolloutEngine
from relift_core.strategies import Strategy, strategy_for
from relift_core.trainer import TorchTrainer


@dataclass
class TrainSession:
    cfg: ExperimentConfig
    model: torch.nn.Module
    tokenizer: object
    engine: RolloutEngine
    trainer: TorchTrainer
    grader: BatchGrader
    demos: DemonstrationSource
    strategy: Strategy
    state: RunState
    dataset: list[Example]
    resumed_from: Path | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.cfg.run_dir() / "checkpoints"

    def save(self) -> Path:
        return save_checkpoint(self.checkpoint_dir, model=self.model, tokenizer=self.tokenizer,
                               trainer_state=self.trainer.state_dict(), step=self.state.iteration,
                               extra_state=self.state.extra_state())

    def close(self) -> None:
        self.grader.close()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_engine(cfg: ExperimentConfig, model, tokenizer, device) -> RolloutEngine:
    if cfg.rollout.engine == "vllm":
        from relift_core.vllm_engine import VLLMRolloutEngine

        return VLLMRolloutEngine.from_config(cfg, model, tokenizer)
    # The HF engine samples from the trainer's own model object: no weight sync needed.
    return HFRolloutEngine(model, tokenizer, batch_size=cfg.rollout.batch_size, device=device)


def build_session(cfg: ExperimentConfig, dataset: list[Example], *, resume: bool = True) -> TrainSession:
    seed_everything(cfg.run.seed)
    device = resolve_device(cfg.run.device)
    model, tokenizer = load_policy(cfg.model, device=str(device), seed=cfg.run.seed)
    trainer = TorchTrainer(model, algo=cfg.algorithm, rl=cfg.rl, sft=cfg.sft,
                           max_response_len=cfg.rollout.max_new_tokens, device=str(device),
                           dtype=cfg.model.dtype)
    state = RunState(
        iteration=0,
        buffer=DemoBuffer(cfg.algorithm.sft_buffer_threshold),
        ledger=DifficultyLedger(),
        stream=QuestionStream(len(dataset), seed=cfg.run.seed, shuffle=cfg.data.shuffle),
    )
    resumed_from = latest_checkpoint(cfg.run_dir() / "checkpoints") if resume else None
    if resumed_from is not None:
        restored = load_checkpoint(resumed_from, model=model, trainer=trainer)
        state.load_extra_state(restored["extra_state"])
    return TrainSession(
        cfg=cfg, model=model, tokenizer=tokenizer,
        engine=build_engine(cfg, model, tokenizer, device), trainer=trainer,
        grader=BatchGrader(workers=cfg.run.grader_workers, timeout_s=cfg.run.grader_timeout_s),
        demos=DatasetDemonstrations(),
        strategy=strategy_for(cfg.algorithm.name, sft_threshold=cfg.algorithm.sft_buffer_threshold,
                              sft_then_rl_switch=cfg.algorithm.sft_then_rl_switch),
        state=state, dataset=dataset, resumed_from=resumed_from,
    )
