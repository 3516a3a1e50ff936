import math

import pytest
import torch

from relift_core.algorithm.objectives import (
    aggregate_loss,
    entropy_from_logits,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    masked_sum,
    overlong_shaping,
    policy_loss,
    sft_nll,
    token_logprobs,
    token_logprobs_and_entropy,
)

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def assert_close(actual, expected, atol=1e-6, rtol=1e-5):
    # not torch.testing.assert_close: its first call costs a second of imports
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    ok = torch.allclose(actual.float(), expected.float(), atol=atol, rtol=rtol)
    assert ok, (actual, expected)


# --- advantages -----------------------------------------------------------------------------


def test_group_advantages_are_reward_minus_group_mean():
    rewards = t(1, 0, 0, 0, 1, 1, 1, 0)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    expected = t(0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75)
    assert_close(grpo_advantages(rewards, groups), expected)


def test_all_correct_or_all_wrong_group_has_zero_advantage():
    rewards = t(1, 1, 1, 0, 0, 0, 1, 0)
    groups = torch.tensor([7, 7, 7, 3, 3, 3, 9, 9])  # ids need not be contiguous or sorted
    for norm_by_std in (False, True):
        adv = grpo_advantages(rewards, groups, norm_by_std=norm_by_std)
        assert adv[:6].eq(0).all()
        assert adv[6] > 0 > adv[7]


def test_group_of_one_has_zero_advantage():
    adv = grpo_advantages(t(1, 0.5, 0), torch.tensor([0, 1, 1]), norm_by_std=True)
    assert adv[0] == 0 and not adv.isnan().any()


def test_std_normalisation_on_a_known_group():
    # group [1, 0, 0, 0]: mean 0.25, unbiased std sqrt(0.25) = 0.5 (as torch.std / verl)
    adv = grpo_advantages(
        t(1, 0, 0, 0), torch.zeros(4, dtype=torch.long), norm_by_std=True, eps=0.0
    )
    assert_close(adv, t(1.5, -0.5, -0.5, -0.5))
    assert torch.tensor([1.0, 0, 0, 0]).std() == 0.5


def test_integer_rewards_and_shape_check():
    assert grpo_advantages(torch.tensor([1, 0]), torch.tensor([0, 0])).tolist() == [0.5, -0.5]
    with pytest.raises(ValueError):
        grpo_advantages(t(1, 0), torch.tensor([0]))


# --- masking and aggregation ------------------------------------------------------------------


def test_masked_sum_and_mean_ignore_padding_even_inf_or_nan():
    x = t(1, 2, 3, 4)
    mask = torch.tensor([1, 1, 0, 0])
    garbage = t(1, 2, math.inf, math.nan)
    assert masked_sum(x, mask) == masked_sum(garbage, mask) == 3
    assert masked_mean(garbage, mask) == 1.5
    assert masked_mean(x, torch.zeros(4)) == 0  # nothing unmasked: 0, not nan
    assert_close(masked_mean(x.view(2, 2), mask.view(2, 2), dim=-1), t(1.5, 0))


def test_token_mean_weighs_every_token_equally():
    loss = t(1, 2, 3, 99, 4, 5, 99, 99).view(2, 4)
    assert aggregate_loss(loss, MASK, "token_mean") == pytest.approx(15 / 5)


def test_seq_sum_div_max_len():
    loss = t(1, 2, 3, 99, 4, 5, 99, 99).view(2, 4)
    # sequences sum to 6 and 9; divided by T=4 each, then mean over the 2 sequences
    assert aggregate_loss(loss, MASK, "seq_sum_div_max_len") == pytest.approx((6 / 4 + 9 / 4) / 2)
    # a configured max response length replaces the padded width
    assert aggregate_loss(loss, MASK, "seq_sum_div_max_len", max_len=10) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        aggregate_loss(loss, MASK, "seq_sum_div_max_len", max_len=0)
    with pytest.raises(ValueError):
        aggregate_loss(loss, MASK, "seq_mean")


# --- policy loss ------------------------------------------------------------------------------


def test_policy_loss_on_policy_equals_minus_advantage():
    logp = torch.log(t(0.5, 0.25, 0.1, 0.9, 0.3, 0.2, 0.5, 0.5).view(2, 4))
    adv = t(1.0, -2.0)
    loss, stats = policy_loss(logp, logp.clone(), adv, MASK, loss_agg="token_mean")
    # ratio 1 everywhere: per-token loss is -A; tokens: 3 with -1, 2 with +2
    assert loss.item() == pytest.approx((-3 + 4) / 5)
    assert stats == {
        "clip_frac": 0.0,
        "ratio_mean": pytest.approx(1.0),
        "approx_kl": pytest.approx(0.0),
    }


def test_policy_loss_gradient_has_the_sign_of_minus_advantage():
    old = torch.log(torch.full((2, 4), 0.5))
    logp = (old + t(0.1, -0.2, 0.05, 3.0, 0.0, 0.1, -5.0, 1.0).view(2, 4)).requires_grad_()
    adv = t(1.0, -1.0)
    loss, _ = policy_loss(logp, old, adv, MASK)
    loss.backward()
    grad = logp.grad
    assert (grad[0, :3] < 0).all() and (grad[1, :2] > 0).all()  # descent raises logp iff A > 0
    assert grad[0, 3] == 0 and grad[1, 2:].eq(0).all()  # padding gets no gradient


def test_padding_never_counts_in_policy_loss():
    logp = torch.log(t(0.5, 0.25, 0.1, 0.9, 0.3, 0.2, 0.5, 0.5).view(2, 4))
    old = logp - 0.1
    adv = t(0.5, -1.5)
    base, base_stats = policy_loss(logp, old, adv, MASK, clip_ratio=0.2)
    garbage = torch.where(MASK.bool(), logp, t(50.0))
    old_garbage = torch.where(MASK.bool(), old, t(-50.0))
    loss, stats = policy_loss(garbage, old_garbage, adv, MASK, clip_ratio=0.2)
    assert loss == base and stats == base_stats


def test_ppo_clipping_outside_the_trust_region():
    c = 0.2
    old = torch.zeros(1, 4)
    ratio = t(1.5, 0.5, 1.5, 0.5)  # above 1+c, below 1-c, above, below
    logp = torch.log(ratio).view(1, 4).requires_grad_()
    adv = t(1.0, 1.0, -1.0, -1.0).view(1, 4)  # per-token advantages
    loss, stats = policy_loss(logp, old, adv, torch.ones(1, 4), clip_ratio=c, loss_agg="token_mean")
    # A>0,r>1+c: clipped to -1.2 (no more gain). A>0,r<1-c: unclipped -0.5 is larger (pessimistic).
    # A<0,r>1+c: unclipped 1.5 is larger. A<0,r<1-c: clipped 0.8 (no more gain).
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert stats["clip_frac"] == pytest.approx(0.5)
    assert stats["ratio_mean"] == pytest.approx(1.0)
    loss.backward()
    # clipped tokens have no gradient; the others keep -A * r
    assert_close(logp.grad, t(0.0, -0.5, 1.5, 0.0).view(1, 4) / 4)


def test_no_clipping_inside_the_trust_region_and_approx_kl():
    old = torch.zeros(1, 2)
    logp = torch.log(t(1.1, 0.9)).view(1, 2)
    adv = torch.ones(1)
    clipped, clipped_stats = policy_loss(logp, old, adv, torch.ones(1, 2), clip_ratio=0.2)
    unclipped, stats = policy_loss(logp, old, adv, torch.ones(1, 2))
    assert clipped == unclipped and clipped_stats["clip_frac"] == 0.0
    assert stats["approx_kl"] == pytest.approx(-(math.log(1.1) + math.log(0.9)) / 2)


# --- logits -----------------------------------------------------------------------------------


def test_entropy_from_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1000.0, 0.0, 0.0, 0.0]]])
    assert_close(entropy_from_logits(logits), torch.tensor([[math.log(4), 0.0]]))
    # -inf (a token masked out of the vocabulary) contributes nothing, not nan
    masked = torch.tensor([[[0.0, 0.0, -math.inf, -math.inf]]])
    assert_close(entropy_from_logits(masked), torch.tensor([[math.log(2)]]))
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    expected = torch.distributions.Categorical(logits=logits).entropy()
    assert_close(entropy_from_logits(logits), expected)


def test_token_logprobs_matches_log_softmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=gen) * 10
    labels = torch.randint(0, 7, (2, 3), generator=gen)
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert_close(token_logprobs(logits, labels), expected)
    half = token_logprobs(logits.bfloat16(), labels)
    assert_close(half, expected, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_entropy_together_equal_each_alone_with_their_gradients(dtype):
    # Half precision takes one log_softmax for both, in chunks (2,600 positions: three).
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 1300, 11, generator=gen) * 4).to(dtype)
    labels = torch.randint(0, 11, (2, 1300), generator=gen)
    labels[0, 0] = -100  # padding's label
    weights = torch.randn(2, 1300, generator=gen)

    def value_and_grad(score):
        leaf = logits.detach().clone().requires_grad_(True)
        logp, entropy = score(leaf)
        ((logp.float() + 0.3 * entropy.float()) * weights).sum().backward()
        return logp.detach(), entropy.detach(), leaf.grad

    together = value_and_grad(lambda z: token_logprobs_and_entropy(z, labels))
    alone = value_and_grad(lambda z: (token_logprobs(z, labels), entropy_from_logits(z)))
    for got, expected in zip(together[:2], alone[:2], strict=True):
        assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # A bf16 leaf's gradient: one sum of the two terms rounded to bf16, or two (half an ulp).
    ulp = 1e-6 if dtype == torch.float32 else 2.0**-7
    assert_close(together[2].float(), alone[2].float(), rtol=ulp, atol=ulp / 8)
    # entropy_grad=False: the entropy is a stat, and only log p carries a gradient.
    leaf = logits.detach().clone().requires_grad_(True)
    logp, entropy = token_logprobs_and_entropy(leaf, labels, entropy_grad=False)
    assert logp.requires_grad and not entropy.requires_grad
    assert_close(entropy, alone[1], rtol=1e-6, atol=1e-6)


def test_token_logprobs_accepts_ignore_index_at_padding():
    logits = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[2, -100, -100]])
    out = token_logprobs(logits, labels)
    assert out[0, 0] == torch.log_softmax(logits[0, 0], -1)[2]


def test_changing_logits_at_padding_changes_nothing():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 6, generator=gen)
    labels = torch.randint(0, 6, (2, 4), generator=gen)
    noisy = logits.clone()
    noisy[~MASK.bool()] = torch.randn(3, 6, generator=gen) * 100
    for agg in ("token_mean", "seq_sum_div_max_len"):
        base = sft_nll(token_logprobs(logits, labels), MASK, agg)
        assert sft_nll(token_logprobs(noisy, labels), MASK, agg) == base
        ent = aggregate_loss(entropy_from_logits(logits), MASK, agg)
        assert aggregate_loss(entropy_from_logits(noisy), MASK, agg) == ent


def test_sft_nll_is_mean_negative_logprob_of_demonstration_tokens():
    logp = torch.log(t(0.5, 0.25, 0.9, 0.1).view(1, 4))
    mask = torch.tensor([[0, 1, 1, 0]])  # prompt token, two demonstration tokens, padding
    assert sft_nll(logp, mask).item() == pytest.approx(-(math.log(0.25) + math.log(0.9)) / 2)
    per_seq = sft_nll(logp, mask, "seq_sum_div_max_len", max_len=8).item()
    assert per_seq == pytest.approx(-(math.log(0.25) + math.log(0.9)) / 8)


# --- clip-higher (DAPO) -----------------------------------------------------------------------


def test_clip_higher_clips_asymmetrically():
    old = torch.zeros(1, 4)
    ratio = t(1.25, 1.3, 0.75, 0.85)
    logp = torch.log(ratio).view(1, 4).requires_grad_()
    adv = t(1.0, 1.0, -1.0, -1.0).view(1, 4)
    mask = torch.ones(1, 4)
    loss, stats = policy_loss(
        logp, old, adv, mask, clip_ratio=0.2, clip_ratio_high=0.28, loss_agg="token_mean"
    )
    # A>0: 1.25 is inside [0.8, 1.28] (kept: -1.25), 1.3 is clipped to -1.28.
    # A<0: 0.75 is below 0.8, clipped to 0.8; 0.85 is inside (kept: 0.85).
    assert loss.item() == pytest.approx((-1.25 - 1.28 + 0.8 + 0.85) / 4)
    assert stats["clip_frac"] == pytest.approx(0.5)
    loss.backward()
    assert_close(logp.grad, t(-1.25, 0.0, 0.0, 0.85).view(1, 4) / 4)
    # The symmetric 0.2 would have clipped the 1.25 token too.
    symmetric, sym_stats = policy_loss(
        logp.detach(), old, adv, mask, clip_ratio=0.2, loss_agg="token_mean"
    )
    assert symmetric.item() == pytest.approx((-1.2 - 1.2 + 0.8 + 0.85) / 4)
    assert sym_stats["clip_frac"] == pytest.approx(0.75)


def test_clip_ratio_high_without_a_lower_bound_is_refused():
    with pytest.raises(ValueError, match="clip_ratio_high needs clip_ratio"):
        policy_loss(
            torch.zeros(1, 2), torch.zeros(1, 2), t(1.0), torch.ones(1, 2), clip_ratio_high=0.28
        )


# --- LUFFY's mixed groups and shaped off-policy loss -----------------------------------------


def test_luffy_mixed_group_advantages_by_hand():
    # One question: 3 rollouts (1 right) and the demonstration (right), one group of 4.
    rewards, groups = t(1.0, 0.0, 0.0, 1.0), torch.tensor([0, 0, 0, 0])
    assert_close(grpo_advantages(rewards, groups), t(0.5, -0.5, -0.5, 0.5))
    # All rollouts wrong: without the demonstration no signal, with it the group learns.
    assert_close(grpo_advantages(t(0.0, 0.0, 0.0, 1.0), groups), t(-0.25, -0.25, -0.25, 0.75))


def test_luffy_shaped_off_policy_loss_by_hand():
    """Row 0 on-policy (ratio 1), row 1 the demonstration: -A p / (p + 0.1), never clipped."""
    p_on, p_off = t(0.5, 0.25), t(0.5, 0.9)
    logp = torch.log(torch.stack([p_on, p_off])).requires_grad_()
    # The demonstration's row has no sampling log-probs: garbage there must not matter.
    old = torch.stack([torch.log(p_on), t(-100.0, 50.0)])
    adv = t(-0.5, 0.5)
    off = torch.tensor([False, True])
    loss, stats = policy_loss(
        logp,
        old,
        adv,
        torch.ones(2, 2),
        clip_ratio=0.2,
        clip_ratio_high=0.28,
        loss_agg="token_mean",
        off_policy=off,
        off_policy_gamma=0.1,
    )
    on_tokens = [0.5, 0.5]  # -A * 1
    off_tokens = [-0.5 * 0.5 / 0.6, -0.5 * 0.9 / 1.0]
    assert loss.item() == pytest.approx(sum(on_tokens + off_tokens) / 4)
    assert stats["off_policy_prob"] == pytest.approx(0.7)
    assert stats["clip_frac"] == 0.0 and stats["ratio_mean"] == pytest.approx(1.0)
    loss.backward()
    # d/dlogp of -A p/(p+g) = -A g p / (p+g)^2; on-policy: -A r.
    off_grad = [-0.5 * 0.1 * p / (p + 0.1) ** 2 for p in (0.5, 0.9)]
    assert_close(logp.grad, torch.tensor([[0.5, 0.5], off_grad]) / 4)
    # Sequence-sum aggregation over the max length, as the LUFFY script's
    # loss_remove_token_mean: each row's token sum / 8, averaged over rows.
    seq, _ = policy_loss(
        logp.detach(),
        old,
        adv,
        torch.ones(2, 2),
        loss_agg="seq_sum_div_max_len",
        max_len=8,
        off_policy=off,
    )
    assert seq.item() == pytest.approx((sum(on_tokens) / 8 + sum(off_tokens) / 8) / 2)


def test_off_policy_padding_is_ignored():
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    logp = torch.log(t(0.5, 0.5, 0.5, 0.5)).view(2, 2)
    garbage = logp.clone()
    garbage[:, 1] = float("nan")
    kw = {"loss_agg": "token_mean", "off_policy": torch.tensor([False, True])}
    a, _ = policy_loss(logp, logp, t(1.0, 1.0), mask, **kw)
    b, _ = policy_loss(garbage, garbage, t(1.0, 1.0), mask, **kw)
    assert a == b and torch.isfinite(a)


# --- KL to a reference -------------------------------------------------------------------------


def test_kl_is_zero_when_policy_equals_reference():
    logp = torch.log(torch.rand(3, 5) * 0.98 + 0.01)
    for estimator in ("k1", "k3"):
        assert torch.equal(kl_penalty(logp, logp.clone(), estimator), torch.zeros(3, 5))


def test_kl_estimators_by_hand_and_k3_never_negative():
    logp, ref = torch.log(t(0.5, 0.25)), torch.log(t(0.25, 0.5))
    assert_close(kl_penalty(logp, ref, "k1"), t(math.log(2), -math.log(2)))
    # k3 = e^r - r - 1 with r = log p_ref - log p
    assert_close(kl_penalty(logp, ref, "k3"), t(0.5 + math.log(2) - 1, 2 - math.log(2) - 1))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g) * 5, torch.randn(1000, generator=g) * 5
    assert (kl_penalty(a, b, "k3") >= 0).all()
    assert (kl_penalty(a, b, "k1") < 0).any()  # k1 per token takes either sign
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(a, b, "k2")


# --- overlong (DAPO) -----------------------------------------------------------------------------


def test_overlong_modes_treat_exactly_the_truncated_samples():
    rewards = t(1.0, 1.0, 1.0, 0.0)
    lengths = torch.tensor([10, 60, 64, 64])
    truncated = torch.tensor([False, False, True, True])
    kw = {"max_len": 64, "buffer_len": 16, "penalty_factor": 1.0}
    r, keep = overlong_shaping(rewards, lengths, truncated, "off", **kw)
    assert torch.equal(r, rewards) and torch.equal(keep, t(1, 1, 1, 1))
    r, keep = overlong_shaping(rewards, lengths, truncated, "mask", **kw)
    assert torch.equal(r, rewards) and torch.equal(keep, t(1, 1, 0, 0))
    r, keep = overlong_shaping(rewards, lengths, truncated, "soft_penalty", **kw)
    # 0 up to 64 - 16 = 48 tokens, then linear: 60 -> -12/16, and every truncated one -1.
    assert_close(r, t(1.0, 0.25, 0.0, -1.0)) and torch.equal(keep, t(1, 1, 1, 1))
    r, _ = overlong_shaping(
        rewards, lengths, truncated, "soft_penalty", max_len=64, buffer_len=16, penalty_factor=0.5
    )
    assert_close(r, t(1.0, 0.625, 0.5, -0.5))
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_shaping(rewards, lengths, truncated, "soft_penalty", max_len=64, buffer_len=64)
