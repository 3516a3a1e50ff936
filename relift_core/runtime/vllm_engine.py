"""vLLM rollout engine (GPU, the optional `gpu` extra): the `RolloutEngine` interface over vLLM.

vLLM is imported only when an engine is built, so the rest of the platform (and CPU-only
installs) never needs it. The engine is colocated with the trainer: while the trainer steps, vLLM
sleeps and hands its GPU memory (weights and KV cache) over; after each update the trainer's
weights are loaded into vLLM's model in memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from relift_core.config import ExperimentConfig
from relift_core.runtime.models import save_policy
from relift_core.runtime.rollout import (
    FinishReason,
    RolloutEngine,
    Sample,
    SamplingRequest,
    default_stop_token_ids,
)


class VLLMRolloutEngine(RolloutEngine):
    """Sampling with `vllm.LLM`: one `generate` call for all prompts, n samples each.

    What vLLM does that the engine has to account for (read from vLLM 0.33.0's source):
    - it stops only at the tokenizer's eos, the generation config's eos ids and the request's
      `stop_token_ids`, so the HF engine's stop tokens (ChatML's `<|im_end|>` too) are passed;
    - a request's n samples are child requests seeded `seed + index`, so prompt i's request is
      seeded `seed + i * n`: no two samples of a call share a random stream;
    - `max_model_len` defaults to the checkpoint's context; a rollout needs prompt + response;
    - sleep mode allocates through one process-wide CuMem allocator, so a process holds one
      sleep-mode engine: `from_config` reuses it (`shared_engine`);
    - `apply_model` runs in this process only while the engine core does
      (VLLM_ENABLE_V1_MULTIPROCESSING=0, one GPU); across processes vLLM's msgpack refuses to
      serialise the loader and would copy every weight, so tensor parallelism is refused.

    `vllm_module` replaces `import vllm` (tests pass a fake module exposing `LLM` and
    `SamplingParams`).
    """

    # Level 2 discards the weights instead of offloading them to CPU: the trainer holds the
    # current ones and `sync_weights` loads them anyway (as verl does), so a 7B policy does not
    # cost 15 GB of pinned host memory per engine.
    SLEEP_LEVEL = 2

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.5,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        max_model_len: int | None = None,
        stop_token_ids: list[int] | None = None,
        enable_sleep_mode: bool = True,
        vllm_module: ModuleType | Any | None = None,
    ) -> None:
        if tensor_parallel_size != 1:
            raise ValueError(
                f"rollout.tensor_parallel_size={tensor_parallel_size}: the vLLM engine takes "
                "the trainer's weights in this process, which needs one GPU per engine; set "
                "rollout.tensor_parallel_size=1 (cluster.backend=ray gives every rank one)"
            )
        if vllm_module is None:
            vllm_module = _import_vllm()
        # The engine core in this process, so `apply_model` hands the trainer's tensors to the
        # model without serialising them (vLLM's msgpack refuses the loader otherwise).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self._vllm = vllm_module
        self.settings: dict[str, Any] = {
            "dtype": dtype,
            "gpu_memory_utilization": gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size,
            "seed": seed,
            "enable_sleep_mode": enable_sleep_mode,
        }
        if max_model_len is not None:
            self.settings["max_model_len"] = max_model_len
        self.llm = vllm_module.LLM(model=str(model_dir), **self.settings)
        self.tokenizer = self.llm.get_tokenizer()
        self.stop_token_ids = stop_token_ids or default_stop_token_ids(self.tokenizer)
        # "awake"; "asleep" (nothing on the GPU); "weights" (weights woken, KV cache not yet:
        # after a level-2 sleep they hold no trained values until `sync_weights` loads them).
        self.state = "awake"
        self.weights_current = True
        self.layout: tuple[tuple[str, tuple[int, ...]], ...] | None = None  # set by from_config

    @classmethod
    def from_config(
        cls,
        cfg: ExperimentConfig,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        model_dir: str | Path | None = None,
        vllm_module: ModuleType | Any | None = None,
    ) -> VLLMRolloutEngine:
        """An engine serving `model`'s current weights: this process's engine when it has one
        with the same settings (given the weights in memory), else one built from `model`
        saved to a directory (vLLM starts from one; later updates arrive in memory)."""
        # Rollouts in half precision even when the trainer keeps float32 weights (as verl does):
        # float32 would halve vLLM's throughput and KV-cache capacity.
        dtype = cfg.model.dtype if cfg.model.dtype != "float32" else "bfloat16"
        settings: dict[str, Any] = {
            "dtype": dtype,
            "gpu_memory_utilization": cfg.rollout.gpu_memory_utilization,
            "tensor_parallel_size": cfg.rollout.tensor_parallel_size,
            "seed": cfg.run.seed,
            "enable_sleep_mode": True,
            "max_model_len": engine_context(cfg),
        }
        stop_token_ids = default_stop_token_ids(tokenizer, model)
        layout = weights_layout(model)
        live = _shared
        if live is not None:
            # The seed only seeds unseeded requests, and every request here carries one.
            asked = {**settings, "seed": live.settings["seed"]}
            if (live.settings, live.stop_token_ids, live.layout) != (asked, stop_token_ids, layout):
                raise RuntimeError(
                    "one vLLM engine per process (sleep mode's CuMem allocator is process-wide): "
                    f"this process's engine runs with {live.settings} and stop tokens "
                    f"{live.stop_token_ids}, the config asks for {settings} and "
                    f"{stop_token_ids} (or another model shape); run it in its own process"
                )
            live.sync_weights(model)
            return live
        model_dir = Path(model_dir) if model_dir is not None else cfg.run_dir() / "vllm_model"
        save_policy(model, tokenizer, model_dir)
        engine = cls(model_dir, stop_token_ids=stop_token_ids, vllm_module=vllm_module, **settings)
        engine.layout = layout
        _set_shared_engine(engine)
        return engine

    def _sample_ids(self, request: SamplingRequest) -> list[list[Sample]]:
        if self.state != "awake" or not self.weights_current:
            raise RuntimeError(
                "the vLLM engine is asleep or its weights were discarded by "
                "sleep(level=2): call sync_weights(model) before sampling"
            )
        # Token ids, not text: vLLM's own tokenisation of text could prepend a BOS.
        token_prompts = [{"prompt_token_ids": ids} for ids in request.prompt_ids]
        n, progress, seed = request.n, request.progress, request.seed
        # One SamplingParams per prompt: vLLM seeds sample j of a request `seed + j`, so
        # prompt i starts at seed + i * n and every sample of the call has its own stream.
        params = [
            self._vllm.SamplingParams(
                n=n,
                temperature=request.temperature,
                top_p=request.top_p if request.temperature > 0 else 1.0,
                max_tokens=request.max_new_tokens,
                seed=None if seed is None else seed + i * n,
                stop_token_ids=list(self.stop_token_ids),
            )
            for i in range(len(token_prompts))
        ]
        total = len(token_prompts) * n
        if progress is not None:
            progress(0, total)
        outputs = self.llm.generate(token_prompts, params, use_tqdm=False)
        samples = [
            _samples_from_request(i, token_prompts[i]["prompt_token_ids"], output, n)
            for i, output in enumerate(outputs)
        ]
        if progress is not None:
            progress(total, total)
        return samples

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load the trainer's current weights into vLLM's model, in memory.

        A sleeping engine wakes its weights first and its KV cache only after the load, so the
        trainer's tensors and the KV cache are never on the GPU together; cached prefixes were
        computed by the old weights and are dropped."""
        if self.state == "asleep":
            self.llm.wake_up(tags=["weights"])
            self.state = "weights"
        self.llm.apply_model(_WeightLoader(list(model.state_dict().items())))
        self.weights_current = True
        self.llm.reset_prefix_cache()
        if self.state == "weights":
            self.llm.wake_up(tags=["kv_cache"])
            self.state = "awake"

    def sleep(self) -> None:
        """Free the engine's GPU memory: KV cache and weights (level 2: discarded, not
        offloaded; `sync_weights` brings the trainer's back)."""
        if self.state == "awake":
            self.llm.sleep(level=self.SLEEP_LEVEL)
            self.state = "asleep"
            self.weights_current = self.SLEEP_LEVEL < 2

    def wake(self) -> None:
        """Take the weights' memory back; the KV cache follows once `sync_weights` has
        loaded them (what the training loop calls next)."""
        if self.state == "asleep":
            self.llm.wake_up(tags=["weights"])
            self.state = "weights"


def engine_context(cfg: ExperimentConfig) -> int:
    """vLLM's `max_model_len`: `rollout.max_model_len`, by default the longest prompt plus the
    longest response it is asked for (rollouts and evaluations share the engine)."""
    if cfg.rollout.max_model_len is not None:
        return cfg.rollout.max_model_len
    return cfg.data.max_prompt_tokens + max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens)


def weights_layout(model: torch.nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Names and shapes of the weights: which models one engine can be handed."""
    return tuple((name, tuple(t.shape)) for name, t in model.state_dict().items())


# The process's engine, kept for the process's life: vLLM gives sleep mode's memory back to
# no second engine, so the next run or checkpoint in this process reuses this one.
_shared: VLLMRolloutEngine | None = None


def shared_engine() -> VLLMRolloutEngine | None:
    """This process's vLLM engine, if `from_config` built one."""
    return _shared


def _set_shared_engine(engine: VLLMRolloutEngine | None) -> None:
    global _shared
    _shared = engine


class _WeightLoader:
    """`apply_model` callback (a class, not a closure: it names what it does in tracebacks)."""

    def __init__(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        self.weights = weights

    def __call__(self, model: torch.nn.Module) -> None:
        model.load_weights(iter(self.weights))


def _samples_from_request(
    prompt_index: int, prompt_ids: list[int], request: Any, n: int
) -> list[Sample]:
    completions = sorted(request.outputs, key=lambda c: c.index)
    if len(completions) != n:
        raise RuntimeError(f"vLLM returned {len(completions)} samples for prompt {prompt_index}")
    return [
        Sample(
            prompt_index=prompt_index,
            prompt_ids=list(prompt_ids),
            response_ids=list(c.token_ids),
            text=c.text,
            length=len(c.token_ids),
            finish_reason=_finish_reason(c.finish_reason),
        )
        for c in completions
    ]


def _finish_reason(vllm_reason: str | None) -> FinishReason:
    # vLLM: "stop" (eos, a stop token or a stop string), "length" (max_tokens), "abort".
    if vllm_reason == "stop":
        return "eos"
    if vllm_reason == "length":
        return "length"
    raise RuntimeError(f"vLLM request ended with finish_reason={vllm_reason!r}")


def _import_vllm() -> ModuleType:
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "rollout.engine=vllm needs vLLM, which is in the optional `gpu` extra: "
            "pip install 'relift[gpu]' (a CUDA machine); or set rollout.engine=hf"
        ) from e
    return vllm
