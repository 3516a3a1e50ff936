"""Token-budget micro-batches, packed forwards without padding, chunked log-probs and entropy
(rl/sft.max_tokens_per_micro_batch, model.remove_padding, model.logit_chunk_tokens).

Each must leave the maths unchanged: the same loss, gradients and weights as padded
micro-batches of a fixed row count, on rows whose lengths differ by 10x or more. Tolerance: the
computations are float32 and differ only in how attention is masked (a block-diagonal mask over
one packed sequence instead of a padding mask per row) and in summation order, ~1e-7 relative,
so losses and gradients agree to rtol 1e-4 / atol 1e-6 and weights after an AdamW step (which
moves each weight by at most ~lr) to atol 1e-6 at lr 1e-4.
"""

from __future__ import annotations

import copy

import pytest
import torch

from relift_core.config import AlgorithmConfig, RLConfig, SFTConfig, TinyModelConfig
from relift_core.runtime.batches import pack_for_scoring, pack_rows, rl_batch, share_prompts
from relift_core.runtime.models import build_tiny_model
from relift_core.runtime.rollout import Sample
from relift_core.runtime.trainer import TorchTrainer
from tests.conftest import record_gradients

MAX_LEN = 160


def _model(tokenizer):
    # A 2-layer Qwen2 with a wide vocabulary head relative to its size: the head is most of it.
    return build_tiny_model(
        TinyModelConfig(
            hidden_size=32, num_layers=2, intermediate_size=64, max_position_embeddings=256
        ),
        tokenizer,
        seed=0,
    )


def _mixed_rl_batch(tokenizer, rows: int = 12):
    gen = torch.Generator().manual_seed(1)
    samples, advantages = [], []
    for i in range(rows):
        prompt = torch.randint(10, 90, (3 + i % 4,), generator=gen).tolist()
        length = [4, 150, 9, 60, 2, 120, 30, 7][i % 8]  # 2 to 150 tokens
        response = torch.randint(10, 90, (length,), generator=gen).tolist()
        samples.append(Sample(i // 4, prompt, response, "x", len(response), "length"))
        advantages.append(float((i % 3) - 1) + 0.25)
    return rl_batch(samples, torch.tensor(advantages), tokenizer.pad_token_id)


def _trainer(
    model,
    *,
    loss_agg="token_mean",
    budget=None,
    packed=False,
    chunk=None,
    micro=4,
    entropy_coef=0.01,
    shared=False,
):
    return TorchTrainer(
        model,
        algo=AlgorithmConfig(entropy_coef=entropy_coef, loss_agg=loss_agg),
        rl=RLConfig(
            lr=1e-4,
            micro_batch_size=micro,
            mini_batch_size=8,
            prompts_per_step=8,
            max_tokens_per_micro_batch=budget,
        ),
        sft=SFTConfig(
            lr=1e-4, micro_batch_size=micro, mini_batch_size=12, max_tokens_per_micro_batch=budget
        ),
        max_response_len=MAX_LEN,
        remove_padding=packed,
        logit_chunk_tokens=chunk,
        share_prompts=shared,
    )


def _step_with_grads(trainer, kind, batch):
    """Run one update; return (stats, gradients before the optimizer step, weights after)."""
    grads = record_gradients(trainer)
    stats = (
        trainer.rl_step(batch, rows_per_minibatch=len(batch))
        if kind == "rl"
        else trainer.sft_step(batch)
    )
    return stats, grads, {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _assert_same_update(got, expected, kind):
    """Two `_step_with_grads` results agree: losses, grad norm, gradients, weights (the module
    docstring's tolerances)."""
    (b_stats, b_grads, b_weights), (a_stats, a_grads, a_weights) = got, expected
    for key in ("policy_loss", "entropy") if kind == "rl" else ("sft_loss",):
        assert b_stats[key] == pytest.approx(a_stats[key], rel=1e-4, abs=1e-6), key
    assert b_stats["grad_norm"] == pytest.approx(a_stats["grad_norm"], rel=1e-4)
    for name, grad in a_grads.items():
        torch.testing.assert_close(b_grads[name], grad, rtol=1e-4, atol=1e-6)
    for name, weight in a_weights.items():
        torch.testing.assert_close(b_weights[name], weight, rtol=0, atol=1e-6)


def test_split_by_tokens_fills_micro_batches_within_the_budget(tokenizer):
    batch = _mixed_rl_batch(tokenizer)
    lengths = batch.attention_mask.sum(1)
    parts = batch.split_by_tokens(160)
    assert sorted(int(i) for p in parts for i in p) == list(range(len(batch)))
    for part in parts:
        assert int(lengths[part].sum()) <= 160 or len(part) == 1  # a longer row goes alone
    assert [p.tolist() for p in parts] == [p.tolist() for p in batch.split_by_tokens(160)]
    assert len(parts) < len(batch)  # short rows share
    # Unpacked, the budget counts rows x the longest row: rows of like lengths go together.
    for part in batch.split_by_tokens(160, padded=True):
        assert len(part) * int(lengths[part].max()) <= 160 or len(part) == 1
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        batch.split_by_tokens(0)


def test_packing_maps_every_target_to_its_predicting_position(tokenizer):
    batch = pack_rows([[5, 6], [7, 8, 9]], [[10, 11, 12], [13]], tokenizer.pad_token_id)
    where = batch.loss_mask.bool()
    packed = pack_for_scoring(batch, where)
    assert packed.input_ids.tolist() == [[5, 6, 10, 11, 12, 7, 8, 9, 13]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    # The token each target position predicts is the next packed token, in the same row.
    ids = packed.input_ids[0]
    assert ids[packed.targets + 1].tolist() == [10, 11, 12, 13]


@pytest.mark.parametrize(
    "kind, loss_agg", [("rl", "token_mean"), ("rl", "seq_sum_div_max_len"), ("sft", "token_mean")]
)
def test_packed_token_budget_update_equals_the_padded_one(tokenizer, kind, loss_agg):
    """RL under every loss aggregation, and SFT (always token_mean)."""
    model = _model(tokenizer)
    batch = _mixed_rl_batch(tokenizer)
    if kind == "sft":
        batch.advantages = None
    padded = _trainer(copy.deepcopy(model), loss_agg=loss_agg)
    packed = _trainer(copy.deepcopy(model), loss_agg=loss_agg, budget=200, packed=True, chunk=64)
    # And a token budget over padded rows, sorted by length (the CPU's fast path).
    sorted_rows = _trainer(copy.deepcopy(model), loss_agg=loss_agg, budget=300)
    expected = _step_with_grads(padded, kind, batch)
    for other in (packed, sorted_rows):
        _assert_same_update(_step_with_grads(other, kind, batch), expected, kind)


def test_chunked_logprobs_and_entropy_equal_unchunked_values_and_gradients(tokenizer):
    model = _model(tokenizer)
    batch = _mixed_rl_batch(tokenizer)
    whole = _trainer(copy.deepcopy(model))
    chunked = _trainer(copy.deepcopy(model), chunk=37)  # not a divisor of anything here
    results = []
    for trainer in (whole, chunked):
        trainer.model.zero_grad()
        logp, entropy = trainer._score(batch, with_entropy=True)
        (logp.sum() + 0.5 * entropy.sum()).backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
        results.append((logp.detach(), entropy.detach(), grads))
    (a_logp, a_ent, a_grads), (b_logp, b_ent, b_grads) = results
    torch.testing.assert_close(b_logp, a_logp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b_ent, a_ent, rtol=1e-5, atol=1e-6)
    # A sum over ~600 tokens, not a mean: gradients are O(1), float32 summation order ~1e-6.
    for name, grad in a_grads.items():
        torch.testing.assert_close(b_grads[name], grad, rtol=1e-4, atol=1e-5)
    # And without gradients (the old log-prob pass), packed too.
    packed = _trainer(copy.deepcopy(model), chunk=37, packed=True, budget=300)
    torch.testing.assert_close(
        packed.token_logprobs(batch), whole.token_logprobs(batch), rtol=1e-5, atol=1e-5
    )


def _grouped_rl_batch(tokenizer, groups: int = 3, n: int = 4):
    """GRPO's shape: `groups` questions of different prompt lengths, n responses each, of
    lengths 2 to 150 tokens."""
    gen = torch.Generator().manual_seed(2)
    samples, advantages = [], []
    for g in range(groups):
        prompt = torch.randint(10, 90, (3 + 5 * g,), generator=gen).tolist()
        for i in range(n):
            length = [4, 150, 9, 60, 2, 120, 30, 7][(g * n + i) % 8]
            response = torch.randint(10, 90, (length,), generator=gen).tolist()
            samples.append(Sample(g, prompt, response, "x", len(response), "length"))
            advantages.append(float(i % 3 - 1) + 0.25)
    return rl_batch(samples, torch.tensor(advantages), tokenizer.pad_token_id)


def test_share_prompts_maps_every_target_to_its_predicting_position(tokenizer):
    batch = pack_rows([[5, 6], [5, 6], [7, 8, 9]], [[10, 11], [12], [13]], tokenizer.pad_token_id)
    where = batch.loss_mask.bool()  # column c predicts token c + 1
    shared = share_prompts(batch, where)
    assert shared is not None
    assert shared.prompt_of_row.tolist() == [0, 0, 1]
    assert shared.prompt_mask.tolist() == [[0, 1, 1], [1, 1, 1]]  # left-padded
    assert shared.response_ids[:, :2].tolist() == [[10, 11], [12, 0], [13, 0]]
    # Index 0 is the prompt's last position (predicting the first response token); index j
    # the response's (j - 1)-th token.
    assert shared.targets.tolist() == [[0, 0], [0, 1], [1, 0], [2, 0]]
    distinct = pack_rows([[5], [6]], [[1], [2]], tokenizer.pad_token_id)
    assert share_prompts(distinct, distinct.loss_mask.bool()) is None


@pytest.mark.parametrize("kind, loss_agg", [("rl", "token_mean"), ("rl", "seq_sum_div_max_len")])
def test_shared_prompt_update_equals_the_unshared_one(tokenizer, kind, loss_agg):
    """model.share_prompts: each group's prompt through the decoder once gives the same loss,
    gradients and weights as every row's whole sequence (float32; the same tolerances)."""
    model = _model(tokenizer)
    batch = _grouped_rl_batch(tokenizer)
    plain = _trainer(copy.deepcopy(model), loss_agg=loss_agg, micro=12)
    shared = _trainer(copy.deepcopy(model), loss_agg=loss_agg, micro=12, shared=True, chunk=64)
    calls = []
    run_shared = shared._shared_prompt_hidden
    shared._shared_prompt_hidden = lambda *a: calls.append(len(a[1].prompt_ids)) or run_shared(*a)
    expected = _step_with_grads(plain, kind, batch)
    _assert_same_update(_step_with_grads(shared, kind, batch), expected, kind)
    assert calls == [3]  # one micro-batch of 12 rows: 3 prompts, each run once
    torch.testing.assert_close(
        shared.token_logprobs(batch), plain.token_logprobs(batch), rtol=1e-5, atol=1e-5
    )
