"""Batches, the torch trainer and the DeepSpeed config builder, on a tiny model (CPU, seconds).

The reference every log-prob is checked against is computed here independently: one unpadded
sequence at a time through `model(...).logits`, log_softmax, gather; which is what an HF
rollout engine scores.
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import pytest
import torch

from relift_core.config import AlgorithmConfig, ModelConfig, RLConfig, SFTConfig, TinyModelConfig
from relift_core.runtime.batches import TokenBatch, pack_rows, rl_batch, sft_batch
from relift_core.runtime.deepspeed_trainer import (
    DeepSpeedTrainer,
    DeepSpeedUnavailableError,
    build_deepspeed_config,
)
from relift_core.runtime.models import build_tiny_model
from relift_core.runtime.rollout import HFRolloutEngine, Sample
from relift_core.runtime.trainer import TorchTrainer

MAX_LEN = 16


def _model(tokenizer, seed: int = 0):
    return build_tiny_model(TinyModelConfig(), tokenizer, seed=seed)


def _trainer(model, *, lr: float = 1e-3, micro: int = 8, rl_overrides=None, algo=None, sft=None):
    rl = RLConfig(lr=lr, micro_batch_size=micro, **(rl_overrides or {}))
    return TorchTrainer(
        model,
        algo=algo or AlgorithmConfig(entropy_coef=0.0),
        rl=rl,
        sft=sft or SFTConfig(lr=lr, micro_batch_size=micro, mini_batch_size=8),
        max_response_len=MAX_LEN,
    )


def _default_settings(**changes) -> dict:
    """A trainer's keyword arguments with every config at its defaults, `changes` on top."""
    return {
        "algo": AlgorithmConfig(),
        "rl": RLConfig(),
        "sft": SFTConfig(),
        "max_response_len": MAX_LEN,
        **changes,
    }


def _rows(tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts and responses of different lengths, so rows carry different padding."""

    def enc(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    prompts = [enc("1+2="), enc("12*3="), enc("7="), enc("100-1=")]
    responses = [enc("3"), enc("36<|im_end|>"), enc("seven!"), enc("99")]
    return prompts, responses


def _reference_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(response token | prefix) for one unpadded sequence: the HF engine's scoring."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logp[len(prompt) - 1 :]


def _row_targets(batch: TokenBatch, logp: torch.Tensor, row: int) -> torch.Tensor:
    return logp[row][batch.loss_mask[row].bool()]


# ------------------------------------------------------------------------------------- batches


def test_pack_rows_masks_exactly_the_targets_in_the_shifted_frame():
    batch = pack_rows([[5, 6], [7]], [[8, 9, 10], [11]], pad_id=0, advantages=[1.0, -1.0])
    assert batch.input_ids.tolist() == [[5, 6, 8, 9, 10], [7, 11, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # Column j predicts input_ids[j + 1]: the targets 8, 9, 10 are predicted by columns 1..3.
    assert batch.loss_mask.tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]
    targets = batch.input_ids[:, 1:][batch.loss_mask.bool()]
    assert targets.tolist() == [8, 9, 10, 11]
    assert batch.advantages.tolist() == [1.0, -1.0]


def test_rl_batch_from_samples_and_validation():
    samples = [Sample(0, [1, 2], [3], "", 1, "length"), Sample(0, [1, 2], [4, 5], "", 2, "eos")]
    batch = rl_batch(samples, torch.tensor([0.5, -0.5]), pad_id=0)
    assert len(batch) == 2 and batch.loss_mask.sum().item() == 3
    with pytest.raises(ValueError, match="advantages"):
        rl_batch(samples, torch.tensor([1.0]), pad_id=0)
    with pytest.raises(ValueError, match="empty prompt"):
        pack_rows([[]], [[1]], pad_id=0)


def test_sft_batch_trains_on_demonstration_plus_eos_and_truncates(tokenizer):
    prompt = "<|im_start|>user\n2+2<|im_end|>\n<|im_start|>assistant\n"
    batch = sft_batch(tokenizer, [prompt, prompt], ["4", "a long one"], max_target_tokens=5)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    targets = [batch.input_ids[r, 1:][batch.loss_mask[r].bool()].tolist() for r in range(2)]
    assert targets[0] == tokenizer("4", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    # Truncated to 5 target tokens: the EOS did not fit, so the model is not taught to stop here.
    assert targets[1] == tokenizer("a lon", add_special_tokens=False)["input_ids"]
    assert batch.loss_mask[:, : n_prompt - 1].sum() == 0


def test_split_and_trim_keep_rows_aligned():
    batch = pack_rows([[1], [1, 2, 3, 4]], [[5], [6]], pad_id=0, advantages=[1.0, 2.0])
    first, second = batch.split(1)
    assert first.trimmed().input_ids.tolist() == [[1, 5]]
    assert first.trimmed().loss_mask.tolist() == [[1.0]]
    assert second.trimmed().input_ids.shape == (1, 5) and second.advantages.tolist() == [2.0]
    with pytest.raises(ValueError, match="shifted"):
        TokenBatch(batch.input_ids, batch.attention_mask, batch.attention_mask.float())


# ---------------------------------------------------------------------------------- log-probs


def test_token_logprobs_equal_an_independent_unpadded_forward(tokenizer):
    model = _model(tokenizer)
    trainer = _trainer(model)
    prompts, responses = _rows(tokenizer)
    batch = pack_rows(prompts, responses, tokenizer.pad_token_id)
    # Micro-batches of 3 rows: trimming and mixed padding inside one forward are exercised too.
    logp, entropy = trainer.token_logprobs(batch, with_entropy=True, micro_batch_size=3)
    assert logp.shape == batch.loss_mask.shape == entropy.shape
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        expected = _reference_logprobs(model, prompt, response)
        torch.testing.assert_close(_row_targets(batch, logp, row), expected, atol=1e-5, rtol=1e-5)
    assert (logp[~batch.loss_mask.bool()] == 0).all()
    assert (entropy[batch.loss_mask.bool()] > 0).all()


def test_bf16_autocast_on_cpu_runs_the_forward_in_bf16_and_scores_in_fp32(tokenizer):
    """model.bf16_autocast=True: the trainer's and the engine's forwards run their matmuls in
    bf16 on CPU (as TRL's bf16=True does), while log-probs stay fp32 and close to the fp32 ones;
    the default (None) keeps CPU in fp32."""
    model = _model(tokenizer)
    seen: list[torch.dtype] = []
    hook = model.lm_head.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    prompts, responses = _rows(tokenizer)
    batch = pack_rows(prompts, responses, tokenizer.pad_token_id)
    try:
        exact = _trainer(model).token_logprobs(batch)
        assert set(seen) == {torch.float32}
        seen.clear()
        bf16 = TorchTrainer(
            model, **_default_settings(algo=AlgorithmConfig(entropy_coef=0.0), bf16_autocast=True)
        )
        approx = bf16.token_logprobs(batch)
        assert set(seen) == {torch.bfloat16}
        assert approx.dtype == torch.float32
        torch.testing.assert_close(approx, exact, atol=0.1, rtol=0.05)
        assert not torch.equal(approx, exact)
        seen.clear()
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "1+1"}], tokenize=False, add_generation_prompt=True
        )
        HFRolloutEngine(model, tokenizer, bf16_autocast=True).generate(
            [prompt], n=2, temperature=1.0, max_new_tokens=3, seed=0
        )
        assert set(seen) == {torch.bfloat16}
        assert all(p.dtype == torch.float32 for p in model.parameters())  # weights untouched
    finally:
        hook.remove()


def test_bf16_on_cpu_attends_with_sdpa_math_kernel_at_short_rows_only(tokenizer):
    """Under bf16 autocast on the CPU a forward over at most 256 keys runs SDPA's math kernel
    (the flash kernel's backward is the slower there, trainer._autocast); longer rows, and
    float32 forwards, keep torch's choice."""
    model = _model(tokenizer)
    flash_allowed: list[bool] = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda *_: flash_allowed.append(torch.backends.cuda.flash_sdp_enabled())
    )

    def scored_with_flash(trainer, response_tokens: int) -> bool:
        flash_allowed.clear()
        batch = pack_rows([[5, 6, 7]], [[8] * response_tokens], tokenizer.pad_token_id)
        trainer.sft_step(batch)
        assert set(flash_allowed) in ({True}, {False})
        return flash_allowed[0]

    try:
        bf16 = TorchTrainer(model, **_default_settings(bf16_autocast=True))
        assert not scored_with_flash(bf16, 40)
        assert scored_with_flash(bf16, 300)
        assert scored_with_flash(_trainer(model), 40)
        assert torch.backends.cuda.flash_sdp_enabled()  # restored after each forward
    finally:
        hook.remove()


def test_token_logprobs_equal_the_scores_of_hf_generate(tokenizer):
    """What generate (left padding, KV cache) scored is what the trainer scores (full forward,
    right padding) for the same tokens: the on-policy ratio starts at 1."""
    model = _model(tokenizer)
    trainer = _trainer(model)
    prompts = ["<|im_start|>user\n1+1<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>u\n"]
    samples = [
        group[0]
        for group in HFRolloutEngine(model, tokenizer, batch_size=2).generate(
            prompts, n=1, temperature=0.0, max_new_tokens=6
        )
    ]
    # generate's own raw logits for the same left-padded prompts (greedy, so the same tokens).
    encoded = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **encoded,
            do_sample=False,
            max_new_tokens=6,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    step_logits = torch.stack(out.logits, dim=1).float()  # [B, new tokens, V]
    batch = rl_batch(samples, torch.zeros(len(samples)), tokenizer.pad_token_id)
    logp = trainer.token_logprobs(batch)
    for row, sample in enumerate(samples):
        n = len(sample.response_ids)
        assert n > 0
        scored = torch.log_softmax(step_logits[row, :n], dim=-1)
        expected = scored.gather(-1, torch.tensor(sample.response_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(_row_targets(batch, logp, row), expected, atol=1e-4, rtol=1e-4)


def test_left_and_right_padding_give_the_same_logprobs(tokenizer):
    model = _model(tokenizer)
    trainer = _trainer(model)
    prompts, responses = _rows(tokenizer)
    right = pack_rows(prompts, responses, tokenizer.pad_token_id)
    # The same rows, left-padded: each row's tokens shifted to end at the last column.
    lengths = right.attention_mask.sum(1)
    width = right.input_ids.shape[1]
    left_ids = torch.full_like(right.input_ids, tokenizer.pad_token_id)
    left_attn = torch.zeros_like(right.attention_mask)
    left_loss = torch.zeros_like(right.loss_mask)
    for row, n in enumerate(lengths.tolist()):
        left_ids[row, width - n :] = right.input_ids[row, :n]
        left_attn[row, width - n :] = 1
        left_loss[row, width - n : width - 1] = right.loss_mask[row, : n - 1]
    left = TokenBatch(left_ids, left_attn, left_loss)
    logp_right = trainer.token_logprobs(right)
    logp_left = trainer.token_logprobs(left)
    for row in range(len(right)):
        torch.testing.assert_close(
            _row_targets(left, logp_left, row),
            _row_targets(right, logp_right, row),
            atol=1e-5,
            rtol=1e-5,
        )


# ------------------------------------------------------------------------------------- updates


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rl_step_moves_logprob_with_the_sign_of_the_advantage(tokenizer, sign):
    model = _model(tokenizer)
    trainer = _trainer(model, lr=1e-3)
    prompts, responses = _rows(tokenizer)
    batch = pack_rows(prompts[:1], responses[1:2], tokenizer.pad_token_id, advantages=[sign])
    before = trainer.token_logprobs(batch).sum()
    stats = trainer.rl_step(batch)
    after = trainer.token_logprobs(batch).sum()
    assert (after - before).item() * sign > 0
    # On-policy: one mini-batch, so the ratio was exactly 1 when the step was taken.
    assert stats["approx_kl"] == 0.0 and stats["clip_frac"] == 0.0
    assert stats["optimizer_steps"] == 1 and trainer.rl_optimizer_steps == 1
    assert stats["tokens"] == batch.num_target_tokens and stats["lr"] == 1e-3
    assert math.isfinite(stats["grad_norm"]) and stats["seconds"] > 0


def test_rl_step_with_mixed_advantages_separates_the_rows(tokenizer):
    model = _model(tokenizer)
    trainer = _trainer(model, lr=1e-3, algo=AlgorithmConfig(entropy_coef=0.001))
    prompts, responses = _rows(tokenizer)
    batch = pack_rows(prompts[:2], responses[:2], tokenizer.pad_token_id, advantages=[1.0, -1.0])
    before = trainer.token_logprobs(batch).sum(1)
    for _ in range(3):
        trainer.rl_step(batch, rows_per_minibatch=2)
    after = trainer.token_logprobs(batch).sum(1)
    assert after[0] > before[0] and after[1] < before[1]


def test_sft_step_lowers_the_demonstration_nll(tokenizer):
    model = _model(tokenizer)
    trainer = _trainer(model, lr=1e-3)
    prompt = "<|im_start|>user\n3*4<|im_end|>\n<|im_start|>assistant\n"
    batch = sft_batch(tokenizer, [prompt] * 2, ["12", "<think>3*4</think>12"], MAX_LEN)
    nll_before = -trainer.token_logprobs(batch)[batch.loss_mask.bool()].mean()
    first = trainer.sft_step(batch)
    second = trainer.sft_step(batch)
    nll_after = -trainer.token_logprobs(batch)[batch.loss_mask.bool()].mean()
    assert nll_after < nll_before and second["sft_loss"] < first["sft_loss"]
    torch.testing.assert_close(torch.tensor(first["sft_loss"]), nll_before, atol=1e-5, rtol=1e-5)
    assert trainer.sft_optimizer_steps == 2 and trainer.rl_optimizer_steps == 0


def test_minibatches_and_epochs_each_take_an_optimizer_step(tokenizer):
    model = _model(tokenizer)
    trainer = _trainer(
        model, micro=1, rl_overrides={"ppo_epochs": 2, "prompts_per_step": 4, "mini_batch_size": 2}
    )
    prompts, responses = _rows(tokenizer)
    batch = pack_rows(prompts, responses, tokenizer.pad_token_id, advantages=[1.0, -1.0, 0.5, 0])
    # 4 rows, prompts_per_step / mini_batch_size = 2 mini-batches, 2 epochs: 4 steps.
    assert trainer.default_rl_rows_per_minibatch(len(batch)) == 2
    stats = trainer.rl_step(batch)
    assert stats["optimizer_steps"] == 4 and trainer.rl_optimizer_steps == 4
    assert stats["approx_kl"] != 0.0  # later mini-batches are off-policy


class _CountingTrainer(TorchTrainer):
    """Counts the rows scored by separate no-grad log-prob passes."""

    scored_rows = 0

    def token_logprobs(self, batch, **kwargs):
        self.scored_rows += len(batch)
        return super().token_logprobs(batch, **kwargs)


@pytest.mark.parametrize("mini_batch, epochs, scored", [(4, 1, 0), (2, 1, 2), (2, 2, 4)])
def test_on_policy_rows_are_not_scored_twice_and_the_update_is_unchanged(
    tokenizer, mini_batch, epochs, scored
):
    """Only rows a step reaches after the weights moved get a separate old-log-prob pass; the
    update equals the one with every old log-prob scored up front (the textbook way)."""
    prompts, responses = _rows(tokenizer)
    batch = pack_rows(prompts, responses, tokenizer.pad_token_id, advantages=[1.0, -0.5, 2, -1])
    rl = RLConfig(
        lr=1e-2,
        micro_batch_size=3,
        prompts_per_step=4,
        mini_batch_size=mini_batch,
        ppo_epochs=epochs,
    )
    algo = AlgorithmConfig(entropy_coef=0.01, clip_ratio=0.2)
    common = _default_settings(algo=algo, rl=rl)
    lazy = _CountingTrainer(_model(tokenizer), **common)
    stats = lazy.rl_step(batch)
    assert lazy.scored_rows == scored
    eager = TorchTrainer(_model(tokenizer), **common)
    eager_stats = eager.rl_step(replace(batch, old_logp=eager.token_logprobs(batch)))
    for w_lazy, w_eager in zip(lazy.model.parameters(), eager.model.parameters(), strict=True):
        torch.testing.assert_close(w_lazy, w_eager, atol=1e-6, rtol=1e-5)
    initial = _model(tokenizer)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(lazy.model.parameters(), initial.parameters(), strict=True)
    )
    assert stats["policy_loss"] == pytest.approx(eager_stats["policy_loss"], rel=1e-5, abs=1e-7)
    assert stats["optimizer_steps"] == eager_stats["optimizer_steps"] == epochs * 4 // mini_batch


class _GradRecorder(TorchTrainer):
    """Records the accumulated gradient right before each optimizer step."""

    def _clip_and_step(self, kind, grad_clip):
        self.grads = [p.grad.detach().clone() for p in self.trainable_parameters()]
        return super()._clip_and_step(kind, grad_clip)


@pytest.mark.parametrize("mode", ["rl:seq_sum_div_max_len", "rl:token_mean", "sft"])
def test_gradient_accumulation_equals_one_big_batch(tokenizer, mode):
    prompts, responses = _rows(tokenizer)
    batch = pack_rows(prompts, responses, tokenizer.pad_token_id, advantages=[1.0, -0.5, 2, -1])
    # Old log-probs off the current policy, so ratios differ from 1 and the test is not trivial.
    batch = replace(batch, old_logp=torch.randn(batch.loss_mask.shape) * 0.1 - 4.0)
    results = []
    for micro in (1, 3, 4):  # 3 leaves an uneven last micro-batch
        kind, _, agg = mode.partition(":")
        trainer = _GradRecorder(
            _model(tokenizer),
            algo=AlgorithmConfig(entropy_coef=0.01, loss_agg=agg or "seq_sum_div_max_len"),
            rl=RLConfig(lr=1e-3, micro_batch_size=micro),
            sft=SFTConfig(lr=1e-3, micro_batch_size=micro, mini_batch_size=4),
            max_response_len=MAX_LEN,
        )
        if kind == "rl":
            stats = trainer.rl_step(batch, rows_per_minibatch=4)
        else:
            stats = trainer.sft_step(batch)
        results.append((trainer.grads, [p.detach() for p in trainer.model.parameters()], stats))
    (grads_1, weights_1, stats_1), *others = results
    for grads, weights, stats in others:
        for g1, g in zip(grads_1, grads, strict=True):
            torch.testing.assert_close(g, g1, atol=1e-6, rtol=1e-4)
        for w1, w in zip(weights_1, weights, strict=True):
            # Adam divides by |g|: where g is ~0, noise in g moves w by up to lr; 1% of lr.
            torch.testing.assert_close(w, w1, atol=1e-5, rtol=0)
        loss_key = "sft_loss" if mode == "sft" else "policy_loss"
        assert stats[loss_key] == pytest.approx(stats_1[loss_key], rel=1e-5, abs=1e-7)
        assert stats["grad_norm"] == pytest.approx(stats_1["grad_norm"], rel=1e-5)


def test_rl_step_refuses_missing_advantages(tokenizer):
    trainer = _trainer(_model(tokenizer))
    with pytest.raises(ValueError, match="advantages"):
        trainer.rl_step(pack_rows([[1]], [[2]], pad_id=0))


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_to_a_frozen_reference(tokenizer, estimator):
    """kl_coef > 0: a frozen copy of the starting policy. Its KL is 0 while the policy equals
    it (k3 then changes nothing at all), and not once the policy moved; the reference never
    moves."""
    prompts, responses = _rows(tokenizer)
    batch = pack_rows(prompts, responses, tokenizer.pad_token_id, advantages=[1.0, -1.0, 0.5, 2.0])
    assert _trainer(_model(tokenizer)).reference is None  # kl_coef 0: no copy, no passes
    plain = _trainer(_model(tokenizer))
    trainer = _trainer(
        _model(tokenizer),
        algo=AlgorithmConfig(entropy_coef=0.0, kl_coef=0.5, kl_estimator=estimator),
    )
    assert trainer.reference is not None
    assert not any(p.requires_grad for p in trainer.reference.parameters())
    reference_before = [p.detach().clone() for p in trainer.reference.parameters()]
    one_step = {"rows_per_minibatch": len(batch)}
    first, first_plain = trainer.rl_step(batch, **one_step), plain.rl_step(batch, **one_step)
    assert first["kl_to_reference"] == 0.0
    assert first["policy_loss"] == pytest.approx(first_plain["policy_loss"])
    if estimator == "k3":  # k3's gradient is 0 there too; k1's is grad log p (0 only on average)
        assert first["grad_norm"] == pytest.approx(first_plain["grad_norm"], rel=1e-6)
    second = trainer.rl_step(batch, **one_step)
    assert second["kl_to_reference"] != 0.0
    if estimator == "k3":
        assert second["kl_to_reference"] > 0
    for before, p in zip(reference_before, trainer.reference.parameters(), strict=True):
        assert torch.equal(before, p)


def test_trainer_state_dict_round_trip(tokenizer):
    trainer = _trainer(_model(tokenizer))
    batch = pack_rows([[5, 6]], [[7, 8]], tokenizer.pad_token_id, advantages=[1.0])
    trainer.rl_step(batch)
    trainer.sft_step(batch)
    fresh = _trainer(_model(tokenizer, seed=1))
    fresh.load_state_dict(trainer.state_dict())
    assert (fresh.rl_optimizer_steps, fresh.sft_optimizer_steps) == (1, 1)
    state = fresh.state_dict()["rl_optimizer"]["state"]
    original = trainer.state_dict()["rl_optimizer"]["state"]
    assert all(torch.equal(state[k]["exp_avg"], original[k]["exp_avg"]) for k in original)


@pytest.mark.parametrize("kind", ["rl", "sft"])
def test_both_optimizers_are_fused_adamw_and_step_as_the_default_loop_does(tokenizer, kind):
    """Both optimizers are torch's fused AdamW (transformers' default, adamw_torch_fused), and
    a step equals one of torch's default per-tensor AdamW, weight decay included, to a
    thousandth of the step's size lr (the kernels round differently). One step each: after it
    the weights differ by that rounding, which the next gradient and Adam's division by
    sqrt(v) amplify."""
    batch = pack_rows(
        [[5, 6], [9]], [[7, 8, 4], [3, 2]], tokenizer.pad_token_id, advantages=[1.0, -0.5]
    )
    sft = SFTConfig(lr=1e-2, weight_decay=0.1, micro_batch_size=8, mini_batch_size=8)
    rl = {"weight_decay": 0.1}
    fused = _trainer(_model(tokenizer), lr=1e-2, sft=sft, rl_overrides=rl)
    assert all(opt.defaults["fused"] for opt in fused.optimizers.values())
    loop = _trainer(_model(tokenizer), lr=1e-2, sft=sft, rl_overrides=rl)
    settings = loop.rl if kind == "rl" else loop.sft
    loop.optimizers[kind] = torch.optim.AdamW(
        loop.trainable_parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    assert not loop.optimizers[kind].defaults["fused"]
    for trainer in (fused, loop):
        trainer.rl_step(batch) if kind == "rl" else trainer.sft_step(batch)
    start = list(_model(tokenizer).parameters())
    after = list(fused.model.parameters())
    assert max(float((a - b).abs().max()) for a, b in zip(after, start, strict=True)) > 5e-3
    for a, b in zip(after, loop.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-3 * settings.lr, rtol=0)


# ------------------------------------------------------------------------------------ DeepSpeed


def test_deepspeed_config_builder_makes_a_zero3_bf16_config_with_fp32_reduction():
    config = build_deepspeed_config(
        micro_batch_size=4,
        gradient_accumulation_steps=8,
        grad_clip=0.7,
        lr=1e-6,
        weight_decay=0.01,
        world_size=2,
    )
    assert config["zero_optimization"]["stage"] == 3
    assert config["bf16"] == {"enabled": True}
    # Gradients reduced and accumulated in float32, like FSDP2's reduce_dtype.
    assert config["communication_data_type"] == "fp32"
    assert config["data_types"] == {"grad_accum_dtype": "fp32"}
    assert config["gradient_clipping"] == 0.7
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 8
    assert config["train_batch_size"] == 4 * 8 * 2
    assert config["optimizer"]["type"] == "AdamW"
    assert config["optimizer"]["params"]["lr"] == 1e-6
    assert config["optimizer"]["params"]["weight_decay"] == 0.01
    assert config["optimizer"]["params"]["torch_adam"] is True  # torch's AdamW, any accelerator


def test_deepspeed_trainer_without_deepspeed_names_the_extra(tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` raises ImportError
    with pytest.raises(DeepSpeedUnavailableError, match=r"relift\[gpu\].*fsdp2"):
        DeepSpeedTrainer(_model(tokenizer), **_default_settings())


def test_bf16_compute_keeps_float32_masters_that_take_a_1e_6_step(tokenizer):
    """model.dtype=bfloat16 is the compute dtype: the weights stay float32 and a 1e-6 AdamW
    step moves them (on bf16 weights it rounds away: the weights themselves are checked)."""
    model = _model(tokenizer).to(torch.bfloat16)  # as a bf16 checkpoint loads
    trainer = TorchTrainer(
        model,
        algo=AlgorithmConfig(entropy_coef=0.0),
        rl=RLConfig(lr=1e-6),
        sft=SFTConfig(lr=1e-6),
        max_response_len=MAX_LEN,
        dtype="bfloat16",
    )
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    seen: list[torch.dtype] = []
    hook = trainer.model.lm_head.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    prompts, responses = _rows(tokenizer)
    batch = pack_rows(prompts, responses, tokenizer.pad_token_id)
    try:
        trainer.sft_step(batch)
    finally:
        hook.remove()
    assert set(seen) == {torch.bfloat16}
    after = trainer.model.state_dict()
    moved = sum(int((after[k] != before[k]).sum()) for k in before)
    assert moved / sum(v.numel() for v in before.values()) > 0.5
    with pytest.raises(ValueError, match="float16 would need loss scaling"):
        TorchTrainer(_model(tokenizer), **_default_settings(dtype="float16"))


# ---------------------------------------------------------------------------- SmolLM2 (slow)


@pytest.mark.slow
def test_smollm2_logprobs_and_updates():
    from relift_core.runtime.models import load_policy

    try:
        model, tok = load_policy(ModelConfig(source="gguf"))
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 not available here: {e}")
    trainer = TorchTrainer(
        model,
        algo=AlgorithmConfig(entropy_coef=0.0),
        rl=RLConfig(lr=1e-5, micro_batch_size=2),
        sft=SFTConfig(lr=1e-5, micro_batch_size=2, mini_batch_size=2),
        max_response_len=32,
    )
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in ("What is 2+3?", "Name a colour.")
    ]
    batch = sft_batch(tok, prompts, ["2+3 = 5.", "Blue."], max_target_tokens=32)
    logp = trainer.token_logprobs(batch)
    for row in range(len(batch)):
        n = int(batch.attention_mask[row].sum())
        ids = batch.input_ids[row, :n].tolist()
        first_target = int(batch.loss_mask[row].nonzero()[0]) + 1
        expected = _reference_logprobs(model, ids[:first_target], ids[first_target:])
        torch.testing.assert_close(_row_targets(batch, logp, row), expected, atol=1e-4, rtol=1e-4)
    # The scored log-probs double as old_logp: the engine would have produced exactly these.
    rl = replace(batch, advantages=torch.tensor([1.0, -1.0]), old_logp=logp)
    trainer.rl_step(rl, rows_per_minibatch=2)
    after = trainer.token_logprobs(batch)
    assert after.sum(1)[0] > logp.sum(1)[0] and after.sum(1)[1] < logp.sum(1)[1]
    nll_before = -after[batch.loss_mask.bool()].mean()
    trainer.sft_step(batch)
    assert -trainer.token_logprobs(batch)[batch.loss_mask.bool()].mean() < nll_before
