"""vLLM rollout engine (GPU, the optional `gpu` extra): the `RolloutEngine` interface over vLLM.

vLLM is imported only when an engine is built, so the rest of the platform (and CPU-only
installs) never needs it. The engine is colocated with the trainer: after each update the
trainer's weights are loaded into vLLM's model in memory, and between rollouts vLLM can sleep to
hand its GPU memory (weights and KV cache) to the trainer.
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
from relift_core.runtime.rollout import FinishReason, RolloutEngine, Sample, SamplingRequest


class VLLMRolloutEngine(RolloutEngine):
    """Sampling with `vllm.LLM`: one `generate` call for all prompts, n samples each.

    `vllm_module` replaces `import vllm` (tests pass a fake module exposing `LLM` and
    `SamplingParams`).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.5,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        max_model_len: int | None = None,
        enable_sleep_mode: bool = True,
        vllm_module: ModuleType | Any | None = None,
    ) -> None:
        if vllm_module is None:
            vllm_module = _import_vllm()
        if tensor_parallel_size == 1:
            # Keep the engine core in this process, so the trainer's tensors reach the model
            # without pickling (`sync_weights`). An explicit setting by the user wins.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self._vllm = vllm_module
        kwargs: dict[str, Any] = {
            "model": str(model_dir),
            "dtype": dtype,
            "gpu_memory_utilization": gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size,
            "seed": seed,
            "enable_sleep_mode": enable_sleep_mode,
        }
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.llm = vllm_module.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.asleep = False

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
        """An engine serving `model`'s current weights, saved for vLLM to start from.

        vLLM builds its model from a directory; later updates arrive in memory (`sync_weights`).
        """
        model_dir = Path(model_dir) if model_dir is not None else cfg.run_dir() / "vllm_model"
        save_policy(model, tokenizer, model_dir)
        # Rollouts in half precision even when the trainer keeps float32 weights (as verl does):
        # float32 would halve vLLM's throughput and KV-cache capacity.
        dtype = cfg.model.dtype if cfg.model.dtype != "float32" else "bfloat16"
        return cls(
            model_dir,
            dtype=dtype,
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
            tensor_parallel_size=cfg.rollout.tensor_parallel_size,
            seed=cfg.run.seed,
            vllm_module=vllm_module,
        )

    def _sample_ids(self, request: SamplingRequest) -> list[list[Sample]]:
        # Token ids, not text: vLLM's own tokenisation of text could prepend a BOS.
        token_prompts = [{"prompt_token_ids": ids} for ids in request.prompt_ids]
        n, progress, seed = request.n, request.progress, request.seed
        # One SamplingParams per prompt: a per-prompt seed gives every prompt its own random
        # stream (one shared seed would replay the same draws for every prompt).
        params = [
            self._vllm.SamplingParams(
                n=n,
                temperature=request.temperature,
                top_p=request.top_p if request.temperature > 0 else 1.0,
                max_tokens=request.max_new_tokens,
                seed=None if seed is None else seed + i,
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
        """Load the trainer's current weights into vLLM's model, in memory (waking it first)."""
        self.wake()  # a sleeping engine's weights are offloaded; loading into them is undefined
        weights = list(model.state_dict().items())
        if hasattr(self.llm, "apply_model"):
            # vLLM >= 0.8: runs on the model inside each worker (in this process when
            # VLLM_ENABLE_V1_MULTIPROCESSING=0, so no copy through pickling).
            self.llm.apply_model(_WeightLoader(weights))
        else:  # older vLLM (V0 engine): reach the driver worker's model directly
            runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
            runner.model.load_weights(weights)

    def sleep(self) -> None:
        """Offload weights to CPU and drop the KV cache (level 1), freeing GPU memory."""
        if not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False


class _WeightLoader:
    """`apply_model` callback: a picklable object rather than a closure, for multi-process TP."""

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
