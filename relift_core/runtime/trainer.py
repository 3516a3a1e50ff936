"""The policy trainer: RL (GRPO) and SFT updates on one model, in one process, plain torch.

The loop reads like torchtune's: for each epoch, for each mini-batch (one optimizer step), for
each micro-batch (one forward/backward, gradients accumulated). The maths is in
`relift_core.algorithm.objectives`; this file only decides *what* is fed to it and *when* a step
happens.

Gradient accumulation is exact, not "divide by the number of micro-batches": every micro-batch
loss is weighted by its share of the mini-batch (its share of rows for per-sequence aggregation,
its share of target tokens for token_mean), so the accumulated gradient is the gradient of the
mini-batch loss, whatever the micro-batch sizes. Position ids come from the attention mask, so a
row scores the same left- or right-padded and whatever else shares its micro-batch.

Two AdamW optimizers share the parameters, one per update kind: RL and SFT have their own
learning rates (the paper: 1e-6 each) and, this way, their own moment estimates; a rare SFT step
does not inherit RL's second moments. Each optimizer checkpoints as a plain state dict.

Divergence never reaches the weights. A step whose loss or gradient norm is not finite is not
taken; a step after which a weight is not finite, or has exploded (a weight past
`max_abs_weight` and larger than before, or the weight norm grown `max_norm_growth`-fold), is
rolled back: weights and that optimizer's state as they were before it. Either is counted in
the step's stats (`skipped_nonfinite`, `skipped_explosive`, and `skipped_steps` for both), and
`max_bad_steps` such steps in a row raise DivergenceError, with the weights of before the first.
Rolling back needs a copy of the weights and the optimizer state, so one is taken only when the
step could explode: AdamW moves each weight by at most lr * a bound set by its betas (gradients
are clipped first), so a step that cannot reach the limits from the current weights is not
copied for (`_step_may_explode`); with sane learning rates no copy is ever made.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from relift_core.algorithm import objectives as algorithms
from relift_core.config import AlgorithmConfig, RLConfig, SFTConfig
from relift_core.errors import UserError
from relift_core.runtime.batches import (
    SharedPrompts,
    TokenBatch,
    pack_for_scoring,
    share_prompts,
    shift_targets,
)
from relift_core.runtime.models import MASTER_DTYPE, bf16_autocast

UpdateKind = Literal["rl", "sft"]
# A micro-batch -> (loss to backpropagate, stats to average).
MicroLoss = Callable[[TokenBatch], tuple[Tensor, dict[str, float]]]

_COMPUTE_DTYPES = ("float32", "bfloat16")
STATE_VERSION = 1
# Per-step counters; summed (not averaged) over a batch's optimizer steps.
_SKIP_KEYS = ("skipped_steps", "skipped_nonfinite", "skipped_explosive")
# See TorchTrainer._autocast (measured on this project's CPU, bf16: flash ahead from ~384 keys).
_CPU_MATH_ATTENTION_MAX_KEYS = 256


class DivergenceError(UserError, RuntimeError):
    """Too many optimizer steps in a row had to be skipped or rolled back: training diverged."""


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... over each row's real tokens, whichever side the padding is on."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class _WeightedMeans:
    """Running weighted means of named stats (weights need not sum to 1)."""

    def __init__(self) -> None:
        self._sum: dict[str, float] = defaultdict(float)
        self._weight: dict[str, float] = defaultdict(float)

    def add(self, stats: dict[str, float], weight: float = 1.0) -> None:
        """Non-finite values (the loss of a skipped step) are left out of the means; the skip
        counters say how many steps had them."""
        for key, value in stats.items():
            if not math.isfinite(float(value)):
                continue
            self._sum[key] += float(value) * weight
            self._weight[key] += weight

    def total(self, key: str) -> float:
        return self._sum[key]

    def count(self, key: str) -> float:
        return self._weight[key]

    def means(self) -> dict[str, float]:
        return {k: self._sum[k] / self._weight[k] if self._weight[k] else 0.0 for k in self._sum}

    def sums(self) -> dict[str, tuple[float, float]]:
        """key -> (weighted sum, total weight): what ranks exchange to combine their means."""
        return {k: (self._sum[k], self._weight[k]) for k in self._sum}

    def merge(self, sums: dict[str, tuple[float, float]]) -> None:
        for key, (total, weight) in sums.items():
            self._sum[key] += total
            self._weight[key] += weight


def _weight_stats(params: list[nn.Parameter]) -> tuple[float, float]:
    """(max |w|, ||w||) over all parameters, in float32, with one device sync. A NaN anywhere
    makes both NaN (torch's max and norms propagate it)."""
    if not params:
        return 0.0, 0.0
    with torch.no_grad():
        maxes = torch.stack(
            [torch.linalg.vector_norm(p.detach(), math.inf, dtype=torch.float32) for p in params]
        )
        norms = torch.stack(
            [torch.linalg.vector_norm(p.detach(), 2, dtype=torch.float32) for p in params]
        )
        values = torch.stack([maxes.max(), torch.linalg.vector_norm(norms, 2)]).tolist()
    return float(values[0]), float(values[1])


# Model types whose logits are exactly `lm_head(decoder(...).last_hidden_state)` (no scaling or
# soft-capping in between), so the head can be applied to selected positions only.
_PLAIN_HEAD_MODEL_TYPES = frozenset({"qwen2", "qwen3", "llama", "mistral"})


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in _PLAIN_HEAD_MODEL_TYPES:
        return None
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = get_decoder() if get_decoder is not None else None
    if decoder is None or head is None:
        return None
    return decoder, head


Scores = tuple[Tensor, Tensor | None]  # log p(target) [N] and, when asked for, entropy [N]


@dataclass(frozen=True)
class _Targets:
    """What scoring computes for target tokens `labels` [N]: log p(label), and with
    `with_entropy` the entropy of each predicted distribution, kept in the autograd graph
    when `entropy_grad`."""

    labels: Tensor
    with_entropy: bool
    entropy_grad: bool

    def part(self, start: int, stop: int) -> _Targets:
        return replace(self, labels=self.labels[start:stop])


def _scores_from_logits(logits: Tensor, targets: _Targets) -> Scores:
    if not targets.with_entropy:
        return algorithms.token_logprobs(logits, targets.labels).float(), None
    logp, entropy = algorithms.token_logprobs_and_entropy(
        logits, targets.labels, entropy_grad=targets.entropy_grad
    )
    return logp.float(), entropy.float()


class _ScoringHead(nn.Module):
    """Stands in for a causal LM's output layer during one forward: given the final hidden
    states of the kept positions it returns [..., 2] (log p(target), entropy) from `score`,
    which applies the real head (a child here, so engines' hooks on it still fire)."""

    def __init__(self, head: nn.Module, score: Callable[[Tensor], Scores]):
        super().__init__()
        self.head = head
        self._score = score
        self.selected: Tensor | None = None

    def forward(self, hidden: Tensor) -> Tensor:
        logp, entropy = self._score(self.selected_rows(hidden))
        return torch.stack([logp, torch.zeros_like(logp) if entropy is None else entropy], -1)

    def selected_rows(self, hidden: Tensor) -> Tensor:
        return (
            hidden.reshape(-1, hidden.shape[-1]) if self.selected is None else hidden[self.selected]
        )


def root_logits_at(
    root: nn.Module,
    micro: TokenBatch,
    where: Tensor,
    autocast: contextlib.AbstractContextManager,
    packed: bool = False,
    scorer: _ScoringHead | None = None,
) -> Tensor:
    """Logits [N, V] where `where` is set, through the root module's own forward: a sharding
    engine (FSDP2, ZeRO-3) gathers the embeddings, final norm and head in its hooks there, so
    the decoder and head cannot be called apart. Only the columns from the first target on
    reach the head (`logits_to_keep`); `packed` (model.remove_padding): the real tokens as one
    sequence, and exactly the target positions reach the head. With `scorer` installed as the
    model's head, its [N, 2] scores instead of logits."""
    if packed:
        rows = pack_for_scoring(micro, where)
        if scorer is not None:
            scorer.selected = None  # every kept position is a target
        with autocast:
            out = root(
                input_ids=rows.input_ids,
                position_ids=rows.position_ids,
                attention_mask=None,
                use_cache=False,
                logits_to_keep=rows.targets,
            ).logits
        return out if scorer is not None else out[0]
    first = int(where.any(0).nonzero()[0]) if bool(where.any()) else where.shape[1] - 1
    keep = where.shape[1] - first
    if scorer is not None:
        kept = torch.zeros((where.shape[0], keep + 1), dtype=torch.bool, device=where.device)
        kept[:, :-1] = where[:, first:]
        scorer.selected = kept
    with autocast:
        logits = root(
            input_ids=micro.input_ids,
            attention_mask=micro.attention_mask,
            position_ids=position_ids_from_mask(micro.attention_mask),
            use_cache=False,
            logits_to_keep=keep + 1,  # + the last column, which predicts nothing
        ).logits
    return logits if scorer is not None else logits[:, :-1][where[:, first:]]


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` that no optimizer sees and no gradient reaches (KL's reference)."""
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


class TorchTrainer:
    """`rl_step` and `sft_step` on a causal LM; see the module docstring for the update loop."""

    def __init__(
        self,
        model: nn.Module,
        *,
        algo: AlgorithmConfig,
        rl: RLConfig,
        sft: SFTConfig,
        max_response_len: int,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        bf16_autocast: bool | None = None,
        max_bad_steps: int = 3,
        max_abs_weight: float = 1e4,
        max_norm_growth: float = 100.0,
        remove_padding: bool = False,
        logit_chunk_tokens: int | None = None,
        share_prompts: bool = False,
    ) -> None:
        """`dtype` is the compute dtype (model.dtype): the weights and both optimizers' states
        are float32 masters whatever it is, and forwards and backwards run under bf16 autocast
        when it is bfloat16 (and otherwise as `bf16_autocast` says: None on CUDA only, True on
        CPU too, False never). `gradient_checkpointing`
        recomputes activations in backward (model.gradient_checkpointing).
        `max_bad_steps` consecutive skipped or rolled-back steps raise DivergenceError;
        `max_abs_weight` and `max_norm_growth` define an exploded step (module docstring)."""
        if dtype not in _COMPUTE_DTYPES:
            raise ValueError(
                f"dtype must be one of {sorted(_COMPUTE_DTYPES)}, got {dtype!r} "
                "(float16 would need loss scaling, which this trainer does not do)"
            )
        if max_response_len <= 0:
            raise ValueError(f"max_response_len must be positive, got {max_response_len}")
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        if not (max_abs_weight > 0 and max_norm_growth > 1):
            raise ValueError("max_abs_weight must be > 0 and max_norm_growth > 1")
        self.max_bad_steps = max_bad_steps
        self.max_abs_weight = float(max_abs_weight)
        self.max_norm_growth = float(max_norm_growth)
        self.consecutive_bad_steps = 0
        self._step_outcome: str | None = None  # set by _clip_and_step, read by _optimizer_step
        self.algo, self.rl, self.sft = algo, rl, sft
        self.max_response_len = max_response_len
        self.device = torch.device(device)
        self.compute_dtype = dtype
        self.remove_padding = remove_padding  # model.remove_padding
        # model.share_prompts; a recomputed (checkpointed) layer cannot replay a cache
        self.share_prompts = share_prompts and not gradient_checkpointing
        self.logit_chunk_tokens = logit_chunk_tokens  # model.logit_chunk_tokens
        self.model = self._place(model)
        self._bf16_autocast = True if dtype == "bfloat16" else bf16_autocast
        if gradient_checkpointing:
            # Activations dominate GPU memory at long responses; recompute them in backward.
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.rl_optimizer_steps = 0
        self.sft_optimizer_steps = 0
        # algorithm.kl_coef > 0: a frozen copy of the starting policy to stay close to; none
        # (and no reference forward passes) otherwise, the paper's setting. Copied before a
        # sharding engine partitions the model (_build_optimizers): the reference is whole,
        # float32, on this process's device (memory_plan.py counts it). The session builds the
        # trainer before it loads a checkpoint's weights, so a resumed run keeps it.
        self.reference = _frozen_copy(self.model).to(self.device) if algo.kl_coef > 0 else None
        self._build_optimizers()

    # ----------------------------------------------------------------------------- set-up hooks

    def _place(self, model: nn.Module) -> nn.Module:
        # float32 masters (models.MASTER_DTYPE): a bf16 weight cannot take a 1e-6 step.
        return model.to(device=self.device, dtype=MASTER_DTYPE)

    def _build_optimizers(self) -> None:
        params = self.trainable_parameters()
        # torch's fused AdamW (transformers' default, adamw_torch_fused): one kernel over all
        # the parameters, where torch's default on the CPU is a Python loop of ops per tensor
        # (SmolLM2-135M on this project's CPU: 0.049 s a step against 0.487 s, scripts/
        # bench_runtime.py --parts). Plain tensors only: FSDP's DTensor shards keep the default.
        fused = self.device.type in ("cpu", "cuda") and not any(
            hasattr(p, "to_local") for p in params
        )

        def adamw(settings: RLConfig | SFTConfig) -> torch.optim.AdamW:
            return torch.optim.AdamW(
                params, lr=settings.lr, weight_decay=settings.weight_decay, fused=fused or None
            )

        self.optimizers: dict[UpdateKind, torch.optim.Optimizer] = {
            "rl": adamw(self.rl),
            "sft": adamw(self.sft),
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # --------------------------------------------------------------------------------- scoring

    def _autocast(self, keys: int | None = None) -> contextlib.AbstractContextManager:
        """bf16 autocast as configured. On the CPU under it, a forward whose rows attend to at
        most _CPU_MATH_ATTENTION_MAX_KEYS keys runs SDPA's math kernel: the CPU flash kernel's
        backward is the slower one at short rows (SmolLM2-135M, 32 rows of 49 + 12-38 tokens:
        9.5 s an RL step against 11.3 s), the faster one from a few hundred keys on."""
        autocast = bf16_autocast(self.device, self._bf16_autocast)
        if not (
            self.device.type == "cpu"
            and isinstance(autocast, torch.autocast)
            and keys is not None
            and keys <= _CPU_MATH_ATTENTION_MAX_KEYS
        ):
            return autocast
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack = contextlib.ExitStack()
        stack.enter_context(autocast)
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        return stack

    def _keys(self, micro: TokenBatch) -> int:
        """The most keys a query of `micro`'s forward attends to (all of a packed sequence's)."""
        return micro.num_tokens if self.remove_padding else micro.input_ids.shape[1]

    def _forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits of the T - 1 predicting positions: [B, T - 1, V] (see batches.py on the shift)."""
        with self._autocast(keys=input_ids.shape[1]):
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            )
        return out.logits[:, :-1]

    def _logits_at(self, micro: TokenBatch, where: Tensor) -> Tensor:
        """Logits [N, V] of the predicting positions where `where` ([b, t - 1] bool) is set,
        for models whose head cannot be applied apart (see `_target_hidden`)."""
        if self.remove_padding:
            return root_logits_at(
                self.model, micro, where, self._autocast(self._keys(micro)), packed=True
            )
        return self._forward(micro.input_ids, micro.attention_mask)[where]

    def _target_hidden(self, micro: TokenBatch, where: Tensor) -> tuple[Tensor, nn.Module] | None:
        """The final hidden states [N, H] of the predicting positions and the output layer, for
        causal LMs whose logits are just `lm_head(decoder(...))`; None for others.

        The output layer is most of a small model's cost (49k-token vocabularies) and prompt
        and padding columns are most of a batch's, so only the selected hidden states reach
        the head, and `_target_scores` can take them a chunk at a time. With remove_padding
        the decoder sees the real tokens only, packed into one sequence; with share_prompts
        each distinct prompt once (`_shared_prompt_hidden`)."""
        parts = _decoder_and_head(self.model)
        if parts is None:
            return None
        decoder, head = parts
        shared = (
            share_prompts(micro, where) if self.share_prompts and not self.remove_padding else None
        )
        if shared is not None:
            return self._shared_prompt_hidden(decoder, shared), head
        with self._autocast(self._keys(micro)):
            if self.remove_padding:
                packed = pack_for_scoring(micro, where)
                hidden = decoder(
                    input_ids=packed.input_ids,
                    position_ids=packed.position_ids,
                    attention_mask=None,
                    use_cache=False,
                ).last_hidden_state
                return hidden[0, packed.targets], head
            hidden = decoder(
                input_ids=micro.input_ids,
                attention_mask=micro.attention_mask,
                position_ids=position_ids_from_mask(micro.attention_mask),
                use_cache=False,
            ).last_hidden_state
        return hidden[:, :-1][where], head

    def _shared_prompt_hidden(self, decoder: nn.Module, shared: SharedPrompts) -> Tensor:
        """The final hidden states [N, H] of the target positions, each distinct prompt run
        once: its keys and values (a DynamicCache, still in the autograd graph) are copied to
        the rows that start with it, and the responses attend to them as to their own prompt.
        A row's first target is predicted by its prompt's last position."""
        from transformers import DynamicCache

        device = self.device
        prompt_mask = shared.prompt_mask.to(device)
        of_row = shared.prompt_of_row.to(device)
        cache = DynamicCache()
        keys = shared.prompt_ids.shape[1] + shared.response_ids.shape[1]
        with self._autocast(keys):
            prompt_last = decoder(
                input_ids=shared.prompt_ids.to(device),
                attention_mask=prompt_mask,
                position_ids=position_ids_from_mask(prompt_mask),
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state[:, -1]  # left-padded: the last column is the prompt's end
            cache.batch_select_indices(of_row)
            response = decoder(
                input_ids=shared.response_ids.to(device),
                attention_mask=torch.cat([prompt_mask[of_row], shared.response_mask.to(device)], 1),
                position_ids=shared.response_positions.to(device),
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
        hidden = torch.cat([prompt_last[of_row].unsqueeze(1), response], dim=1)
        targets = shared.targets.to(device)
        return hidden[targets[:, 0], targets[:, 1]]

    def _head_scores(self, head: nn.Module, hidden: Tensor, targets: _Targets) -> Scores:
        """The scores of `head(hidden)`, one chunk of positions."""
        with self._autocast():
            logits = head(hidden)
        return _scores_from_logits(logits, targets)

    def _scoring_root(self) -> nn.Module | None:
        """The module whose own forward must run the head, for a sharding engine that gathers
        the root's parameters (embeddings, final norm, head) in its hooks there; None: the
        decoder and the head are called apart (`_target_hidden`)."""
        return None

    def _target_scores(self, micro: TokenBatch, where: Tensor, targets: _Targets) -> Scores:
        """Log-probs [N] (and entropies [N]) of the target tokens. With logit_chunk_tokens the
        head runs on that many positions at a time and, under autograd, each chunk is
        recomputed in backward (activation checkpointing), so at most one chunk's
        [chunk, vocab] logits and their gradient are alive at once."""
        root = self._scoring_root()
        if root is not None:
            return self._root_target_scores(root, micro, where, targets)
        found = self._target_hidden(micro, where)
        if found is None:
            return _scores_from_logits(self._logits_at(micro, where), targets)
        hidden, head = found
        return self._chunked_head_scores(head, hidden, targets)

    def _shared_chunk_span(self, positions: int) -> int | None:
        """The positions to chunk over when the ranks of a sharding engine must call the head
        equally often (deepspeed_trainer.py): past this micro-batch's `positions`, empty
        chunks. None: this micro-batch's own chunks."""
        return None

    def _chunked_head_scores(self, head: nn.Module, hidden: Tensor, targets: _Targets) -> Scores:
        chunk = self.logit_chunk_tokens
        positions = len(targets.labels)
        span = None if chunk is None else self._shared_chunk_span(positions)
        if chunk is None or (span is None and positions <= chunk):
            return self._head_scores(head, hidden, targets)
        logps, entropies = [], []
        for start in range(0, max(positions if span is None else span, 1), chunk):
            part = (head, hidden[start : start + chunk], targets.part(start, start + chunk))
            if torch.is_grad_enabled():
                logp, entropy = checkpoint(self._head_scores, *part, use_reentrant=False)
            else:
                logp, entropy = self._head_scores(*part)
            logps.append(logp)
            entropies.append(entropy)
        return torch.cat(logps), (torch.cat(entropies) if targets.with_entropy else None)

    def _root_target_scores(
        self, root: nn.Module, micro: TokenBatch, where: Tensor, targets: _Targets
    ) -> Scores:
        """`_target_scores` through the root module's own forward (a sharding engine gathers
        the embeddings, final norm and head in its hooks there): for the forward's duration
        the head is wrapped so that, called with the final hidden states, it returns the
        target tokens' scores, a chunk at a time, instead of the [tokens, vocab] logits."""
        model = root.module if hasattr(root, "module") else root  # a DeepSpeed engine's
        head = model.get_output_embeddings()
        if _decoder_and_head(model) is None or head is None:
            logits = root_logits_at(
                root, micro, where, self._autocast(self._keys(micro)), packed=self.remove_padding
            )
            return _scores_from_logits(logits, targets)
        scorer = _ScoringHead(head, lambda hidden: self._chunked_head_scores(head, hidden, targets))
        model.set_output_embeddings(scorer)
        try:
            scores = root_logits_at(
                root,
                micro,
                where,
                self._autocast(self._keys(micro)),
                packed=self.remove_padding,
                scorer=scorer,
            )
        finally:
            model.set_output_embeddings(head)
        return scores[:, 0], (scores[:, 1] if targets.with_entropy else None)

    def _score(
        self, micro: TokenBatch, with_entropy: bool, entropy_grad: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """Per-column log p(next token) and, optionally, entropy: both [b, t - 1] float, scored
        on the target columns (`loss_mask`) only and 0 elsewhere. `entropy_grad=False` keeps the
        entropy out of the autograd graph (stats only)."""
        where = micro.loss_mask.bool()
        labels = shift_targets(micro.input_ids)[where]
        targets = _Targets(labels, with_entropy, entropy_grad and torch.is_grad_enabled())
        target_logp, target_entropy = self._target_scores(micro, where, targets)
        logp = torch.zeros(where.shape, dtype=torch.float32, device=target_logp.device)
        logp[where] = target_logp
        if not with_entropy:
            return logp, None
        entropy = torch.zeros_like(logp)
        entropy[where] = target_entropy
        return logp, entropy

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def token_logprobs(
        self,
        batch: TokenBatch,
        *,
        with_entropy: bool = False,
        micro_batch_size: int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Log-probs [B, T - 1] aligned with `batch.loss_mask` (0 at padding columns), without
        gradients, `micro_batch_size` rows per forward (default rl.micro_batch_size).
        With `with_entropy`, also the per-column entropy of the predicted distribution."""
        size = micro_batch_size or self.rl.micro_batch_size
        b, t = batch.input_ids.shape
        logp_out = torch.zeros((b, t - 1), dtype=torch.float32, device=batch.input_ids.device)
        entropy_out = torch.zeros_like(logp_out) if with_entropy else None
        with self._eval_mode():
            for rows in self._micro_rows(batch, size, self.rl.max_tokens_per_micro_batch):
                micro = batch.select(rows).trimmed()
                width = micro.loss_mask.shape[1]
                logp, entropy = self._score(micro.to(self.device), with_entropy)
                logp_out[rows, :width] = logp.to(logp_out.device)
                if entropy_out is not None and entropy is not None:
                    entropy_out[rows, :width] = entropy.float().to(entropy_out.device)
        # Padding columns carry no meaning; zero them so callers can compare or sum freely.
        padding = ~batch.loss_mask.bool().to(logp_out.device)
        logp_out.masked_fill_(padding, 0.0)
        if entropy_out is None:
            return logp_out
        return logp_out, entropy_out.masked_fill_(padding, 0.0)

    # ------------------------------------------------------------------------------ the updates

    def default_rl_rows_per_minibatch(self, batch_rows: int) -> int:
        """rl.mini_batch_size counts prompts; a batch of one step's prompts x n samples is cut
        into ceil(prompts_per_step / mini_batch_size) equal optimizer steps (verl's convention)."""
        minibatches = max(1, math.ceil(self.rl.prompts_per_step / self.rl.mini_batch_size))
        return max(1, math.ceil(batch_rows / minibatches))

    def rl_step(
        self, batch: TokenBatch, *, rows_per_minibatch: int | None = None
    ) -> dict[str, float]:
        """GRPO update: rl.ppo_epochs passes over mini-batches of rows, one optimizer step each.

        `batch.advantages` is required. Without `batch.old_logp` the batch is on-policy (sampled
        from the current weights). The first mini-batch of the first epoch is then scored under
        exactly those weights, so its old log-probs are the ones its own forward pass computes
        (detached: ratio 1, gradient A * grad log p); no separate pass is spent on them. Only rows
        that a later step reaches after the weights moved -- later mini-batches, later epochs --
        are scored first, in one no-grad pass before any update. With one mini-batch and one
        epoch (the toy preset) that pass disappears.
        Stats: policy_loss (mean over steps of the mini-batch loss), entropy (token mean, for
        reading; the loss uses algorithm.loss_agg), grad_norm (mean pre-clip norm), clip_frac,
        approx_kl, lr, tokens (target tokens), seq_tokens (all real tokens), optimizer_steps,
        seconds.
        """
        if batch.advantages is None:
            raise ValueError(
                "rl_step needs batch.advantages (see relift_core.runtime.batches.rl_batch)"
            )
        start = time.perf_counter()
        rows = rows_per_minibatch or self.default_rl_rows_per_minibatch(len(batch))
        first_on_policy = batch.old_logp is None
        if first_on_policy and (self.rl.ppo_epochs > 1 or rows < len(batch)):
            batch = replace(batch, old_logp=self._old_logprobs(batch, skip_rows=rows))

        def minibatches() -> Iterator[TokenBatch]:
            for epoch in range(self.rl.ppo_epochs):
                for index, minibatch in enumerate(batch.split(rows)):
                    if first_on_policy and epoch == 0 and index == 0:
                        minibatch = replace(minibatch, old_logp=None)  # scored by its forward
                    yield minibatch

        means = self._optimizer_steps(
            "rl",
            minibatches(),
            self._rl_micro_loss,
            micro_batch_size=self.rl.micro_batch_size,
            max_tokens=self.rl.max_tokens_per_micro_batch,
            grad_clip=self.rl.grad_clip,
            loss_agg=self.algo.loss_agg,
        )
        return self._finish_stats("rl", means, batch, start)

    def sft_step(self, batch: TokenBatch) -> dict[str, float]:
        """Fine-tuning: NLL (token mean) on the target tokens only, sft.mini_batch_size rows per
        optimizer step, sft.epochs passes. Stats: sft_loss, grad_norm, lr, tokens, seq_tokens,
        optimizer_steps, seconds."""
        start = time.perf_counter()
        minibatches = (
            minibatch
            for _ in range(self.sft.epochs)
            for minibatch in batch.split(self.sft.mini_batch_size)
        )
        means = self._optimizer_steps(
            "sft",
            minibatches,
            self._sft_micro_loss,
            micro_batch_size=self.sft.micro_batch_size,
            max_tokens=self.sft.max_tokens_per_micro_batch,
            grad_clip=self.sft.grad_clip,
            loss_agg="token_mean",
        )
        return self._finish_stats("sft", means, batch, start)

    def _micro_rows(self, batch: TokenBatch, rows: int, max_tokens: int | None) -> list[Tensor]:
        """Row indices of each micro-batch: `rows` at a time, or with a token budget at most
        `max_tokens` tokens each (TokenBatch.split_by_tokens: real tokens when packed, padded
        ones otherwise). Any partition gives the same loss: micro-batches are weighted by their
        share (module docstring)."""
        if max_tokens is not None:
            return batch.split_by_tokens(max_tokens, padded=not self.remove_padding)
        return [torch.arange(i, min(i + rows, len(batch))) for i in range(0, len(batch), rows)]

    def _optimizer_steps(
        self,
        kind: UpdateKind,
        minibatches: Iterable[TokenBatch],
        micro_loss: MicroLoss,
        **step_options: Any,
    ) -> _WeightedMeans:
        """One optimizer step per mini-batch; their stats, averaged."""
        means = _WeightedMeans()
        for minibatch in minibatches:
            means.add(self._optimizer_step(kind, minibatch, micro_loss, **step_options))
        return means

    def _old_logprobs(self, batch: TokenBatch, *, skip_rows: int) -> Tensor:
        """Old log-probs for an on-policy batch, before any update. With one epoch the first
        `skip_rows` rows are left at 0: the first mini-batch scores itself (see rl_step)."""
        if self.rl.ppo_epochs > 1:
            return self.token_logprobs(batch)
        old = torch.zeros(batch.loss_mask.shape, dtype=torch.float32, device=batch.input_ids.device)
        old[skip_rows:] = self.token_logprobs(batch.select(slice(skip_rows, len(batch))))
        return old

    def _rl_micro_loss(self, micro: TokenBatch) -> tuple[Tensor, dict[str, float]]:
        assert micro.advantages is not None
        coef = self.algo.entropy_coef
        # With no entropy bonus the entropy is only a stat: no [b, t, V] graph kept for it.
        logp, entropy = self._score(micro, with_entropy=True, entropy_grad=coef != 0.0)
        assert entropy is not None
        # On-policy rows (old_logp None) are scored under the weights that sampled them.
        old_logp = logp.detach() if micro.old_logp is None else micro.old_logp
        pg_loss, stats = algorithms.policy_loss(
            logp,
            old_logp,
            micro.advantages,
            micro.loss_mask,
            clip_ratio=self.algo.clip_ratio,
            clip_ratio_high=self.algo.clip_ratio_high,
            loss_agg=self.algo.loss_agg,
            max_len=self.max_response_len,
            off_policy=micro.off_policy,
            off_policy_gamma=self.algo.off_policy_shaping_gamma,
        )
        loss = pg_loss
        extra: dict[str, float] = {}
        if "off_policy_prob" in stats:
            extra["off_policy_prob"] = stats["off_policy_prob"]
        if self.reference is not None:
            kl = algorithms.kl_penalty(
                logp, self._reference_logprobs(micro), self.algo.kl_estimator
            )
            # Aggregated like the policy loss, as verl's kl_loss is.
            kl_loss = algorithms.aggregate_loss(
                kl, micro.loss_mask, self.algo.loss_agg, self.max_response_len
            )
            loss = loss + self.algo.kl_coef * kl_loss
            extra["kl_to_reference"] = algorithms.masked_mean(kl.detach(), micro.loss_mask).item()
        if coef != 0.0:
            # Entropy bonus, aggregated exactly like the policy loss so the coefficient means
            # the same thing under either aggregation.
            loss = loss - coef * algorithms.aggregate_loss(
                entropy, micro.loss_mask, self.algo.loss_agg, self.max_response_len
            )
        stats = {
            "policy_loss": pg_loss.item(),
            "entropy": algorithms.masked_mean(entropy.detach(), micro.loss_mask).item(),
            "clip_frac": stats["clip_frac"],
            "approx_kl": stats["approx_kl"],
            **extra,
        }
        return loss, stats

    @torch.no_grad()
    def _reference_logprobs(self, micro: TokenBatch) -> Tensor:
        """Log-probs of `micro`'s target tokens under the frozen reference (0 elsewhere)."""
        assert self.reference is not None
        policy, self.model = self.model, self.reference  # _score reads self.model
        try:
            logp, _ = self._score(micro, with_entropy=False)
        finally:
            self.model = policy
        return logp

    def _sft_micro_loss(self, micro: TokenBatch) -> tuple[Tensor, dict[str, float]]:
        coef = self.sft.entropy_coef
        logp, entropy = self._score(micro, with_entropy=coef != 0.0)
        nll = algorithms.sft_nll(logp, micro.loss_mask, "token_mean")
        if entropy is None:
            return nll, {"sft_loss": nll.item()}
        # The reference's SFT step subtracts an entropy bonus, token-mean like the NLL.
        mean_entropy = algorithms.masked_mean(entropy, micro.loss_mask)
        return nll - coef * mean_entropy, {
            "sft_loss": nll.item(),
            "sft_entropy": mean_entropy.item(),
        }

    def _optimizer_step(
        self,
        kind: UpdateKind,
        minibatch: TokenBatch,
        micro_loss: MicroLoss,
        *,
        micro_batch_size: int,
        max_tokens: int | None,
        grad_clip: float,
        loss_agg: algorithms.LossAgg,
    ) -> dict[str, float]:
        """One optimizer step on `minibatch`, accumulating gradients over its micro-batches.
        A non-finite loss skips the step; see the module docstring on rolled-back steps."""
        self.model.train()
        self._zero_grad(kind)
        total_targets = max(minibatch.num_target_tokens, 1)
        micro_means = _WeightedMeans()
        micros = [
            minibatch.select(rows)
            for rows in self._micro_rows(minibatch, micro_batch_size, max_tokens)
        ]
        mine = self._local_micro_batches(len(micros))
        loss_finite = True
        for position, index in enumerate(mine):
            # None: a rank short of real micro-batches runs a zero-weight copy of the first, so
            # every rank runs as many forwards and backwards (collectives) as the others.
            micro = micros[0 if index is None else index].trimmed().to(self.device)
            # This micro-batch's share of the mini-batch loss (see the module docstring).
            if index is None:
                weight = 0.0
            elif loss_agg == "token_mean":
                weight = micro.num_target_tokens / total_targets
            else:
                weight = len(micro) / len(minibatch)
            loss, stats = micro_loss(micro)
            loss_finite = loss_finite and bool(torch.isfinite(loss.detach()).all())
            self._backward(loss * weight, last_micro_batch=position == len(mine) - 1)
            micro_means.add(stats, weight)
        loss_finite, micro_means = self._across_ranks(loss_finite, micro_means)
        self._step_outcome = None
        if loss_finite:
            grad_norm = self._clip_and_step(kind, grad_clip)
        else:  # no step: the gradients of a non-finite loss are garbage
            grad_norm = float("nan")
            self._zero_grad(kind)
            self._count_step(kind)
        outcome = self._step_outcome
        if outcome is None:  # a subclass's _clip_and_step (DeepSpeed) skips on overflow itself
            outcome = "ok" if math.isfinite(grad_norm) else "nonfinite"
        stats = micro_means.means()
        stats["grad_norm"] = grad_norm
        stats["skipped_steps"] = float(outcome != "ok")
        stats["skipped_nonfinite"] = float(outcome == "nonfinite")
        stats["skipped_explosive"] = float(outcome == "explosive")
        self._note_outcome(kind, outcome, loss_finite, grad_norm)
        return stats

    def _note_outcome(
        self, kind: UpdateKind, outcome: str, loss_finite: bool, grad_norm: float
    ) -> None:
        """Count consecutive bad steps; raise DivergenceError at `max_bad_steps`."""
        if outcome == "ok":
            self.consecutive_bad_steps = 0
            return
        self.consecutive_bad_steps += 1
        if self.consecutive_bad_steps < self.max_bad_steps:
            return
        if not loss_finite:
            why = "the loss was not finite"
        elif not math.isfinite(grad_norm):
            why = f"the gradient norm was {grad_norm}"
        elif outcome == "explosive":
            why = (
                f"the step made the weights explode (a weight past {self.max_abs_weight:g} or "
                f"the weight norm grown over {self.max_norm_growth:g}x)"
            )
        else:
            why = "the step made a weight non-finite"
        raise DivergenceError(
            f"training diverged: {self.consecutive_bad_steps} optimizer steps in a row were "
            f"skipped or rolled back; the last, a {kind} step at lr {self.current_lr(kind):g}: "
            f"{why}. The weights are those from before these steps; lower {kind}.lr or check "
            "the data"
        )

    # Hooks a distributed engine overrides (fsdp_trainer.py, deepspeed_trainer.py).

    def _local_micro_batches(self, count: int) -> list[int | None]:
        """Which of a mini-batch's `count` micro-batches this process computes: all of them
        (None would be a zero-weight padding micro-batch; see distributed.rank_micro_batches)."""
        return list(range(count))

    def _across_ranks(
        self, loss_finite: bool, means: _WeightedMeans
    ) -> tuple[bool, _WeightedMeans]:
        """Every rank's verdict and stats combined (one process: its own)."""
        return loss_finite, means

    def _weight_stats(self, params: list[nn.Parameter]) -> tuple[float, float]:
        """(max |w|, ||w||) over the whole model (a sharding engine combines its ranks')."""
        return _weight_stats(params)

    def _after_optimizer_step(self) -> None:
        """Runs right after optimizer.step(), before the weights are checked."""

    def gather_weights(self) -> None:
        """Bring the current weights into `self.model` (in one process they are there)."""

    def close(self) -> None:
        """Release workers and process groups (one process: nothing)."""

    def _zero_grad(self, kind: UpdateKind) -> None:
        self.optimizers[kind].zero_grad(set_to_none=True)

    def _backward(self, loss: Tensor, *, last_micro_batch: bool) -> None:
        loss.backward()

    def _clip_and_step(self, kind: UpdateKind, grad_clip: float) -> float:
        """Clip, step, count; returns the pre-clip gradient norm. A non-finite norm skips the
        step; a step that leaves non-finite or exploded weights is rolled back. Sets
        `_step_outcome` to "ok", "nonfinite" or "explosive"."""
        params = self.trainable_parameters()
        optimizer = self.optimizers[kind]
        norm = float(nn.utils.clip_grad_norm_(params, grad_clip))
        self._step_outcome = "ok"
        if not math.isfinite(norm):
            self._step_outcome = "nonfinite"
        else:
            before = self._weight_stats(params)
            snapshot = None
            if self._step_may_explode(optimizer, before, params):
                snapshot = self._take_snapshot(optimizer, params)
            optimizer.step()
            self._after_optimizer_step()
            problem = self._weight_problem(before, self._weight_stats(params))
            if problem is not None:
                if snapshot is None:
                    # _step_may_explode's bound is wrong for this optimizer: nothing to go back to.
                    raise DivergenceError(
                        f"a {kind} step left {problem} weights and could not be rolled back "
                        f"(no copy was taken); lr {self.current_lr(kind):g}"
                    )
                self._restore_snapshot(optimizer, params, snapshot)
                self._step_outcome = problem
        optimizer.zero_grad(set_to_none=True)
        self._count_step(kind)
        return norm

    @staticmethod
    def _take_snapshot(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> tuple:
        """Copies of the weights and of the optimizer's per-parameter state (moments, step)."""
        weights = [p.detach().clone() for p in params]
        state = {
            p: {
                k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
                for k, v in optimizer.state[p].items()
            }
            for p in params
            if p in optimizer.state
        }
        return weights, state

    @staticmethod
    def _restore_snapshot(
        optimizer: torch.optim.Optimizer, params: list[nn.Parameter], snapshot: tuple
    ) -> None:
        """Back to `_take_snapshot`'s copies; param_groups (lr, ...) are left as they are."""
        weights, state = snapshot
        with torch.no_grad():
            for p, saved in zip(params, weights, strict=True):
                p.copy_(saved)
        for p in params:
            optimizer.state.pop(p, None)
        optimizer.state.update(state)

    def _weight_problem(
        self, before: tuple[float, float], after: tuple[float, float]
    ) -> str | None:
        """ "nonfinite", "explosive" or None, from (max |w|, ||w||) before and after a step."""
        max_before, norm_before = before
        max_after, norm_after = after
        if not math.isfinite(max_after):
            return "nonfinite"
        if max_after > self.max_abs_weight and max_after > max_before:
            return "explosive"
        if not math.isfinite(norm_after) or norm_after > self.max_norm_growth * norm_before:
            return "explosive"
        return None

    def _step_may_explode(
        self,
        optimizer: torch.optim.Optimizer,
        before: tuple[float, float],
        params: list[nn.Parameter],
    ) -> bool:
        """False only when one AdamW step provably cannot trip `_weight_problem`.

        With clipped (finite) gradients, step t of AdamW moves each weight by at most
        lr * |m_hat| / (sqrt(v_hat) + eps) <= lr * B(t), after the decay w * (1 - lr * wd), where
        (Cauchy-Schwarz over the moment sums, r = b1^2 / b2 < 1)
            B(t) = (1 - b1) / sqrt(1 - b2) * sqrt((1 - r^t) / (1 - r)) * sqrt(1 - b2^t) / (1 - b1^t)
        (B(1) = 1; about 5.8 for the default betas after many steps). Twice B(t) is used."""
        max_before, norm_before = before
        if type(optimizer) is not torch.optim.AdamW:
            return True
        if not (math.isfinite(max_before) and math.isfinite(norm_before)):
            return True
        numel = sum(p.numel() for p in params)
        for group in optimizer.param_groups:
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            b1, b2 = (float(b) for b in group["betas"])
            if not (
                math.isfinite(lr)
                and math.isfinite(wd)
                and 0 <= b1 < 1
                and 0 < b2 < 1
                and b1 * b1 < b2
            ):
                return True
            state = optimizer.state.get(group["params"][0], {}) if group["params"] else {}
            t = int(state["step"]) + 1 if "step" in state else 1
            r = b1 * b1 / b2
            bound = (
                (1 - b1)
                / math.sqrt(1 - b2)
                * math.sqrt((1 - r**t) / (1 - r))
                * math.sqrt(1 - b2**t)
                / (1 - b1**t)
            )
            move = 2.0 * lr * bound
            decay = abs(1 - lr * wd)
            if max_before * decay + move > self.max_abs_weight:
                return True
            if norm_before * decay + move * math.sqrt(numel) > self.max_norm_growth * norm_before:
                return True
        return False

    def _count_step(self, kind: UpdateKind) -> None:
        if kind == "rl":
            self.rl_optimizer_steps += 1
        else:
            self.sft_optimizer_steps += 1

    def current_lr(self, kind: UpdateKind) -> float:
        return float(self.optimizers[kind].param_groups[0]["lr"])

    def _finish_stats(
        self, kind: UpdateKind, means: _WeightedMeans, batch: TokenBatch, start: float
    ) -> dict[str, float]:
        stats = means.means()  # each optimizer step weighs 1
        for key in _SKIP_KEYS:
            stats[key] = means.total(key)
        stats["optimizer_steps"] = means.count("skipped_steps")
        stats["lr"] = self.current_lr(kind)
        stats["tokens"] = float(batch.num_target_tokens)
        stats["seq_tokens"] = float(batch.num_tokens)
        stats["seconds"] = time.perf_counter() - start
        return stats

    # --------------------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict:
        """Optimizer states and step counters (the weights are saved by checkpoint.py)."""
        return {
            "version": STATE_VERSION,
            "rl_optimizer": self.optimizers["rl"].state_dict(),
            "sft_optimizer": self.optimizers["sft"].state_dict(),
            "rl_optimizer_steps": self.rl_optimizer_steps,
            "sft_optimizer_steps": self.sft_optimizer_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"trainer state version {state.get('version')!r}, expected {STATE_VERSION}"
            )
        self.optimizers["rl"].load_state_dict(state["rl_optimizer"])
        self.optimizers["sft"].load_state_dict(state["sft_optimizer"])
        self.rl_optimizer_steps = int(state["rl_optimizer_steps"])
        self.sft_optimizer_steps = int(state["sft_optimizer_steps"])
