"""The proof-world's base model: a tiny Qwen2 pretrained from scratch on part of the world.

It plays the role a pretrained LLM plays in the paper: competent on what pretraining showed,
shaky at its edges, ignorant of the rest -- so that its training questions fall into all four
difficulty levels and RL, SFT and ReLIFT have something different to do on each.
The levels it leaves are measured by `relift_core.grading.levels.measure_levels`, like any policy's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2ForCausalLM,
)

from relift_core.config import TinyModelConfig, WorldConfig
from relift_core.proofworld.problems import Problem, build_world
from relift_core.runtime.char_tokenizer import build_char_tokenizer
from relift_core.runtime.models import build_tiny_model, save_policy

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PretrainDefaults:
    """Pretraining settings tuned on the toy world (hidden 64, 2 layers, 20k examples).

    1000 steps x 32 sequences is ~90 s on one busy CPU core and leaves the model competent on
    one-digit cells (easy), shaky on two-digit cells (hard/medium: RL has signal there) and
    blind to three digits and to `chain` (hardest). Many more steps make two-digit cells easy;
    far fewer leave everything hardest. lr 5e-3 is high but stable for a 100k-parameter model.
    """

    steps: int = 1000
    lr: float = 5e-3
    batch_size: int = 32
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0


PRETRAIN_DEFAULTS = PretrainDefaults()


def render_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """The chat-rendered prompt exactly as the rollout engine will render it."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )


def encode_demonstrations(
    tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), right-padded; labels only on demonstration + eos.

    The loss skips the prompt: the model never has to predict questions, which would spend
    its few parameters on a distribution nobody samples from.
    """
    # One batched tokenizer call per side: ~50x faster than a call per problem.
    prompts = tokenizer(
        [render_prompt(tokenizer, p.question) for p in problems], add_special_tokens=False
    )["input_ids"]
    answers = tokenizer([p.demonstration for p in problems], add_special_tokens=False)["input_ids"]
    rows: list[tuple[list[int], list[int]]] = []
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = prompt + answer + [tokenizer.eos_token_id]
        rows.append((ids, [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return input_ids, attention, labels


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_on_problems(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    warmup_steps: int = PRETRAIN_DEFAULTS.warmup_steps,
    weight_decay: float = PRETRAIN_DEFAULTS.weight_decay,
    grad_clip: float = PRETRAIN_DEFAULTS.grad_clip,
    progress: Callable[[int, int, float], None] | None = None,
) -> list[float]:
    """Next-token training on demonstrations (AdamW, warmup + cosine); returns per-step losses."""
    input_ids, attention, labels = encode_demonstrations(tokenizer, problems)
    lengths = attention.sum(dim=1)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, steps, min(warmup_steps, max(1, steps // 10)))
    )
    model.train()
    losses: list[float] = []
    for step in range(steps):
        idx = torch.randint(len(problems), (batch_size,), generator=gen)
        width = int(lengths[idx].max())  # trim the batch's padding columns: ~2x less compute
        out = model(
            input_ids=input_ids[idx, :width],
            attention_mask=attention[idx, :width],
            labels=labels[idx, :width],
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
        if progress is not None:
            progress(step + 1, steps, losses[-1])
    model.eval()
    return losses


def load_base_model(path: Path) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerBase]:
    """Load a saved base model and its character tokenizer.

    Not AutoTokenizer: for a `qwen2` model dir it builds Qwen2Tokenizer, whose byte-level
    pre-tokenizer silently drops the spaces and newlines of our character vocabulary.
    """
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    tokenizer.padding_side = "left"
    return Qwen2ForCausalLM.from_pretrained(path), tokenizer


def base_model_key(cfg) -> str:
    """The cache key of a world's base model: the world (its seed is the pretraining seed) and the
    model's shape. Run seeds do not enter: every run seed starts from the same base model, as
    every seed of the paper starts from the same Qwen2.5-Math."""
    import hashlib
    import json

    blob = json.dumps(
        {
            "world": cfg.data.world.model_dump(mode="json"),
            "tiny": cfg.model.tiny.model_dump(mode="json"),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pretrain_base_model(
    world_cfg: WorldConfig,
    tiny_cfg: TinyModelConfig,
    out_dir: Path,
    *,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Train a tiny Qwen2 from scratch on the world's pretrain split and save it to `out_dir`.

    Steps, learning rate, batch size and seed default to the world's own (pretrain_* and seed)."""
    steps = world_cfg.pretrain_steps if steps is None else steps
    lr = world_cfg.pretrain_lr if lr is None else lr
    batch_size = world_cfg.pretrain_batch_size if batch_size is None else batch_size
    seed = world_cfg.seed if seed is None else seed
    tokenizer = build_char_tokenizer()
    problems = build_world(world_cfg)["pretrain"]
    if not problems:
        raise ValueError("the world has no pretraining examples (pretrain_examples=0?)")
    model = build_tiny_model(tiny_cfg, tokenizer, seed)
    start = time.perf_counter()
    losses = train_on_problems(
        model,
        tokenizer,
        problems,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    save_policy(model, tokenizer, out_dir)
    tail = losses[-max(1, min(20, len(losses))) :]
    return {
        "initial_loss": losses[0] if losses else float("nan"),
        "final_loss": sum(tail) / len(tail) if tail else float("nan"),
        "seconds": seconds,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "examples": len(problems),
        "out_dir": str(out_dir),
    }
