"""One process's policy machinery built from the config: seeded RNGs, the rollout engine, the
trainer's settings. The training session, each Ray rank, the evaluation flow and the level
measurement build theirs the same way, from here."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from relift_core.config import ExperimentConfig
from relift_core.runtime.models import compute_autocast
from relift_core.runtime.rollout import HFRolloutEngine, RolloutEngine


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_engine(
    cfg: ExperimentConfig, model, tokenizer, device, vllm_model_dir: Path | None = None
) -> RolloutEngine:
    """`vllm_model_dir`: where vLLM's starting weights are saved (one directory per process
    that builds an engine: each Ray rank has its own)."""
    if cfg.rollout.engine == "vllm":
        from relift_core.runtime.vllm_engine import VLLMRolloutEngine

        return VLLMRolloutEngine.from_config(cfg, model, tokenizer, model_dir=vllm_model_dir)
    # The HF engine samples from the trainer's own model object: no weight sync needed.
    return HFRolloutEngine(
        model,
        tokenizer,
        batch_size=cfg.rollout.batch_size,
        device=device,
        bf16_autocast=compute_autocast(cfg.model),
        share_prompts=cfg.model.share_prompts,
    )


def trainer_options(cfg: ExperimentConfig, device) -> dict:
    """The config's trainer settings, as TorchTrainer (and its subclasses) take them."""
    return {
        "algo": cfg.algorithm,
        "rl": cfg.rl,
        "sft": cfg.sft,
        "max_response_len": cfg.rollout.max_new_tokens,
        "device": str(device),
        "dtype": cfg.model.dtype,
        "max_bad_steps": cfg.run.max_bad_steps,
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "bf16_autocast": compute_autocast(cfg.model),
        "remove_padding": cfg.model.remove_padding,
        "share_prompts": cfg.model.share_prompts,
        "logit_chunk_tokens": cfg.model.logit_chunk_tokens,
    }
