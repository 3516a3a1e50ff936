"""Padded tensors for training: RL samples and SFT demonstrations become one `TokenBatch`.

The label shift, stated once for the whole platform
---------------------------------------------------
A causal LM's logits at position t predict the token at position t + 1. So for a row of T tokens
there are T - 1 predictions, and every per-token training tensor (`loss_mask`, `old_logp`, the
trainer's log-probs and entropies) has width T - 1, where column j scores `input_ids[:, j + 1]`
from `logits[:, j]`:

    input_ids   x0  x1  x2  x3  x4        (prompt x0 x1, response x2 x3 x4)
    logits[:j]  l0  l1  l2  l3  (l4 unused)
    predicts    x1  x2  x3  x4
    loss_mask    0   1   1   1            (column j is 1 iff input_ids[j + 1] is a target)

`shift_targets` is the only function that applies the shift; everything else works in the
shifted (T - 1) frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # rollout.py is written in parallel; only its Sample shape is needed here
    from transformers import PreTrainedTokenizerBase

    from relift_core.runtime.rollout import Sample


def shift_targets(input_ids: Tensor) -> Tensor:
    """The tokens predicted by logits[:, :-1]: `input_ids[:, 1:]` ([B, T] -> [B, T - 1])."""
    return input_ids[:, 1:]


@dataclass
class TokenBatch:
    """Rows of prompt + target tokens, padded to one width T.

    `loss_mask`, `old_logp` live in the shifted frame (width T - 1, see the module docstring).
    Rows are right-padded by the builders here; the trainer also accepts left padding because it
    derives position ids from `attention_mask`.
    """

    input_ids: Tensor  # [B, T] long
    attention_mask: Tensor  # [B, T] long, 1 = real token
    loss_mask: Tensor  # [B, T - 1] float, 1 = this column's predicted token is trained on
    advantages: Tensor | None = None  # [B] float, one per row (GRPO: per sequence)
    old_logp: Tensor | None = None  # [B, T - 1] float, log-probs under the rollout policy
    # [B] bool: rows another policy wrote (LUFFY's demonstration in an RL group); None: none.
    off_policy: Tensor | None = None

    def __post_init__(self) -> None:
        b, t = self.input_ids.shape
        if self.attention_mask.shape != (b, t):
            raise ValueError(f"attention_mask {tuple(self.attention_mask.shape)} != {(b, t)}")
        if self.loss_mask.shape != (b, t - 1):
            raise ValueError(f"loss_mask {tuple(self.loss_mask.shape)} != {(b, t - 1)} (shifted)")
        if self.advantages is not None and self.advantages.shape != (b,):
            raise ValueError(f"advantages {tuple(self.advantages.shape)} != {(b,)}")
        if self.old_logp is not None and self.old_logp.shape != (b, t - 1):
            raise ValueError(f"old_logp {tuple(self.old_logp.shape)} != {(b, t - 1)} (shifted)")
        if self.off_policy is not None and self.off_policy.shape != (b,):
            raise ValueError(f"off_policy {tuple(self.off_policy.shape)} != {(b,)}")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_target_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens (prompt + target): what a forward pass actually processes."""
        return int(self.attention_mask.sum().item())

    def _map(self, fn) -> TokenBatch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return TokenBatch(**{k: None if v is None else fn(v) for k, v in values.items()})

    def to(self, device: torch.device | str) -> TokenBatch:
        return self._map(lambda t: t.to(device))

    def select(self, rows: slice | Tensor) -> TokenBatch:
        return self._map(lambda t: t[rows])

    def split(self, micro_batch_size: int) -> list[TokenBatch]:
        """Consecutive chunks of `micro_batch_size` rows (the last may be smaller)."""
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        return [
            self.select(slice(i, i + micro_batch_size))
            for i in range(0, len(self), micro_batch_size)
        ]

    def split_by_tokens(self, max_tokens: int, *, padded: bool = False) -> list[Tensor]:
        """Row indices of micro-batches of at most `max_tokens` tokens each (a row longer than
        that goes alone): rows longest first, each into the first micro-batch it fits
        (first-fit decreasing), so micro-batches are few and full -- verl's dynamic batch size.
        A micro-batch's tokens are its real tokens when it will be packed; with `padded`, its
        rows x its longest row, so rows of like lengths share a micro-batch and little of it is
        padding. Deterministic, so every rank of a group computes the same split."""
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        lengths = self.attention_mask.sum(dim=1).tolist()
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        bins: list[list[int]] = []
        used: list[int] = []
        for row in order:
            for b, members in enumerate(bins):
                # Longest first: a bin's first row is its longest.
                cost = (
                    (len(members) + 1) * lengths[members[0]] if padded else used[b] + lengths[row]
                )
                if cost <= max_tokens:
                    members.append(row)
                    used[b] += lengths[row]
                    break
            else:
                bins.append([row])
                used.append(lengths[row])
        return [torch.tensor(sorted(b), dtype=torch.long) for b in bins]

    def trimmed(self) -> TokenBatch:
        """Drop trailing columns that are padding in every row (saves compute on right padding).

        Left-padded rows have no all-padding tail, so they come back unchanged.
        """
        real_columns = self.attention_mask.any(dim=0).nonzero()
        width = int(real_columns.max().item()) + 1 if len(real_columns) else 1
        width = max(width, 2)  # at least one prediction column
        if width == self.input_ids.shape[1]:
            return self
        return replace(
            self,
            input_ids=self.input_ids[:, :width],
            attention_mask=self.attention_mask[:, :width],
            loss_mask=self.loss_mask[:, : width - 1],
            old_logp=None if self.old_logp is None else self.old_logp[:, : width - 1],
        )


@dataclass(frozen=True)
class PackedRows:
    """A batch's real tokens as one sequence, without padding (verl's remove-padding): every
    row's tokens one after the other, position ids restarting at each row, which transformers
    reads as packed sequences (a block-diagonal causal mask with SDPA, varlen flash attention on
    GPU) when no attention mask is given."""

    input_ids: Tensor  # [1, L] long, L = the batch's real tokens
    position_ids: Tensor  # [1, L] long
    targets: Tensor  # [N] long: packed positions predicting `loss_mask`'s columns, row-major


def pack_for_scoring(batch: TokenBatch, where: Tensor) -> PackedRows:
    """`batch` packed; `targets[k]` is the packed position whose output scores the k-th set
    column of `where` ([B, T - 1] bool, row-major order, as `tensor[where]` reads it)."""
    real = batch.attention_mask.bool()
    if not bool(real[:, :-1][where].all()):
        raise ValueError("a scored column's predicting token is padding")
    positions = (batch.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    packed_index = (real.flatten().long().cumsum(0) - 1).view(real.shape)
    return PackedRows(
        input_ids=batch.input_ids[real].unsqueeze(0),
        position_ids=positions[real].unsqueeze(0),
        targets=packed_index[:, :-1][where],
    )


@dataclass(frozen=True)
class SharedPrompts:
    """A batch as its distinct prompts and each row's response (GRPO's n samples of a question
    share its prompt): the prompts go through the decoder once, left-padded, their keys and
    values serve every row that starts with them, and the responses follow, right-padded. The
    same attention as one forward over each whole row, with the prompts' work done once."""

    prompt_ids: Tensor  # [K, P] long, left-padded
    prompt_mask: Tensor  # [K, P] long
    prompt_of_row: Tensor  # [B] long: which prompt row b starts with
    response_ids: Tensor  # [B, R] long, right-padded
    response_mask: Tensor  # [B, R] long
    response_positions: Tensor  # [B, R] long: position ids, continuing the row's prompt
    # [N, 2] long: for the k-th set column of `where` (row-major), (row, index) into the
    # row's [last prompt position, response positions...] hidden states.
    targets: Tensor


def share_prompts(batch: TokenBatch, where: Tensor) -> SharedPrompts | None:
    """`batch` as SharedPrompts when at least two rows share a prompt (a row's prompt: its
    tokens before its first scored target), else None (nothing to gain). Rows must be
    right-padded and every row must score at least one target; None otherwise."""
    real = batch.attention_mask.bool()
    lengths = real.sum(dim=1)
    b, t = batch.input_ids.shape
    if not bool(where.any(dim=1).all()):
        return None
    if not bool((real == (torch.arange(t) < lengths[:, None])).all()):
        return None  # not right-padded
    # Column c predicts token c + 1: the first scored column closes the prompt.
    prompt_lengths = where.float().argmax(dim=1) + 1
    keys = [tuple(batch.input_ids[row, : int(prompt_lengths[row])].tolist()) for row in range(b)]
    distinct = list(dict.fromkeys(keys))
    if len(distinct) == b:
        return None
    index = {key: k for k, key in enumerate(distinct)}
    prompt_of_row = torch.tensor([index[key] for key in keys], dtype=torch.long)
    width = max(len(key) for key in distinct)
    prompt_ids = torch.zeros((len(distinct), width), dtype=torch.long)
    prompt_mask = torch.zeros((len(distinct), width), dtype=torch.long)
    for k, key in enumerate(distinct):
        prompt_ids[k, width - len(key) :] = torch.tensor(key, dtype=torch.long)
        prompt_mask[k, width - len(key) :] = 1
    response_lengths = lengths - prompt_lengths
    r = max(int(response_lengths.max()), 1)
    columns = torch.arange(r)
    response_mask = (columns < response_lengths[:, None]).long()
    gather = (prompt_lengths[:, None] + columns).clamp(max=t - 1)
    response_ids = batch.input_ids.gather(1, gather) * response_mask
    rows, cols = where.nonzero(as_tuple=True)
    return SharedPrompts(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        prompt_of_row=prompt_of_row,
        response_ids=response_ids,
        response_mask=response_mask,
        response_positions=prompt_lengths[:, None] + columns,
        # Column prompt_length - 1 is the prompt's last token: index 0; column c >= it, c - P + 1.
        targets=torch.stack([rows, cols - prompt_lengths[rows] + 1], dim=1),
    )


def pack_rows(
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    pad_id: int,
    advantages: Tensor | None = None,
) -> TokenBatch:
    """Right-pad `prompt + target` rows; the loss mask covers exactly the target tokens.

    In the shifted frame, target token i of a row with prompt length P sits at input position
    P + i and is predicted by column P + i - 1.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        raise ValueError("cannot build a batch from zero rows")
    lengths = [len(p) + len(t) for p, t in zip(prompts, targets, strict=True)]
    width = max(max(lengths), 2)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    loss_mask = torch.zeros((len(prompts), width - 1), dtype=torch.float32)
    for row, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        if not prompt:
            # Nothing would predict the first target token; every row needs a context.
            raise ValueError(f"row {row} has an empty prompt")
        p, n = len(prompt), len(target)
        input_ids[row, : p + n] = torch.tensor(list(prompt) + list(target), dtype=torch.long)
        attention_mask[row, : p + n] = 1
        loss_mask[row, p - 1 : p - 1 + n] = 1.0
    if advantages is not None:
        advantages = torch.as_tensor(advantages, dtype=torch.float32).reshape(-1)
    return TokenBatch(input_ids, attention_mask, loss_mask, advantages=advantages)


def rl_batch(samples: Sequence[Sample], advantages: Tensor, pad_id: int) -> TokenBatch:
    """One row per rollout sample: its prompt ids then its response ids, scored on the response."""
    advantages = torch.as_tensor(advantages, dtype=torch.float32).reshape(-1)
    if len(advantages) != len(samples):
        raise ValueError(f"{len(samples)} samples but {len(advantages)} advantages")
    return pack_rows(
        [s.prompt_ids for s in samples], [s.response_ids for s in samples], pad_id, advantages
    )


def sft_batch(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    demonstrations: Sequence[str],
    max_target_tokens: int,
    prefill: str = "",
) -> TokenBatch:
    """Rows of chat-rendered prompt + demonstration + EOS; the NLL is taken on the latter only.

    Prompts are already rendered by the chat template (special tokens included as text), so
    neither side gets the tokenizer's own special tokens. The target is `demo + [eos]` cut to
    `max_target_tokens`: a truncated demonstration loses its EOS rather than teaching the model
    to stop mid-solution. A demonstration that opens with the `prefill` the prompt already ends
    with (an R1 solution's "<think>\n") loses it, as the reference's dataset does: the model
    never learns to write the prefill twice, and the prefill is prompt, never target.
    """
    if prefill:
        demonstrations = [
            d[len(prefill) :] if p.endswith(prefill) and d.startswith(prefill) else d
            for p, d in zip(prompts, demonstrations, strict=True)
        ]
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    targets = demonstration_ids(tokenizer, demonstrations, max_target_tokens)
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    return pack_rows(prompt_ids, targets, pad_id)


def demonstration_ids(
    tokenizer: PreTrainedTokenizerBase, demonstrations: Sequence[str], max_tokens: int
) -> list[list[int]]:
    """Each demonstration's tokens + EOS, cut to `max_tokens` (a cut one loses its EOS rather
    than teaching the model to stop mid-solution). No special tokens of the tokenizer's own:
    the text follows a prompt the chat template already rendered."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; demonstrations end with EOS")
    if not demonstrations:
        return []
    demo_ids = tokenizer(list(demonstrations), add_special_tokens=False)["input_ids"]
    return [(list(d) + [tokenizer.eos_token_id])[:max_tokens] for d in demo_ids]
