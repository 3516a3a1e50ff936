"""Divergence never reaches a checkpoint (issue 13, item 2): absurd learning rates are refused by
the config; a step that would write NaN/inf or exploded weights is skipped or rolled back and
counted, and repeated ones raise DivergenceError; checkpoints refuse non-finite weights and
resuming passes over a diverged checkpoint. Tiny model on CPU, seconds."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from relift_core.config import (
    AlgorithmConfig,
    ConfigError,
    RLConfig,
    SFTConfig,
    TinyModelConfig,
    load_config,
)
from relift_core.runtime import checkpoint as checkpoint_module
from relift_core.runtime.batches import pack_rows, sft_batch
from relift_core.runtime.checkpoint import (
    MANIFEST,
    CheckpointError,
    NonFiniteWeightsError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from relift_core.runtime.models import build_tiny_model
from relift_core.runtime.trainer import DivergenceError, TorchTrainer


def _trainer(tokenizer, *, rl_lr: float = 1e-3, sft_lr: float = 1e-3, **kwargs):
    """A trainer whose configs carry the given learning rates even where validation would refuse
    them (model_construct): what the trainer must survive if a bad value gets past the config."""
    model = build_tiny_model(TinyModelConfig(), tokenizer, seed=0)
    rl = RLConfig.model_construct(**{**RLConfig(micro_batch_size=8).model_dump(), "lr": rl_lr})
    sft = SFTConfig.model_construct(
        **{**SFTConfig(micro_batch_size=8, mini_batch_size=8).model_dump(), "lr": sft_lr}
    )
    trainer = TorchTrainer(
        model, algo=AlgorithmConfig(entropy_coef=0.0), rl=rl, sft=sft, max_response_len=16, **kwargs
    )
    return model, trainer


def _rl_batch(tokenizer):
    # Two mini-batches of one row each (prompts_per_step 128 / mini_batch 64): two steps a call.
    return pack_rows(
        [[5, 6, 7], [5, 6]], [[8, 9], [10, 11, 12]], tokenizer.pad_token_id, advantages=[1.0, -1.0]
    )


def _sft_batch(tokenizer):
    prompt = "<|im_start|>user\n2*3<|im_end|>\n<|im_start|>assistant\n"
    return sft_batch(tokenizer, [prompt, prompt], ["6", "<think>2*3</think>6"], 16)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _all_finite(model) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in model.state_dict().values())


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    return [t.clone() for state in optimizer.state.values() for t in state.values()]


# ------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "override",
    [
        "rl.lr=inf",
        "rl.lr=nan",
        "rl.lr=.inf",
        "sft.lr=inf",
        "sft.lr=nan",
        "rl.lr=1e30",
        "sft.lr=2.0",
        "rl.lr=-1e-3",
    ],
)
def test_config_refuses_non_finite_and_absurd_learning_rates(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config("toy", [override])
    assert f"'{key}'" in str(e.value) and "finite number in (0, 1]" in str(e.value)
    # the config's lines are the key's line only: one line once the CLI joins them
    assert len(str(e.value).splitlines()) == 2


def test_config_keeps_sane_learning_rates():
    cfg = load_config("toy", ["rl.lr=1.0", "sft.lr=1e-6"])
    assert cfg.rl.lr == 1.0 and cfg.sft.lr == 1e-6
    with pytest.raises(ConfigError, match="rl.lr"):
        load_config("toy", ["rl.lr=fast"])  # not a number: pydantic's own message, key named


# ------------------------------------------------------------------------------------ trainer


def test_inf_learning_rate_step_is_rolled_back_and_counted(tokenizer):
    model, trainer = _trainer(tokenizer, rl_lr=math.inf)
    before = _weights(model)
    stats = trainer.rl_step(_rl_batch(tokenizer))
    assert stats["optimizer_steps"] == 2
    assert stats["skipped_nonfinite"] == 2 and stats["skipped_steps"] == 2
    assert stats["skipped_explosive"] == 0
    assert _same(before, _weights(model)) and _all_finite(model)
    # the optimizer state is as before the steps too (AdamW had none yet)
    assert not trainer.optimizers["rl"].state
    assert math.isfinite(stats["policy_loss"])


def test_huge_learning_rate_rolls_back_weights_and_optimizer_state(tokenizer):
    model, trainer = _trainer(tokenizer)
    trainer.rl_step(_rl_batch(tokenizer))  # two good steps: AdamW now has moments
    assert trainer.optimizers["rl"].state
    before, moments = _weights(model), _optimizer_tensors(trainer.optimizers["rl"])
    trainer.optimizers["rl"].param_groups[0]["lr"] = 1e30
    stats = trainer.rl_step(_rl_batch(tokenizer))
    assert stats["skipped_explosive"] == 2 and stats["skipped_nonfinite"] == 0
    assert _same(before, _weights(model))
    after = _optimizer_tensors(trainer.optimizers["rl"])
    assert len(after) == len(moments)
    assert all(torch.equal(a, b) for a, b in zip(after, moments, strict=True))
    # With a sane learning rate again, training goes on from there.
    trainer.optimizers["rl"].param_groups[0]["lr"] = 1e-3
    stats = trainer.rl_step(_rl_batch(tokenizer))
    assert stats["skipped_steps"] == 0 and not _same(before, _weights(model))


def test_weight_norm_growing_over_100x_is_rolled_back(tokenizer):
    # lr 50 keeps every weight far below 1e4 but multiplies the weight norm by hundreds.
    model, trainer = _trainer(tokenizer, rl_lr=50.0, max_abs_weight=1e9)
    before = _weights(model)
    stats = trainer.rl_step(_rl_batch(tokenizer))
    assert stats["skipped_explosive"] == 2
    assert _same(before, _weights(model))
    # and a larger limit lets the same step through: the growth rule is what refused it
    model, trainer = _trainer(tokenizer, rl_lr=50.0, max_abs_weight=1e9, max_norm_growth=1e6)
    stats = trainer.rl_step(_rl_batch(tokenizer))
    assert stats["skipped_steps"] == 0


def test_sane_steps_take_no_snapshot(tokenizer, monkeypatch):
    """Rolling back needs a copy of weights and optimizer state; sane steps must not pay it."""
    copies = []
    real = TorchTrainer._take_snapshot
    monkeypatch.setattr(
        TorchTrainer, "_take_snapshot", staticmethod(lambda *a: copies.append(1) or real(*a))
    )
    _, trainer = _trainer(tokenizer)
    for _ in range(3):
        assert trainer.rl_step(_rl_batch(tokenizer))["skipped_steps"] == 0
        assert trainer.sft_step(_sft_batch(tokenizer))["skipped_steps"] == 0
    assert copies == []
    trainer.optimizers["rl"].param_groups[0]["lr"] = 1e30
    assert trainer.rl_step(_rl_batch(tokenizer))["skipped_explosive"] == 2
    assert len(copies) == 2  # the risky steps did take one


def test_non_finite_sft_loss_skips_the_step(tokenizer, monkeypatch):
    model, trainer = _trainer(tokenizer)
    real = trainer._sft_micro_loss

    def nan_loss(micro):
        loss, _ = real(micro)
        return loss * float("nan"), {"sft_loss": float("nan")}

    monkeypatch.setattr(trainer, "_sft_micro_loss", nan_loss)
    before = _weights(model)
    stats = trainer.sft_step(_sft_batch(tokenizer))
    assert stats["skipped_nonfinite"] == 1 and stats["optimizer_steps"] == 1
    assert _same(before, _weights(model)) and not trainer.optimizers["sft"].state
    # nan stays out of the averaged stats, which are logged to MLflow
    assert all(math.isfinite(v) for k, v in stats.items() if k != "grad_norm")


def test_consecutive_bad_steps_raise_divergence_error(tokenizer):
    model, trainer = _trainer(tokenizer, rl_lr=math.inf, max_bad_steps=3)
    before = _weights(model)
    trainer.rl_step(_rl_batch(tokenizer))  # 2 bad steps
    with pytest.raises(DivergenceError) as e:
        trainer.rl_step(_rl_batch(tokenizer))  # the third in a row
    message = str(e.value)
    assert "3 optimizer steps in a row" in message and "rl.lr" in message
    assert "\n" not in message
    assert _same(before, _weights(model))


def test_a_good_step_resets_the_bad_step_count(tokenizer):
    _, trainer = _trainer(tokenizer, max_bad_steps=2)
    group = trainer.optimizers["rl"].param_groups[0]
    for _ in range(3):
        group["lr"] = math.inf
        one_bad = trainer.rl_step(_rl_batch(tokenizer).split(1)[0], rows_per_minibatch=1)
        assert one_bad["skipped_steps"] == 1
        group["lr"] = 1e-3
        assert trainer.rl_step(_rl_batch(tokenizer))["skipped_steps"] == 0
    assert trainer.consecutive_bad_steps == 0


# -------------------------------------------------------------------------------- checkpoints


def test_inf_lr_step_then_checkpoint_holds_the_finite_weights(tokenizer, tmp_path):
    """The reported bug: rl.lr=inf checkpointed step_000001 with every weight NaN."""
    model, trainer = _trainer(tokenizer, rl_lr=math.inf)
    before = _weights(model)
    trainer.rl_step(_rl_batch(tokenizer))
    ckpt = save_checkpoint(tmp_path, model=model, trainer_state=trainer.state_dict(), step=1)
    fresh, fresh_trainer = _trainer(tokenizer)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    load_checkpoint(ckpt, model=fresh, trainer=fresh_trainer)
    assert _same(before, _weights(fresh))


def _poison(model) -> None:
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")


def test_save_checkpoint_refuses_non_finite_weights(tokenizer, tmp_path):
    model, trainer = _trainer(tokenizer)
    save_checkpoint(tmp_path, model=model, trainer_state=trainer.state_dict(), step=1)
    _poison(model)
    with pytest.raises(NonFiniteWeightsError) as e:
        save_checkpoint(tmp_path, model=model, trainer_state=trainer.state_dict(), step=2)
    assert isinstance(e.value, CheckpointError) and "step 2" in str(e.value)
    assert "NaN or inf" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]  # no debris either
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000001"


def _save_without_the_check(monkeypatch, path, model, trainer, step):
    """A checkpoint as an older writer made it: no finiteness check, no manifest marker."""
    with monkeypatch.context() as m:
        m.setattr(checkpoint_module, "non_finite_weights", lambda tensors: [])
        ckpt = save_checkpoint(
            path, model=model, trainer_state=trainer.state_dict(), step=step, keep=10
        )
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest.pop(checkpoint_module.WEIGHTS_FINITE)
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    return ckpt


def test_latest_checkpoint_skips_back_past_diverged_ones_with_a_warning(
    tokenizer, tmp_path, monkeypatch, caplog
):
    model, trainer = _trainer(tokenizer)
    good_old = _save_without_the_check(monkeypatch, tmp_path, model, trainer, 1)  # finite
    good = save_checkpoint(
        tmp_path, model=model, trainer_state=trainer.state_dict(), step=2, keep=10
    )
    good_weights = _weights(model)
    _poison(model)
    bad = [_save_without_the_check(monkeypatch, tmp_path, model, trainer, s) for s in (3, 4)]
    with caplog.at_level(logging.WARNING, logger="relift_core.runtime.checkpoint"):
        assert latest_checkpoint(tmp_path) == good
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert str(bad[0]) in warned and str(bad[1]) in warned and str(good) not in warned
    # An unmarked finite checkpoint is checked, not skipped.
    import shutil

    shutil.rmtree(good)
    assert latest_checkpoint(tmp_path) == good_old
    # Loading a diverged checkpoint by its path is refused; the model stays as it was.
    fresh, fresh_trainer = _trainer(tokenizer)
    fresh_weights = _weights(fresh)
    with pytest.raises(NonFiniteWeightsError, match="step_000004"):
        load_checkpoint(bad[1], model=fresh, trainer=fresh_trainer)
    assert _same(fresh_weights, _weights(fresh))
    load_checkpoint(good_old, model=fresh, trainer=fresh_trainer)
    assert _same(good_weights, _weights(fresh))
