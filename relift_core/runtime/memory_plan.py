"""Per-GPU memory of a run, from its config alone: what `relift plan` prints and what `train`
checks before it allocates anything.

Every figure is a closed-form count (bytes per parameter times parameters, bytes per activation
times activations), so each line of the plan can be checked by hand:

    parameters  from the architecture: embeddings, per layer q/k/v/o (+ q/k/v biases for Qwen2),
                gate/up/down MLP, two RMSNorms; a final norm; an untied lm_head if any.
    weights     parameters x bytes of model.dtype, divided by the trainer ranks under ZeRO-3.
    gradients   the same (kept in the weights' dtype), sharded like the weights.
    optimizer   two AdamW optimizers (RL and SFT keep their own moments, see trainer.py):
                2 x 2 moments x 4 bytes per parameter; DeepSpeed adds a 4-byte fp32 master copy
                and keeps one optimizer (its moments serve both kinds). Sharded over the ranks.
    activations one micro-batch of max_prompt_tokens + max_new_tokens tokens:
                with gradient checkpointing the layer inputs (layers x tokens x hidden x 2 bytes)
                plus one layer's working set recomputed in backward; without it every layer's.
                A layer's working set is 34 x tokens x hidden x 2 bytes (Korthikanti et al.
                2022, "Reducing activation recomputation", table 2, with a fused attention that
                never holds the s x s scores). The logits of the target tokens in fp32, twice
                (log-softmax and its gradient): micro x new tokens x vocab x 4 x 2 bytes.
    rollout     vLLM preallocates rollout.gpu_memory_utilization of the GPU (weights + KV
                cache) where it shares the GPU with the trainer; it sleeps while the trainer
                steps (weights offloaded, cache freed), so the peak is the larger of
                    rollout phase:  trainer weights + optimizer + the vLLM share
                    training phase: trainer weights + gradients + optimizer + activations.

`relift_core` code, no torch: plans are made before anything is imported onto a GPU."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from relift_core.config import ConfigError, ExperimentConfig

GIB = 1024**3
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_CUDA_CONTEXT_GIB = 1.0  # CUDA context, allocator fragmentation, NCCL buffers: kept free
_GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class Architecture:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool = True  # Qwen2 has q/k/v biases; Llama does not

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def parameters(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        attention = h * h + 2 * h * kv + h * h + ((h + 2 * kv) if self.qkv_bias else 0)
        mlp = 3 * h * self.intermediate
        per_layer = attention + mlp + 2 * h
        embeddings = self.vocab * h * (1 if self.tied_embeddings else 2)
        return embeddings + self.layers * per_layer + h


# The presets' models, from their config.json on the hub (no download when planning).
KNOWN_ARCHITECTURES = {
    "Qwen/Qwen2.5-Math-1.5B": Architecture(hidden=1536, layers=28, heads=12, kv_heads=2,
                                           intermediate=8960, vocab=151936, tied_embeddings=True),
    "Qwen/Qwen2.5-Math-7B": Architecture(hidden=3584, layers=28, heads=28, kv_heads=4,
                                         intermediate=18944, vocab=152064, tied_embeddings=False),
    # SmolLM2-135M-Instruct (Llama): the GGUF the smollm2-135m preset converts.
    "HuggingFaceTB/SmolLM2-135M-Instruct": Architecture(
        hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152,
        tied_embeddings=True, qkv_bias=False),
}


class PlanError(ValueError):
    """The model's architecture is unknown to the planner."""


def architecture_of(cfg: ExperimentConfig) -> Architecture:
    m = cfg.model
    if m.source == "tiny":
        from relift_core.runtime.char_tokenizer import VOCAB_SIZE

        t = m.tiny
        return Architecture(hidden=t.hidden_size, layers=t.num_layers, heads=t.num_heads,
                            kv_heads=t.num_kv_heads, intermediate=t.intermediate_size,
                            vocab=VOCAB_SIZE, tied_embeddings=True,
                            qkv_bias=t.architecture == "qwen2")
    if m.source == "gguf":
        return KNOWN_ARCHITECTURES["HuggingFaceTB/SmolLM2-135M-Instruct"]
    name = m.name_or_path or ""
    if name in KNOWN_ARCHITECTURES:
        return KNOWN_ARCHITECTURES[name]
    config_json = Path(name) / "config.json"
    if config_json.is_file():
        c = json.loads(config_json.read_text())
        return Architecture(hidden=c["hidden_size"], layers=c["num_hidden_layers"],
                            heads=c["num_attention_heads"],
                            kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
                            intermediate=c["intermediate_size"], vocab=c["vocab_size"],
                            tied_embeddings=bool(c.get("tie_word_embeddings", False)),
                            qkv_bias=c.get("model_type") == "qwen2")
    raise PlanError(f"model.name_or_path={name!r}: no architecture known for it (a local "
                    f"directory with config.json, or one of {', '.join(KNOWN_ARCHITECTURES)})")


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU with `gpus` trainer ranks, and the peak against the GPU's memory."""

    gpus: int
    parameters: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    rollout: float
    gpu_bytes: float

    @property
    def training_phase(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def rollout_phase(self) -> float:
        return self.weights + self.optimizer + self.rollout

    @property
    def peak(self) -> float:
        return max(self.training_phase, self.rollout_phase) + _CUDA_CONTEXT_GIB * GIB

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_bytes


def plan_memory(cfg: ExperimentConfig, gpus: int | None = None) -> MemoryPlan:
    """The plan with `gpus` trainer ranks (default: the config's cluster)."""
    arch = architecture_of(cfg)
    n = gpus if gpus is not None else max(cfg.cluster.world_size, 1)
    params = arch.parameters()
    dtype_bytes = _DTYPE_BYTES[cfg.model.dtype]
    zero3 = cfg.cluster.trainer_strategy == "deepspeed_zero3"
    weight_shards = n if zero3 else 1
    weights = params * dtype_bytes / weight_shards
    gradients = params * dtype_bytes / weight_shards
    if zero3:
        optimizer = params * (4 + 2 * 4) / n  # fp32 master + one AdamW's two fp32 moments
    else:
        optimizer = params * 2 * 2 * 4 / n  # RL and SFT AdamW, two fp32 moments each
    micro = max(cfg.rl.micro_batch_size, cfg.sft.micro_batch_size)
    new_tokens = max(cfg.rollout.max_new_tokens, cfg.sft.max_target_tokens)
    tokens = micro * (cfg.data.max_prompt_tokens + new_tokens)
    layer_working_set = 34 * tokens * arch.hidden * 2
    if cfg.model.gradient_checkpointing:
        layer_inputs = arch.layers * tokens * arch.hidden * 2
        activations = layer_inputs + layer_working_set
    else:
        activations = arch.layers * layer_working_set
    activations += micro * new_tokens * arch.vocab * 4 * 2
    gpu_bytes = cfg.cluster.gpu_memory_gib * GIB
    rollout = cfg.rollout.gpu_memory_utilization * gpu_bytes if cfg.rollout.engine == "vllm" else 0.0
    return MemoryPlan(gpus=n, parameters=params, weights=weights, gradients=gradients,
                      optimizer=optimizer, activations=activations, rollout=rollout,
                      gpu_bytes=gpu_bytes)


def minimum_gpus(cfg: ExperimentConfig) -> int | None:
    """The fewest GPUs (1, 2, 4, 8, ...) on which the plan fits; None if none up to 128 does."""
    for n in _GPU_COUNTS:
        if plan_memory(cfg, n).fits:
            return n
    return None


def render_plan(cfg: ExperimentConfig, preset: str) -> str:
    plan = plan_memory(cfg)
    smallest = minimum_gpus(cfg)
    c = cfg.cluster

    def gib(x: float) -> str:
        return f"{x / GIB:8.2f} GiB"

    micro = max(cfg.rl.micro_batch_size, cfg.sft.micro_batch_size)
    new_tokens = max(cfg.rollout.max_new_tokens, cfg.sft.max_target_tokens)
    share = cfg.rollout.gpu_memory_utilization if cfg.rollout.engine == "vllm" else 0
    checkpointing = "on" if cfg.model.gradient_checkpointing else "off"
    fewest = smallest if smallest is not None else "none up to 128 (shrink the micro-batch)"
    lines = [
        (f"plan for {preset}: {plan.parameters:,} parameters, {cfg.model.dtype}, "
         f"{c.trainer_strategy} over {plan.gpus} trainer rank(s) "
         f"({c.nodes} node(s) x {c.gpus_per_node} GPU(s) of {c.gpu_memory_gib:g} GiB)"),
        f"  weights      {gib(plan.weights)}",
        f"  gradients    {gib(plan.gradients)}",
        f"  optimizer    {gib(plan.optimizer)}",
        (f"  activations  {gib(plan.activations)}  (micro-batch {micro} x "
         f"{cfg.data.max_prompt_tokens}+{new_tokens} tokens, gradient checkpointing "
         f"{checkpointing})"),
        f"  vLLM share   {gib(plan.rollout)}  (rollout.gpu_memory_utilization {share})",
        (f"  training phase {gib(plan.training_phase)}; rollout phase "
         f"{gib(plan.rollout_phase)}; peak with {_CUDA_CONTEXT_GIB:g} GiB reserve "
         f"{gib(plan.peak)}"),
        f"  fits: {'yes' if plan.fits else 'NO'}; fewest GPUs it fits on: {fewest}",
    ]
    return "\n".join(lines)


def check_fits(cfg: ExperimentConfig) -> None:
    """Raises ConfigError, before anything is allocated, when a GPU run cannot fit."""
    if cfg.run.device != "cuda" and cfg.cluster.gpus_per_node == 0:
        return  # a CPU run: nothing to plan
    try:
        plan = plan_memory(cfg)
    except PlanError:
        return  # an unknown model is not refused for lack of a plan
    if not plan.fits:
        smallest = minimum_gpus(cfg)
        raise ConfigError(
            f"this config needs {plan.peak / GIB:.1f} GiB per GPU with {plan.gpus} trainer "
            f"rank(s), more than cluster.gpu_memory_gib={cfg.cluster.gpu_memory_gib:g}; "
            + (f"it fits on {smallest} GPUs (set cluster.nodes/cluster.gpus_per_node)"
               if smallest else "lower rl/sft.micro_batch_size or turn on "
               "model.gradient_checkpointing")
            + "; `relift plan` shows the figures")
