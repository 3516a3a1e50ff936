"""Checkpoints: exact resume, atomic layout, pruning, and refusal of anything incomplete."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from relift_core.config import AlgorithmConfig, RLConfig, SFTConfig, TinyModelConfig
from relift_core.runtime.batches import TokenBatch, pack_rows, sft_batch
from relift_core.runtime.checkpoint import (
    MANIFEST,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from relift_core.runtime.models import build_tiny_model
from relift_core.runtime.trainer import TorchTrainer


def _model_and_trainer(tokenizer, seed: int = 0, architecture: str = "qwen2"):
    model = build_tiny_model(TinyModelConfig(architecture=architecture), tokenizer, seed=seed)
    trainer = TorchTrainer(
        model,
        algo=AlgorithmConfig(),
        rl=RLConfig(lr=1e-3, micro_batch_size=2, mini_batch_size=1, prompts_per_step=2),
        sft=SFTConfig(lr=5e-4, micro_batch_size=2, mini_batch_size=2),
        max_response_len=16,
    )
    return model, trainer


def _batches(tokenizer) -> tuple[TokenBatch, TokenBatch]:
    rl = pack_rows(
        [[5, 6, 7], [5, 6]], [[8, 9], [10, 11, 12]], tokenizer.pad_token_id, advantages=[1.0, -1.0]
    )
    prompt = "<|im_start|>user\n2*3<|im_end|>\n<|im_start|>assistant\n"
    sft = sft_batch(tokenizer, [prompt, prompt], ["6", "<think>2*3</think>6"], 16)
    return rl, sft


def _two_steps(trainer, rl: TokenBatch, sft: TokenBatch) -> None:
    trainer.rl_step(rl)
    trainer.sft_step(sft)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_from_a_checkpoint_is_bitwise_identical(tokenizer, tmp_path):
    rl, sft = _batches(tokenizer)
    model, trainer = _model_and_trainer(tokenizer)
    _two_steps(trainer, rl, sft)
    ckpt = save_checkpoint(
        tmp_path,
        model=model,
        tokenizer=tokenizer,
        trainer_state=trainer.state_dict(),
        step=2,
        extra_state={"buffer": ["q1"], "position": 7},
    )
    after_save = (torch.rand(3), random.random(), np.random.rand())
    _two_steps(trainer, rl, sft)

    fresh_model, fresh_trainer = _model_and_trainer(tokenizer, seed=123)
    restored = load_checkpoint(ckpt, model=fresh_model, trainer=fresh_trainer)
    assert restored["step"] == 2
    assert restored["extra_state"] == {"buffer": ["q1"], "position": 7}
    # RNG states are restored too: the same draws follow the load as followed the save.
    assert torch.equal(torch.rand(3), after_save[0])
    assert (random.random(), np.random.rand()) == after_save[1:]
    assert (fresh_trainer.rl_optimizer_steps, fresh_trainer.sft_optimizer_steps) == (2, 1)
    _two_steps(fresh_trainer, rl, sft)
    expected, actual = _weights(model), _weights(fresh_model)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_checkpoint_layout_manifest_and_hf_loadable(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model, trainer = _model_and_trainer(tokenizer)
    ckpt = save_checkpoint(
        tmp_path, model=model, tokenizer=tokenizer, trainer_state=trainer.state_dict(), step=5
    )
    assert ckpt == tmp_path / "step_000005"
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert {"trainer_state.pt", "rng_state.pt", "state.json"} <= set(manifest["files"])
    assert any(name.endswith(".safetensors") for name in manifest["files"])
    assert not list(tmp_path.glob(".tmp-*"))
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt / "model")
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_keeps_the_newest_k_and_latest_ignores_incomplete_and_tmp(tokenizer, tmp_path):
    model, trainer = _model_and_trainer(tokenizer)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model=model, trainer_state=trainer.state_dict(), step=step)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000002", "step_000003"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000003"
    # A crashed write (tmp dir) and a step dir without a manifest are both passed over.
    (tmp_path / ".tmp-step_000009-abcd").mkdir()
    (tmp_path / "step_000007").mkdir()
    (tmp_path / "step_000007" / "state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000003"
    # A truncated file in the newest makes latest fall back to the previous one.
    (tmp_path / "step_000003" / "trainer_state.pt").write_bytes(b"x")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000002"
    assert latest_checkpoint(tmp_path / "nothing-here") is None
    # Re-saving an existing step replaces it whole.
    save_checkpoint(tmp_path, model=model, trainer_state=trainer.state_dict(), step=3)
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000003"


def _safetensors_file(ckpt: Path) -> Path:
    return next((ckpt / "model").glob("*.safetensors"))


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda c: _safetensors_file(c).unlink(), "safetensors"),
        (lambda c: (c / "trainer_state.pt").unlink(), "trainer_state.pt"),
        (
            lambda c: _safetensors_file(c).write_bytes(_safetensors_file(c).read_bytes()[:-100]),
            "safetensors",
        ),
        (lambda c: _flip_last_byte(_safetensors_file(c)), "sha256"),
        (lambda c: _flip_last_byte(c / "rng_state.pt"), "rng_state.pt"),
        (lambda c: (c / MANIFEST).unlink(), "manifest.json"),
        (lambda c: (c / MANIFEST).write_text("{not json"), "manifest.json"),
    ],
    ids=[
        "missing-weights",
        "missing-trainer-state",
        "truncated",
        "modified",
        "modified-rng",
        "no-manifest",
        "bad-manifest",
    ],
)
def test_damaged_checkpoint_is_refused_and_the_model_untouched(tokenizer, tmp_path, damage, named):
    model, trainer = _model_and_trainer(tokenizer)
    ckpt = save_checkpoint(tmp_path, model=model, trainer_state=trainer.state_dict(), step=1)
    damage(ckpt)
    other, other_trainer = _model_and_trainer(tokenizer, seed=99)
    before = _weights(other)
    with pytest.raises(CheckpointError, match=named):
        load_checkpoint(ckpt, model=other, trainer=other_trainer)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    assert other_trainer.rl_optimizer_steps == 0


def test_a_checkpoint_of_another_architecture_is_refused_before_copying(tokenizer, tmp_path):
    model, trainer = _model_and_trainer(tokenizer)
    ckpt = save_checkpoint(tmp_path, model=model, trainer_state=trainer.state_dict(), step=1)
    bigger = build_tiny_model(
        TinyModelConfig(hidden_size=32, num_heads=2, num_kv_heads=1), tokenizer
    )
    before = _weights(bigger)
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(ckpt, model=bigger)
    assert all(torch.equal(before[k], v) for k, v in bigger.state_dict().items())


def test_unserialisable_extra_state_leaves_nothing_behind(tokenizer, tmp_path):
    model, trainer = _model_and_trainer(tokenizer)
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(
            tmp_path,
            model=model,
            trainer_state=trainer.state_dict(),
            step=1,
            extra_state={"bad": object()},
        )
    assert list(tmp_path.iterdir()) == []
