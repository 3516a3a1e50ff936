"""The maths of the updates, as pure functions over tensors (in the style of verl's core_algos).

Shapes: B sequences, T response tokens, V vocabulary. `mask` is 1 on real response tokens and 0
on padding; padding never changes a result, whatever values sit there (even inf or nan).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

LossAgg = Literal["token_mean", "seq_sum_div_max_len"]

# exp() of a log-ratio beyond this overflows float16/bfloat16 and only means "far off-policy";
# verl clamps at the same bound.
_MAX_LOG_RATIO = 20.0


def grpo_advantages(
    rewards: Tensor, group_index: Tensor, *, norm_by_std: bool = False, eps: float = 1e-6
) -> Tensor:
    """[B] rewards, [B] group ids (samples of one question share an id) -> [B] advantages.

    Each reward minus its group's mean, divided by the group's (unbiased) std when `norm_by_std`.
    A group whose rewards are all equal (all solved, all failed) or of size 1 has no signal, so its
    advantage is exactly 0.
    """
    if rewards.dim() != 1 or group_index.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_index must be 1-D of equal length, got "
            f"{tuple(rewards.shape)} and {tuple(group_index.shape)}"
        )
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    _, group = torch.unique(group_index, return_inverse=True)
    n_groups = int(group.max()) + 1 if group.numel() else 0
    size = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, group, torch.ones_like(rewards))
    mean = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, group, rewards) / size
    centred = rewards - mean[group]
    if norm_by_std:
        sq = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, group, centred**2)
        std = (sq / (size - 1).clamp(min=1)).sqrt()
        centred = centred / (std[group] + eps)
    return torch.where(size[group] > 1, centred, torch.zeros_like(centred))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    # where, not x * mask: 0 * inf is nan, and padding may hold anything.
    kept = torch.where(mask.bool(), x, torch.zeros_like(x))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over unmasked entries; 0 where nothing is unmasked."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def aggregate_loss(
    loss_mat: Tensor, mask: Tensor, mode: LossAgg, max_len: int | None = None
) -> Tensor:
    """[B, T] per-token losses -> scalar.

    token_mean: every unmasked token of the batch weighs the same (verl's default), so long
      sequences weigh more per sequence and each token's weight depends on the batch.
    seq_sum_div_max_len: the paper's `loss_remove_token_mean` (Dr. GRPO): each sequence's token sum
      divided by one constant, the configured max response length (mask.shape[-1] when None),
      then the mean over sequences. No length normalisation, so no bias towards long wrong answers.
    """
    if mode == "token_mean":
        return masked_mean(loss_mat, mask)
    if mode == "seq_sum_div_max_len":
        denominator = mask.shape[-1] if max_len is None else max_len
        if denominator <= 0:
            raise ValueError(f"max_len must be positive, got {denominator}")
        return (masked_sum(loss_mat, mask, dim=-1) / denominator).mean()
    raise ValueError(f"unknown loss aggregation {mode!r}")


def _ppo_token_losses(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_ratio: float | None,
    clip_ratio_high: float | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token -A r, or PPO's max(-A r, -A clip(r, 1 - low, 1 + high)); with the ratio, the
    log-ratio (0 at padding) and where the clipped term wins."""
    # Zeroing padding before exp keeps garbage there from overflowing into inf * 0 = nan grads.
    log_ratio = torch.where(mask.bool(), logp - old_logp, torch.zeros_like(logp))
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    unclipped = -advantages * ratio
    if clip_ratio is None:
        if clip_ratio_high is not None:
            raise ValueError("clip_ratio_high needs clip_ratio (the lower bound)")
        return unclipped, ratio, log_ratio, torch.zeros_like(mask, dtype=torch.bool)
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    clipped = -advantages * ratio.clamp(1.0 - clip_ratio, 1.0 + high)
    return torch.maximum(unclipped, clipped), ratio, log_ratio, clipped > unclipped


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_ratio: float | None = None,
    clip_ratio_high: float | None = None,
    loss_agg: LossAgg = "seq_sum_div_max_len",
    max_len: int | None = None,
    off_policy: Tensor | None = None,
    off_policy_gamma: float = 0.1,
) -> tuple[Tensor, dict[str, float]]:
    """Policy-gradient loss on [B, T] token log-probs; advantages are [B] (per sequence) or [B, T].

    Per token: -A * r with r = exp(logp - old_logp), or PPO's max(-A r, -A clip(r, 1-lo, 1+hi))
    when `clip_ratio` is lo; `clip_ratio_high` is hi (DAPO's clip-higher: 0.2 / 0.28), the
    symmetric lo when None.

    `off_policy` ([B] bool) marks rows that another policy wrote (LUFFY: the question's
    demonstration), for which there is no sampling probability to take a ratio against. Their
    tokens get LUFFY's policy shaping instead, -A * f(p) with f(p) = p / (p + gamma) and p the
    current probability, never clipped: its gradient -A * gamma / (p + gamma)^2 * grad p keeps
    learning from the tokens the policy finds unlikely, where a plain -A p would vanish. Both
    kinds of token are aggregated together.

    Stats: clip_frac (share of on-policy tokens where the clipped term wins), ratio_mean,
    approx_kl (mean of old_logp - logp over on-policy tokens, the k1 estimate of KL(old || new)),
    and with off-policy rows off_policy_prob (their tokens' mean probability).
    """
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    on_mask = mask
    if off_policy is not None:
        off_rows = off_policy.bool().unsqueeze(-1)
        on_mask = torch.where(off_rows, torch.zeros_like(mask), mask)
    per_token, ratio, log_ratio, clipped_wins = _ppo_token_losses(
        logp, old_logp, advantages, on_mask, clip_ratio, clip_ratio_high
    )
    stats: dict[str, float] = {}
    if off_policy is not None:
        off_mask = torch.where(off_rows, mask, torch.zeros_like(mask))
        # p <= 1 at real tokens; padding (anything, even nan) is zeroed before exp.
        prob = torch.exp(torch.where(off_mask.bool(), logp, torch.zeros_like(logp)).clamp(max=0.0))
        shaped = -advantages * prob / (prob + off_policy_gamma)
        per_token = torch.where(off_rows, shaped, per_token)
        with torch.no_grad():
            stats["off_policy_prob"] = masked_mean(prob, off_mask).item()
    loss = aggregate_loss(per_token, mask, loss_agg, max_len)
    with torch.no_grad():
        stats.update(
            {
                "clip_frac": masked_mean(clipped_wins.float(), on_mask).item(),
                "ratio_mean": masked_mean(ratio, on_mask).item(),
                "approx_kl": masked_mean(-log_ratio, on_mask).item(),
            }
        )
    return loss, stats


KLEstimator = Literal["k1", "k3"]


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator) -> Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs, named
    as in verl's core_algos.kl_penalty (Schulman's k1 / k3).

    k1: log p - log p_ref, unbiased but of either sign per token; as a loss its gradient is
      grad log p even where p == p_ref (zero only in expectation over sampled tokens).
    k3: p_ref / p - log(p_ref / p) - 1 (verl's low_var_kl), never negative, lower variance;
      computed from the log-ratio clamped to +-20 and clamped to <= 10 as verl does, so one
      far-off token cannot dominate; its gradient vanishes where p == p_ref. Both are exactly
      0 where logp == ref_logp.
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_ratio = (ref_logp - logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        # e^r >= 1 + r for every r (exp is convex), so this is >= 0 but for rounding: clamped.
        return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(min=0.0, max=10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}: expected k1 or k3")


OverlongMode = Literal["off", "mask", "soft_penalty"]


def overlong_shaping(
    rewards: Tensor,
    lengths: Tensor,
    truncated: Tensor,
    mode: OverlongMode,
    *,
    max_len: int,
    buffer_len: int,
    penalty_factor: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """DAPO's two treatments of over-long samples: [B] rewards, lengths (response tokens) and
    truncated flags (cut at `max_len`) -> ([B] rewards, [B] 1/0 row weights for the loss).

    mask: truncated samples keep their reward (they still count in their group's mean) but are
      left out of the loss, so a right reasoning cut short is never punished for its length.
    soft_penalty: reward + min(0, -(length - (max_len - buffer_len)) / buffer_len * factor): 0 up
      to `max_len - buffer_len` tokens, then linearly down to -factor at `max_len`, where every
      truncated sample sits; no row is left out.
    """
    keep = torch.ones_like(rewards, dtype=torch.float32)
    if mode == "off":
        return rewards, keep
    if mode == "mask":
        return rewards, torch.where(truncated.bool(), torch.zeros_like(keep), keep)
    if mode == "soft_penalty":
        if not 0 < buffer_len < max_len:
            raise ValueError(f"buffer_len must be in (0, max_len={max_len}), got {buffer_len}")
        exceed = lengths.to(rewards.dtype) - (max_len - buffer_len)
        penalty = (-exceed / buffer_len * penalty_factor).clamp(max=0.0)
        return rewards + penalty, keep
    raise ValueError(f"unknown overlong mode {mode!r}: expected off, mask or soft_penalty")


def entropy_from_logits(logits: Tensor) -> Tensor:
    """[B, T, V] -> [B, T] entropy of softmax(logits), in nats."""
    return _entropy_from_logprobs(torch.log_softmax(logits.float(), dim=-1))  # stable


def _entropy_from_logprobs(logp: Tensor) -> Tensor:
    # A token masked out with -inf has p = 0 and contributes 0 (not 0 * -inf = nan).
    return -(logp.exp() * logp.masked_fill(torch.isneginf(logp), 0.0)).sum(-1)


# Positions upcast to fp32 at once when scoring half-precision logits.
_UPCAST_CHUNK = 1024


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """[..., V] logits, [...] label ids -> [...] log p(label), without a [..., V] log_softmax.

    Labels at padding may be anything, -100 included: they are clamped to a valid id, and the
    value there is meaningless (mask it).
    """
    if logits.dtype in (torch.float32, torch.float64):
        index = labels.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)
        return logits.gather(-1, index).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    chunks = [
        logp.gather(-1, index).squeeze(-1) for logp, index in _log_softmax_chunks(logits, labels)
    ]
    return torch.cat(chunks).reshape(labels.shape)


def _log_softmax_chunks(logits: Tensor, labels: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    """Half-precision logits' fp32 log_softmax, a chunk of positions at a time (half precision
    loses too much in logsumexp; chunks bound the fp32 copy's memory), with each chunk's
    labels clamped to valid ids, [n, 1]."""
    vocab = logits.shape[-1]
    flat_labels = labels.clamp(0, vocab - 1).reshape(-1, 1)
    for chunk, chunk_labels in zip(
        logits.reshape(-1, vocab).split(_UPCAST_CHUNK),
        flat_labels.split(_UPCAST_CHUNK),
        strict=True,
    ):
        yield torch.log_softmax(chunk.float(), dim=-1), chunk_labels


def token_logprobs_and_entropy(
    logits: Tensor, labels: Tensor, *, entropy_grad: bool = True
) -> tuple[Tensor, Tensor]:
    """`token_logprobs` and `entropy_from_logits` of the same [..., V] logits, the entropy in
    the autograd graph only with `entropy_grad`. Half-precision logits are upcast and
    log-softmaxed once per chunk of positions for both (at a 49k-152k vocabulary that pass is
    most of scoring's cost); float32 logits go through the two functions as they are."""
    keep_entropy_graph = entropy_grad and torch.is_grad_enabled()
    if logits.dtype in (torch.float32, torch.float64):
        logp = token_logprobs(logits, labels)
        with torch.set_grad_enabled(keep_entropy_graph):
            return logp, entropy_from_logits(logits)
    logps, entropies = [], []
    for logp, index in _log_softmax_chunks(logits, labels):
        logps.append(logp.gather(-1, index).squeeze(-1))
        with torch.set_grad_enabled(keep_entropy_graph):
            entropies.append(_entropy_from_logprobs(logp))
    return torch.cat(logps).reshape(labels.shape), torch.cat(entropies).reshape(labels.shape)


def sft_nll(
    logp: Tensor, mask: Tensor, loss_agg: LossAgg = "token_mean", max_len: int | None = None
) -> Tensor:
    """Negative log-likelihood of the demonstration tokens (mask 1 on them, 0 on prompt/padding)."""
    return aggregate_loss(-logp, mask, loss_agg, max_len)
