"""Rollout engines: sample n completions per prompt from the current policy.

One interface (`RolloutEngine`), two implementations: `HFRolloutEngine` here (transformers
`generate`, CPU or GPU, shares the trainer's model object) and `VLLMRolloutEngine` in
`relift_core.runtime.vllm_engine` (GPU, optional extra). Both return token ids exactly as the policy
produced them, so the trainer can score them without re-tokenising text.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from relift_core.runtime.models import bf16_autocast, resolve_device

FinishReason = Literal["eos", "length"]
ProgressCallback = Callable[[int, int], None]


@dataclass
class Sample:
    """One completion of one prompt."""

    prompt_index: int  # index into the prompts list given to generate
    prompt_ids: list[int]  # the prompt's tokens, without padding
    response_ids: list[int]  # generated tokens, including the stop token if it stopped on one
    text: str  # decoded response, special tokens skipped
    length: int  # len(response_ids)
    finish_reason: FinishReason


@dataclass(frozen=True)
class SamplingRequest:
    """One rollout call, prompts already tokenised: n samples of each, plain sampling."""

    prompt_ids: list[list[int]]
    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int | None
    progress: ProgressCallback | None


class RolloutEngine(ABC):
    """The rollout interface. `generate` is the same for every engine: it checks the request
    and tokenises the prompts (chat-rendered prompts already hold their special tokens, so no
    BOS is added, and every engine samples after exactly the same ids); engines implement
    `_sample_ids` and the weight hand-over."""

    tokenizer: PreTrainedTokenizerBase

    def generate(
        self,
        prompts: list[str],
        *,
        n: int,
        temperature: float,
        top_p: float = 1.0,
        max_new_tokens: int,
        seed: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> list[list[Sample]]:
        """For each (already chat-rendered) prompt, its n samples, in prompt order."""
        if n <= 0 or max_new_tokens <= 0:
            raise ValueError(f"n and max_new_tokens must be positive, got {n}, {max_new_tokens}")
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return self._sample_ids(
            SamplingRequest(prompt_ids, n, temperature, top_p, max_new_tokens, seed, progress)
        )

    @abstractmethod
    def _sample_ids(self, request: SamplingRequest) -> list[list[Sample]]:
        """`request.n` samples of every prompt, in prompt order."""

    @abstractmethod
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights (in memory, no disk)."""

    @abstractmethod
    def sleep(self) -> None:
        """Release accelerator memory between rollouts (so the trainer can use it)."""

    @abstractmethod
    def wake(self) -> None:
        """Reacquire what `sleep` released."""


@contextlib.contextmanager
def engine_asleep(engine: RolloutEngine) -> Iterator[None]:
    """The rollout engine releases its accelerator memory (vLLM: weights offloaded, KV cache
    freed) while the trainer steps, and takes it back after, even if the step fails."""
    engine.sleep()
    try:
        yield
    finally:
        engine.wake()


def default_stop_token_ids(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None
) -> list[int]:
    """Tokens that end a response: the tokenizer's eos, the model's eos ids, and ChatML's end."""
    candidates: list[int | None] = [tokenizer.eos_token_id]
    if model is not None:
        eos = model.generation_config.eos_token_id
        candidates.extend(eos if isinstance(eos, list) else [eos])
    # A chat model's turn ends at <|im_end|> even where its eos token is <|endoftext|>.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        candidates.append(im_end)
    return list(dict.fromkeys(i for i in candidates if i is not None))


def split_response(
    generated: Sequence[int], stop_ids: Iterable[int]
) -> tuple[list[int], FinishReason]:
    """Cut a generated row after its first stop token; without one the row hit the length cap.

    Rows that stopped early are padded by `generate` up to the batch's longest row; the cut
    removes that padding even when the pad token is the eos token.
    """
    stops = set(stop_ids)
    for i, token in enumerate(generated):
        if token in stops:
            return list(generated[: i + 1]), "eos"
    return list(generated), "length"


class HFRolloutEngine(RolloutEngine):
    """Sampling with transformers `generate`: left padding, KV cache, batches of rows.

    A row is one (prompt, sample) pair; prompts × n rows are generated `batch_size` at a time.
    Sampling is plain: temperature and top_p only (top_k and repetition penalties that a
    checkpoint's generation_config may carry are switched off), because RL needs samples from
    the policy's own distribution.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        stop_token_ids: list[int] | None = None,
        drop_finished: bool = True,
        bf16_autocast: bool | None = None,
        share_prompts: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        # True: our own decoding loop (`decode_dropping_finished`), which drops a row from the
        # batch and its KV cache once it has stopped. False: transformers `generate`, which
        # keeps computing finished rows until the longest one stops (the reference).
        self.drop_finished = drop_finished
        # As the trainer's forward (model.bf16_autocast): None means on CUDA only.
        self.bf16_autocast = bf16_autocast
        # model.share_prompts: the n rows of a prompt share one prefill (decode_dropping_finished)
        self.share_prompts = share_prompts
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        # None: wherever the model lives (it may be the trainer's model, moved by the trainer).
        self.device = resolve_device(device) if device is not None else None
        self.stop_token_ids = stop_token_ids or default_stop_token_ids(tokenizer, model)
        if not self.stop_token_ids:
            raise ValueError("no stop token: the tokenizer has no eos token; pass stop_token_ids")
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.stop_token_ids[0]

    def _sample_ids(self, request: SamplingRequest) -> list[list[Sample]]:
        prompt_ids, n, progress = request.prompt_ids, request.n, request.progress
        rows = [i for i in range(len(prompt_ids)) for _ in range(n)]  # prompt of each row
        config = self._generation_config(request.temperature, request.top_p, request.max_new_tokens)
        samples: list[list[Sample]] = [[] for _ in prompt_ids]
        if progress is not None:
            progress(0, len(rows))

        was_training = self.model.training
        self.model.eval()  # no dropout while sampling; gradient checkpointing off, cache on
        try:
            with (
                _seeded(request.seed, self._device()),
                torch.no_grad(),
                bf16_autocast(self._device(), self.bf16_autocast),
            ):
                for start in range(0, len(rows), self.batch_size):
                    chunk = rows[start : start + self.batch_size]
                    batch = [prompt_ids[i] for i in chunk]
                    if self.drop_finished:
                        generated = decode_dropping_finished(
                            self.model,
                            batch,
                            pad_token_id=self.pad_token_id,
                            stop_token_ids=self.stop_token_ids,
                            temperature=request.temperature,
                            top_p=request.top_p,
                            max_new_tokens=request.max_new_tokens,
                            device=self._device(),
                            share_prompts=self.share_prompts,
                        )
                    else:
                        generated = self._generate_rows(batch, config)
                    for prompt_index, row in zip(chunk, generated, strict=True):
                        samples[prompt_index].append(self._sample(prompt_index, prompt_ids, row))
                    if progress is not None:
                        progress(start + len(chunk), len(rows))
        finally:
            self.model.train(was_training)
        return samples

    def sync_weights(self, model: torch.nn.Module) -> None:
        if model is self.model:
            return  # shared with the trainer: already current
        self.model.load_state_dict(model.state_dict())

    def sleep(self) -> None:
        """Nothing to release: the HF engine holds no memory beyond the model itself."""

    def wake(self) -> None:
        """Nothing to reacquire (see `sleep`)."""

    def _device(self) -> torch.device:
        if self.device is not None:
            return self.device
        return next(self.model.parameters()).device

    def _generation_config(
        self, temperature: float, top_p: float, max_new_tokens: int
    ) -> GenerationConfig:
        # Every knob is set explicitly: generate() fills unset (None) values from the
        # checkpoint's generation_config, e.g. Qwen's top_k=20 and repetition_penalty=1.05.
        settings: dict[str, object] = {  # processors that act on greedy decoding too
            "repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "min_new_tokens": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
        }
        if temperature > 0:
            # Warpers that act only when sampling (set for greedy, generate warns they are unused).
            settings.update(
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                typical_p=1.0,
                epsilon_cutoff=0.0,
                eta_cutoff=0.0,
            )
            if self.model.generation_config.min_p is not None:
                settings["min_p"] = 0.0  # only then: a min_p of 0 still costs a softmax per token
        else:
            settings.update(do_sample=False)  # temperature 0: greedy
        return GenerationConfig(
            **settings,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )

    def _generate_rows(self, rows: list[list[int]], config: GenerationConfig) -> list[list[int]]:
        """Generate for a batch of unpadded prompts; return each row's generated tokens."""
        device = self._device()
        input_ids, attention_mask = left_pad(rows, self.pad_token_id)
        width = input_ids.shape[1]
        output = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
        )
        return output[:, width:].tolist()

    def _sample(self, prompt_index: int, prompt_ids: list[list[int]], row: list[int]) -> Sample:
        response, finish_reason = split_response(row, self.stop_token_ids)
        return Sample(
            prompt_index=prompt_index,
            prompt_ids=list(prompt_ids[prompt_index]),
            response_ids=response,
            text=self.tokenizer.decode(response, skip_special_tokens=True),
            length=len(response),
            finish_reason=finish_reason,
        )


def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every prompt ending at the last column."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        if ids:
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, width - len(ids) :] = 1
    return input_ids, attention_mask


# draw_index's first level: blocks of this many vocabulary entries.
_DRAW_BLOCK = 1024


def sample_next(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row from the last position's logits: greedy at temperature 0, otherwise
    plain sampling at `temperature`, restricted to the top-p nucleus when top_p < 1 (the same
    distribution `generate` samples with top_k=0)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        return order.gather(-1, draw_index(sorted_probs)[:, None]).squeeze(-1)
    return draw_index(probs)


def draw_index(weights: torch.Tensor) -> torch.Tensor:
    """One index per row of `weights` ([B, V], non-negative, each row's sum > 0), drawn with
    probability weight / row sum, by inverse transform in two levels: a block of
    `_DRAW_BLOCK` entries by the blocks' masses, then an entry of that block by its weights,
    each level a uniform draw against running sums in float64 (no entry's share is lost to
    rounding). `torch.multinomial` draws an exponential for every entry instead: 32 rows over
    SmolLM2's 49,152 entries on this project's CPU, 25.6 ms a draw against 0.118 ms
    (scripts/bench_runtime.py --parts); a running sum over a whole row is a sequential pass.
    A zero weight is never drawn."""
    rows, width = weights.shape
    pad = -width % _DRAW_BLOCK
    blocks = torch.nn.functional.pad(weights, (0, pad)) if pad else weights
    blocks = blocks.reshape(rows, -1, _DRAW_BLOCK)
    # A block's mass is summed in float32 (to a relative 1e-7), its running sums in float64.
    block = _inverse_transform(blocks.sum(dim=-1).double().cumsum(dim=-1))
    inside = blocks.flatten(0, 1).index_select(
        0, block + blocks.shape[1] * torch.arange(rows, device=weights.device)
    )
    return block * _DRAW_BLOCK + _inverse_transform(inside.double().cumsum(dim=-1))


def _inverse_transform(cdf: torch.Tensor) -> torch.Tensor:
    """For running sums [B, K] (non-decreasing, last > 0): per row the first k with
    cdf[k] > u, u uniform on [0, last)."""
    total = cdf[:, -1:].contiguous()
    u = torch.rand(total.shape, dtype=cdf.dtype, device=cdf.device) * total
    drawn = torch.searchsorted(cdf, u, right=True)
    # u rounded up to the total: the last entry with a weight, not one past the end
    last = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(drawn, last).squeeze(-1)


def decode_dropping_finished(
    model: PreTrainedModel,
    rows: list[list[int]],
    *,
    pad_token_id: int,
    stop_token_ids: list[int],
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    device: torch.device,
    share_prompts: bool = False,
) -> list[list[int]]:
    """Each row's generated tokens (through its first stop token, or `max_new_tokens` of them).

    A KV-cached decoding loop like `generate`'s, with one difference that matters for RL: a row
    that has stopped leaves the batch (and the cache) at once, so a batch of short answers and
    a few long ones costs the short ones' tokens, not the longest row's times the batch. The
    first forward computes logits only at the last position (`logits_to_keep=1`). With
    `share_prompts` each distinct prompt is prefilled once and its cache copied to its rows
    (GRPO's n samples of a question), which then sample apart.
    """
    from transformers import DynamicCache

    distinct = list(dict.fromkeys(map(tuple, rows))) if share_prompts else rows
    input_ids, attention_mask = left_pad([list(r) for r in distinct], pad_token_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    # Left padding: a row's positions count its own tokens only, as in `generate`.
    positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1, :]
    if share_prompts:
        index = {prompt: i for i, prompt in enumerate(distinct)}
        of_row = torch.tensor([index[tuple(r)] for r in rows], device=device)
        cache.batch_select_indices(of_row)
        logits, attention_mask, positions = (
            logits[of_row],
            attention_mask[of_row],
            positions[of_row],
        )
    stops = torch.tensor(stop_token_ids, device=device)
    active = torch.arange(len(rows), device=device)  # the original row of each batch row
    next_position = positions[:, -1] + 1
    generated: list[list[int]] = [[] for _ in rows]
    for step in range(max_new_tokens):
        tokens = sample_next(logits, temperature, top_p)
        for row, token in zip(active.tolist(), tokens.tolist(), strict=True):
            generated[row].append(token)
        if step == max_new_tokens - 1:
            break
        running = ~torch.isin(tokens, stops)
        if not running.all():
            keep = running.nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            cache.batch_select_indices(keep)
            active, tokens = active[keep], tokens[keep]
            attention_mask, next_position = attention_mask[keep], next_position[keep]
        attention_mask = torch.cat(
            [attention_mask, attention_mask.new_ones((len(active), 1))], dim=1
        )
        logits = model(
            input_ids=tokens[:, None],
            attention_mask=attention_mask,
            position_ids=next_position[:, None],
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1, :]
        next_position = next_position + 1
    return generated


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG for a block and restore it afterwards (no seed: leave it alone).

    `generate` draws from the global RNG and takes no generator, so determinism needs the global
    seed; forking keeps the trainer's own random stream untouched by rollouts.
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
