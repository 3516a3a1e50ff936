"""The maths of the updates, as pure functions over tensors (in the style of verl's core_algos).

Shapes: B sequences, T response tokens, V vocabulary. `mask` is 1 on real response tokens and 0
on padding; padding never changes a result, whatever values sit there (even inf or nan).
"""

from __future__ import annotations

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


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_ratio: float | None = None,
    loss_agg: LossAgg = "seq_sum_div_max_len",
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Policy-gradient loss on [B, T] token log-probs; advantages are [B] (per sequence) or [B, T].

    Per token: -A * r with r = exp(logp - old_logp), or PPO's max(-A r, -A clip(r, 1-c, 1+c)) when
    `clip_ratio` is c. Stats: clip_frac (share of tokens where the clipped term wins), ratio_mean,
    approx_kl (mean of old_logp - logp, the k1 estimate of KL(old || new)).
    """
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    # Zeroing padding before exp keeps garbage there from overflowing into inf * 0 = nan grads.
    log_ratio = torch.where(mask.bool(), logp - old_logp, torch.zeros_like(logp))
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    unclipped = -advantages * ratio
    if clip_ratio is None:
        per_token = unclipped
        clipped_wins = torch.zeros_like(mask, dtype=torch.bool)
    else:
        clipped = -advantages * ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio)
        per_token = torch.maximum(unclipped, clipped)
        clipped_wins = clipped > unclipped
    loss = aggregate_loss(per_token, mask, loss_agg, max_len)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean(clipped_wins.float(), mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
            "approx_kl": masked_mean(-log_ratio, mask).item(),
        }
    return loss, stats


def entropy_from_logits(logits: Tensor) -> Tensor:
    """[B, T, V] -> [B, T] entropy of softmax(logits), in nats."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # subtracts logsumexp: stable
    # A token masked out with -inf has p = 0 and contributes 0 (not 0 * -inf = nan).
    return -(logp.exp() * logp.masked_fill(torch.isneginf(logp), 0.0)).sum(-1)


# Positions upcast to fp32 at once when scoring half-precision logits.
_UPCAST_CHUNK = 1024


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """[..., V] logits, [...] label ids -> [...] log p(label), without a [..., V] log_softmax.

    Labels at padding may be anything, -100 included: they are clamped to a valid id, and the
    value there is meaningless (mask it).
    """
    labels = labels.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        return logits.gather(-1, labels).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    # Half precision loses too much in logsumexp: upcast a chunk of positions at a time to
    # bound the fp32 copy's memory.
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1, 1)
    chunks = [
        torch.log_softmax(chunk.float(), dim=-1).gather(-1, chunk_labels).squeeze(-1)
        for chunk, chunk_labels in zip(
            flat_logits.split(_UPCAST_CHUNK), flat_labels.split(_UPCAST_CHUNK), strict=True
        )
    ]
    return torch.cat(chunks).reshape(labels.shape[:-1])


def sft_nll(
    logp: Tensor, mask: Tensor, loss_agg: LossAgg = "token_mean", max_len: int | None = None
) -> Tensor:
    """Negative log-likelihood of the demonstration tokens (mask 1 on them, 0 on prompt/padding)."""
    return aggregate_loss(-logp, mask, loss_agg, max_len)
