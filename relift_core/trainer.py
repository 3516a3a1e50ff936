"""The policy trainer: RL (GRPO) and SFT updates on one model, in one process, plain torch.

The loop reads like torchtune's: for each epoch, for each mini-batch (one optimizer step), for
each micro-batch (one forward/backward, gradients accumulated). The maths is in
`relift_core.algorithms`; this file only decides *what* is fed to it and *when* a step happens.

Gradient accumulation is exact, not "divide by the number of micro-batches": every micro-batch
loss is weighted by its share of the mini-batch (its share of rows for per-sequence aggregation,
its share of target tokens for token_mean), so the accumulated gradient is the gradient of the
mini-batch loss, whatever the micro-batch sizes. Position ids come from the attention mask, so a
row scores the same left- or right-padded and whatever else shares its micro-batch.

Two AdamW optimizers share the parameters, one per update kind: RL and SFT have their own
learning rates (the paper: 1e-6 each) and, this way, their own moment estimates; a rare SFT step
does not inherit RL's second moments. Each optimizer checkpoints as a plain state dict.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Literal

import torch
from torch import Tensor, nn

from relift_core import algorithms
from relift_core.batches import TokenBatch, shift_targets
from relift_core.config import AlgorithmConfig, RLConfig, SFTConfig

UpdateKind = Literal["rl", "sft"]
# A micro-batch -> (loss to backpropagate, stats to average).
MicroLoss = Callable[[TokenBatch], tuple[Tensor, dict[str, float]]]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STATE_VERSION = 1


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... over each row's real tokens, whichever side the padding is on."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class _WeightedMeans:
    """Running weighted means of named stats (weights need not sum to 1)."""

    def __init__(self) -> None:
        self._sum: dict[str, float] = defaultdict(float)
        self._weight: dict[str, float] = defaultdict(float)

    def add(self, stats: dict[str, float], weight: float = 1.0) -> None:
        for key, value in stats.items():
            self._sum[key] += float(value) * weight
            self._weight[key] += weight

    def total(self, key: str) -> float:
        return self._sum[key]

    def count(self, key: str) -> float:
        return self._weight[key]

    def means(self) -> dict[str, float]:
        return {k: self._sum[k] / self._weight[k] if self._weight[k] else 0.0 for k in self._sum}


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
        gradient_checkpointing: bool | None = None,
    ) -> None:
        """`dtype` is the dtype the weights are held in; on CUDA the forward also runs under bf16
        autocast. `gradient_checkpointing`: None means on for CUDA, off for CPU."""
        if algo.kl_coef > 0:
            # A KL term needs a frozen reference policy, which the paper's recipe does not use.
            raise ValueError(
                f"algorithm.kl_coef={algo.kl_coef}: a KL penalty needs a reference model, which "
                "this trainer does not hold; set algorithm.kl_coef=0 (the paper's setting)"
            )
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if max_response_len <= 0:
            raise ValueError(f"max_response_len must be positive, got {max_response_len}")
        self.algo, self.rl, self.sft = algo, rl, sft
        self.max_response_len = max_response_len
        self.device = torch.device(device)
        self.model = model.to(device=self.device, dtype=_DTYPES[dtype])
        self._on_cuda = self.device.type == "cuda"
        if gradient_checkpointing is None:
            gradient_checkpointing = self._on_cuda
        if gradient_checkpointing:
            # Activations dominate GPU memory at long responses; recompute them in backward.
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.rl_optimizer_steps = 0
        self.sft_optimizer_steps = 0
        self._build_optimizers()

    # ----------------------------------------------------------------------------- set-up hooks

    def _build_optimizers(self) -> None:
        params = self.trainable_parameters()
        self.optimizers: dict[UpdateKind, torch.optim.Optimizer] = {
            "rl": torch.optim.AdamW(params, lr=self.rl.lr, weight_decay=self.rl.weight_decay),
            "sft": torch.optim.AdamW(params, lr=self.sft.lr, weight_decay=0.0),
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # --------------------------------------------------------------------------------- scoring

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self._on_cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits of the T - 1 predicting positions: [B, T - 1, V] (see batches.py on the shift)."""
        with self._autocast():
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            )
        return out.logits[:, :-1]

    def _score(
        self, micro: TokenBatch, with_entropy: bool, entropy_grad: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """Per-column log p(next token) and, optionally, entropy: both [b, t - 1] float.
        `entropy_grad=False` keeps the entropy out of the autograd graph (stats only)."""
        logits = self._forward(micro.input_ids, micro.attention_mask)
        logp = algorithms.token_logprobs(logits, shift_targets(micro.input_ids)).float()
        if not with_entropy:
            return logp, None
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = algorithms.entropy_from_logits(logits)
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
            for start, micro in zip(range(0, b, size), batch.split(size)):
                micro = micro.trimmed()
                width = micro.loss_mask.shape[1]
                logp, entropy = self._score(micro.to(self.device), with_entropy)
                rows = slice(start, start + len(micro))
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

        `batch.advantages` is required. Without `batch.old_logp` the batch is on-policy: old
        log-probs are scored now, before any update, so the first mini-batch has ratio 1.
        Stats: policy_loss (mean over steps of the mini-batch loss), entropy (token mean, for
        reading; the loss uses algorithm.loss_agg), grad_norm (mean pre-clip norm), clip_frac,
        approx_kl, lr, tokens (target tokens), seq_tokens (all real tokens), optimizer_steps,
        seconds.
        """
        if batch.advantages is None:
            raise ValueError("rl_step needs batch.advantages (see relift_core.batches.rl_batch)")
        start = time.perf_counter()
        if batch.old_logp is None:
            batch = replace(batch, old_logp=self.token_logprobs(batch))
        rows = rows_per_minibatch or self.default_rl_rows_per_minibatch(len(batch))
        means = _WeightedMeans()
        for _ in range(self.rl.ppo_epochs):
            for minibatch in batch.split(rows):
                means.add(
                    self._optimizer_step(
                        "rl",
                        minibatch,
                        self._rl_micro_loss,
                        micro_batch_size=self.rl.micro_batch_size,
                        grad_clip=self.rl.grad_clip,
                        loss_agg=self.algo.loss_agg,
                    )
                )
        return self._finish_stats("rl", means, batch, start)

    def sft_step(self, batch: TokenBatch) -> dict[str, float]:
        """Fine-tuning: NLL (token mean) on the target tokens only, sft.mini_batch_size rows per
        optimizer step, sft.epochs passes. Stats: sft_loss, grad_norm, lr, tokens, seq_tokens,
        optimizer_steps, seconds."""
        start = time.perf_counter()
        means = _WeightedMeans()
        for _ in range(self.sft.epochs):
            for minibatch in batch.split(self.sft.mini_batch_size):
                means.add(
                    self._optimizer_step(
                        "sft",
                        minibatch,
                        self._sft_micro_loss,
                        micro_batch_size=self.sft.micro_batch_size,
                        grad_clip=self.sft.grad_clip,
                        loss_agg="token_mean",
                    )
                )
        return self._finish_stats("sft", means, batch, start)

    def _rl_micro_loss(self, micro: TokenBatch) -> tuple[Tensor, dict[str, float]]:
        assert micro.old_logp is not None and micro.advantages is not None
        coef = self.algo.entropy_coef
        # With no entropy bonus the entropy is only a stat: no [b, t, V] graph kept for it.
        logp, entropy = self._score(micro, with_entropy=True, entropy_grad=coef != 0.0)
        assert entropy is not None
        pg_loss, stats = algorithms.policy_loss(
            logp,
            micro.old_logp,
            micro.advantages,
            micro.loss_mask,
            clip_ratio=self.algo.clip_ratio,
            loss_agg=self.algo.loss_agg,
            max_len=self.max_response_len,
        )
        loss = pg_loss
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
        }
        return loss, stats

    def _sft_micro_loss(self, micro: TokenBatch) -> tuple[Tensor, dict[str, float]]:
        logp, _ = self._score(micro, with_entropy=False)
        loss = algorithms.sft_nll(logp, micro.loss_mask, "token_mean")
        return loss, {"sft_loss": loss.item()}

    def _optimizer_step(
        self,
        kind: UpdateKind,
        minibatch: TokenBatch,
        micro_loss: MicroLoss,
        *,
        micro_batch_size: int,
        grad_clip: float,
        loss_agg: algorithms.LossAgg,
    ) -> dict[str, float]:
        """One optimizer step on `minibatch`, accumulating gradients over its micro-batches."""
        self.model.train()
        self._zero_grad(kind)
        total_targets = max(minibatch.num_target_tokens, 1)
        micro_means = _WeightedMeans()
        micros = minibatch.split(micro_batch_size)
        for index, micro in enumerate(micros):
            micro = micro.trimmed().to(self.device)
            # This micro-batch's share of the mini-batch loss (see the module docstring).
            if loss_agg == "token_mean":
                weight = micro.num_target_tokens / total_targets
            else:
                weight = len(micro) / len(minibatch)
            loss, stats = micro_loss(micro)
            self._backward(loss * weight, last_micro_batch=index == len(micros) - 1)
            micro_means.add(stats, weight)
        grad_norm = self._clip_and_step(kind, grad_clip)
        stats = micro_means.means()
        stats["grad_norm"] = grad_norm
        stats["skipped_steps"] = float(not math.isfinite(grad_norm))
        return stats

    # Hooks a distributed engine overrides (see deepspeed_trainer.py).

    def _zero_grad(self, kind: UpdateKind) -> None:
        self.optimizers[kind].zero_grad(set_to_none=True)

    def _backward(self, loss: Tensor, *, last_micro_batch: bool) -> None:
        loss.backward()

    def _clip_and_step(self, kind: UpdateKind, grad_clip: float) -> float:
        """Clip, step, count; returns the pre-clip gradient norm. A non-finite norm skips the
        step (the weights stay as they were) instead of writing nan into them."""
        norm = float(nn.utils.clip_grad_norm_(self.trainable_parameters(), grad_clip))
        if math.isfinite(norm):
            self.optimizers[kind].step()
        self.optimizers[kind].zero_grad(set_to_none=True)
        self._count_step(kind)
        return norm

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
        stats["skipped_steps"] = means.total("skipped_steps")
        stats["optimizer_steps"] = means.count("grad_norm")
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
