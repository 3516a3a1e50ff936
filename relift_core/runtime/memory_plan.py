"""Per-GPU memory of a run, from its config alone: what `relift plan` prints and what `train`
checks before it allocates anything.

Every figure is a closed-form count of what the engines hold (bytes per parameter times
parameters, bytes per activation times activations), so each line can be checked by hand and
`tests/test_plan.py` checks the sharded ones against real FSDP2 and ZeRO-3 ranks. P parameters,
n trainer ranks (1 without Ray), c bytes of the compute dtype (model.dtype):

    parameters  from the architecture: embeddings, per layer q/k/v/o (+ q/k/v biases for Qwen2),
                gate/up/down MLP, two RMSNorms; a final norm; an untied lm_head if any.
    weights     what a rank holds between steps. fsdp2 (and one process): float32 masters,
                4P/n. deepspeed_zero3: its compute-dtype partitions, cP/n (the masters are
                counted with its optimizer).
    gradients   float32 (FSDP2's reduce dtype; ZeRO-3's fp32 gradient partition): 4P/n.
    optimizer   two AdamW optimizers (RL and SFT keep their own moments, see trainer.py):
                2 x 2 moments x 4 bytes, 16P/n; ZeRO-3 adds its float32 master partitions, 4P/n.
    compute     parameters unsharded for compute: FSDP2 all-gathers a layer at a time (two with
                prefetch) plus the root unit (embeddings, final norm, head) in the compute dtype;
                one process under autocast caches a compute-dtype copy of every weight, cP.
                ZeRO-3 keeps up to stage3_max_live_parameters (1e9) gathered, and a reduce
                bucket of reduce_bucket_size (5e8) float32 elements; both capped at P.
    activations one micro-batch: micro_batch_size x (max_prompt_tokens + max_new_tokens)
                tokens, or the token budget (max_tokens_per_micro_batch, with remove_padding):
                with gradient checkpointing the layer inputs (layers x tokens x hidden x c bytes)
                plus one layer's working set recomputed in backward; without it every layer's.
                A layer's working set is 34 x tokens x hidden bytes at 16-bit activations
                (Korthikanti et al. 2022, table 2: already bytes, with a fused attention that
                never holds the s x s scores), twice that at float32. The scoring of the target
                tokens holds, per logit: the logits (c bytes), their float32 upcast, log_softmax,
                exp and their product in the entropy (4 bytes each), and in backward the
                gradients of the float32 logits and of log_softmax (4 each): 24 + c bytes in all
                (24 at float32, where the upcast is a no-op; scripts/bench_token_budget.py
                measures it), x vocab x the target tokens scored at
                once: micro x new tokens, or at most model.logit_chunk_tokens.
    rollout     the HF engine decodes from an unsharded copy in the compute dtype on each rank's
                device, cP, all the time. vLLM preallocates rollout.gpu_memory_utilization of the
                GPU (weights + KV cache) and sleeps while the trainer steps (level 2: weights
                and cache freed; its staging copy lives on the CPU), so the peak is the larger of
                    rollout phase:  weights + optimizer + the rollout figure
                    training phase: weights + gradients + optimizer + compute + activations
                                    (+ the HF engine's copy)
                and, for ZeRO-3, the moment deepspeed.initialize holds the whole module in the
                compute dtype before partitioning it (cP + the float32 partitions, 4P/n).
    reference   with algorithm.kl_coef > 0, the frozen starting policy, whole and float32: 4P,
                resident in every phase (counted with the rollout copy).

`relift_core` code, no torch: plans are made before anything is imported onto a GPU."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relift_core.config import ConfigError, ExperimentConfig
from relift_core.errors import UserError

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

    def layer_parameters(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        attention = h * h + 2 * h * kv + h * h + ((h + 2 * kv) if self.qkv_bias else 0)
        mlp = 3 * h * self.intermediate
        return attention + mlp + 2 * h

    def parameters(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return embeddings + self.layers * self.layer_parameters() + self.hidden


# The presets' models, from their config.json on the hub (no download when planning).
# Columns: hidden, layers, heads, kv_heads, intermediate, vocab (Architecture's field order).
QWEN25_MATH_1_5B = Architecture(1536, 28, 12, 2, 8960, 151936, tied_embeddings=True)
QWEN25_MATH_7B = Architecture(3584, 28, 28, 4, 18944, 152064, tied_embeddings=False)
SMOLLM2_135M = Architecture(576, 30, 9, 3, 1536, 49152, tied_embeddings=True, qkv_bias=False)
KNOWN_ARCHITECTURES = {
    "Qwen/Qwen2.5-Math-1.5B": QWEN25_MATH_1_5B,
    "Qwen/Qwen2.5-Math-7B": QWEN25_MATH_7B,
    # The reference's starting points: the same networks with rope_theta 40k and a 16k context.
    "RoadQAQ/Qwen2.5-Math-1.5B-16k-think": QWEN25_MATH_1_5B,
    "RoadQAQ/Qwen2.5-Math-7B-16k-think": QWEN25_MATH_7B,
    # SmolLM2-135M-Instruct (Llama): the GGUF the smollm2-135m preset converts.
    "HuggingFaceTB/SmolLM2-135M-Instruct": SMOLLM2_135M,
}


class PlanError(UserError, ValueError):
    """The model's architecture is unknown to the planner."""

    exit_code = 2


def _from_hf_config(c: dict[str, Any], qkv_bias: bool) -> Architecture:
    """The architecture a transformers config (config.json's keys) describes."""
    return Architecture(
        hidden=c["hidden_size"],
        layers=c["num_hidden_layers"],
        heads=c["num_attention_heads"],
        kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
        intermediate=c["intermediate_size"],
        vocab=c["vocab_size"],
        tied_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
    )


def architecture_of(cfg: ExperimentConfig) -> Architecture:
    m = cfg.model
    if m.source == "tiny":
        from relift_core.runtime.char_tokenizer import VOCAB_SIZE

        t = m.tiny
        return _from_hf_config(t.hf_config(VOCAB_SIZE), qkv_bias=t.architecture == "qwen2")
    if m.source == "gguf":
        return SMOLLM2_135M
    name = m.name_or_path or ""
    if name in KNOWN_ARCHITECTURES:
        return KNOWN_ARCHITECTURES[name]
    config_json = Path(name) / "config.json"
    if config_json.is_file():
        c = json.loads(config_json.read_text())
        return _from_hf_config(c, qkv_bias=c.get("model_type") == "qwen2")
    raise PlanError(
        f"model.name_or_path={name!r}: no architecture known for it (a local "
        f"directory with config.json, or one of {', '.join(KNOWN_ARCHITECTURES)})"
    )


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU with `gpus` trainer ranks, and the peak against the GPU's memory."""

    gpus: int
    parameters: int
    weights: float
    gradients: float
    optimizer: float
    compute: float
    activations: float
    rollout: float
    resident_rollout: float  # the HF engine's copy: on the device in every phase
    initialization: float
    gpu_bytes: float

    @property
    def training_phase(self) -> float:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.compute
            + self.activations
            + self.resident_rollout
        )

    @property
    def rollout_phase(self) -> float:
        return self.weights + self.optimizer + self.rollout + self.resident_rollout

    @property
    def peak(self) -> float:
        phases = (self.training_phase, self.rollout_phase, self.initialization)
        return max(phases) + _CUDA_CONTEXT_GIB * GIB

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_bytes


# DeepSpeed's defaults for the buckets our config leaves as they are (deepspeed_trainer.py).
_ZERO3_MAX_LIVE_PARAMETERS = 1_000_000_000
_ZERO3_REDUCE_BUCKET = 500_000_000


def logit_bytes(dtype: str) -> int:
    """Bytes held per logit element while the target tokens are scored (module docstring)."""
    return 24 + (_DTYPE_BYTES[dtype] if dtype != "float32" else 0)


def activation_bytes(
    arch: Architecture, tokens: int, logit_tokens: int, dtype: str, gradient_checkpointing: bool
) -> float:
    """One micro-batch's activations (module docstring): `tokens` through the layers,
    `logit_tokens` target tokens' logits alive at once."""
    c = _DTYPE_BYTES[dtype]
    layer_working_set = 34 * tokens * arch.hidden * max(c, 2) // 2
    if gradient_checkpointing:
        activations = arch.layers * tokens * arch.hidden * c + layer_working_set
    else:
        activations = arch.layers * layer_working_set
    return activations + logit_tokens * arch.vocab * logit_bytes(dtype)


def _micro_batch_tokens(cfg: ExperimentConfig) -> tuple[int, int]:
    """(tokens one forward holds, target tokens whose logits are alive at once). A token
    budget (rl/sft.max_tokens_per_micro_batch, with model.remove_padding) bounds the first;
    model.logit_chunk_tokens bounds the second."""
    new_tokens = max(cfg.rollout.max_new_tokens, cfg.sft.max_target_tokens)
    row = cfg.data.max_prompt_tokens + new_tokens
    per_kind = []
    for section in (cfg.rl, cfg.sft):
        budget = section.max_tokens_per_micro_batch
        if budget is not None:
            # One row longer than the budget still runs alone.
            per_kind.append((max(budget, row), max(min(budget, row), new_tokens)))
        else:
            per_kind.append((section.micro_batch_size * row, section.micro_batch_size * new_tokens))
    tokens = max(t for t, _ in per_kind)
    logit_tokens = max(n for _, n in per_kind)
    if cfg.model.logit_chunk_tokens is not None:
        logit_tokens = min(logit_tokens, cfg.model.logit_chunk_tokens)
    return tokens, logit_tokens


def _training_state_bytes(
    cfg: ExperimentConfig, arch: Architecture, n: int, sharded: bool
) -> dict[str, float]:
    """Per-rank bytes of the training state over `n` ranks, by trainer strategy (module
    docstring): float32 weights, gradients and AdamW moments, the layers gathered for compute,
    and what engine initialisation holds at once."""
    params = arch.parameters()
    c = _DTYPE_BYTES[cfg.model.dtype]
    state = {"gradients": params * 4 / n, "optimizer": params * 2 * 2 * 4 / n}
    if sharded and cfg.cluster.trainer_strategy == "deepspeed_zero3":
        return state | {
            "weights": params * c / n,
            "optimizer": state["optimizer"] + params * 4 / n,
            "compute": min(_ZERO3_MAX_LIVE_PARAMETERS, params) * c
            + min(_ZERO3_REDUCE_BUCKET, params) * 4,
            "initialization": params * c + params * 4 / n,
        }
    compute: float
    if sharded:
        layer = arch.layer_parameters()
        compute = (2 * layer + params - arch.layers * layer) * c
    else:
        compute = params * c if cfg.model.dtype != "float32" else 0.0
    return state | {"weights": params * 4 / n, "compute": compute, "initialization": 0.0}


def _rollout_bytes(cfg: ExperimentConfig, params: int, gpu_bytes: float) -> dict[str, float]:
    """What the rollout engine holds: vLLM its share of the GPU (in the rollout phase only,
    asleep while the trainer steps); the HF engine a copy of the weights in the compute dtype,
    resident in every phase, as is KL's frozen float32 reference policy (trainer.py)."""
    vllm = cfg.rollout.engine == "vllm"
    resident = 0.0 if vllm else params * _DTYPE_BYTES[cfg.model.dtype]
    if cfg.algorithm.kl_coef > 0:
        resident += params * 4
    return {
        "rollout": cfg.rollout.gpu_memory_utilization * gpu_bytes if vllm else 0.0,
        "resident_rollout": resident,
    }


def plan_memory(cfg: ExperimentConfig, gpus: int | None = None) -> MemoryPlan:
    """The plan with `gpus` trainer ranks (default: the config's cluster)."""
    arch = architecture_of(cfg)
    ray = cfg.cluster.backend == "ray"
    n = gpus if gpus is not None else (cfg.cluster.world_size if ray else 1)
    params = arch.parameters()
    tokens, logit_tokens = _micro_batch_tokens(cfg)
    activations = activation_bytes(
        arch, tokens, logit_tokens, cfg.model.dtype, cfg.model.gradient_checkpointing
    )
    gpu_bytes = cfg.cluster.gpu_memory_gib * GIB
    return MemoryPlan(
        gpus=n,
        parameters=params,
        activations=activations,
        gpu_bytes=gpu_bytes,
        **_training_state_bytes(cfg, arch, n, sharded=ray or gpus is not None),
        **_rollout_bytes(cfg, params, gpu_bytes),
    )


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

    tokens, logit_tokens = _micro_batch_tokens(cfg)
    budgets = {cfg.rl.max_tokens_per_micro_batch, cfg.sft.max_tokens_per_micro_batch} - {None}
    micro = max(cfg.rl.micro_batch_size, cfg.sft.micro_batch_size)
    new_tokens = max(cfg.rollout.max_new_tokens, cfg.sft.max_target_tokens)
    shape = (
        f"{tokens:,} tokens per micro-batch (token budget)"
        if budgets
        else f"micro-batch {micro} x {cfg.data.max_prompt_tokens}+{new_tokens} tokens"
    )
    chunked = cfg.model.logit_chunk_tokens is not None
    logits = f", logits of {logit_tokens:,} tokens at a time" if chunked else ""
    share = cfg.rollout.gpu_memory_utilization if cfg.rollout.engine == "vllm" else 0
    checkpointing = "on" if cfg.model.gradient_checkpointing else "off"
    fewest = smallest if smallest is not None else "none up to 128 (shrink the micro-batch)"
    zero3 = c.trainer_strategy == "deepspeed_zero3" and c.backend == "ray"
    weights_note = (
        f"{cfg.model.dtype} partitions"
        if zero3
        else "float32 masters" + (" sharded" if c.backend == "ray" else "")
    )
    optimizer_note = (
        "float32 master partitions + RL and SFT AdamW moments"
        if zero3
        else "RL and SFT AdamW moments, float32"
    )
    compute_note = (
        "live parameters + reduce bucket"
        if zero3
        else f"{cfg.model.dtype} layers gathered for compute"
        if c.backend == "ray"
        else f"autocast's {cfg.model.dtype} weight copies"
    )
    lines = [
        (
            f"plan for {preset}: {plan.parameters:,} parameters, {cfg.model.dtype}, "
            f"{c.trainer_strategy} over {plan.gpus} trainer rank(s) "
            f"({c.nodes} node(s) x {c.gpus_per_node} GPU(s) of {c.gpu_memory_gib:g} GiB)"
        ),
        f"  weights      {gib(plan.weights)}  ({weights_note})",
        f"  gradients    {gib(plan.gradients)}  (float32 shards)",
        f"  optimizer    {gib(plan.optimizer)}  ({optimizer_note})",
        f"  compute      {gib(plan.compute)}  ({compute_note})",
        (
            f"  activations  {gib(plan.activations)}  ({shape}{logits}, gradient "
            f"checkpointing {checkpointing})"
        ),
        (
            f"  rollout      {gib(plan.rollout + plan.resident_rollout)}  "
            + (
                f"(vLLM: rollout.gpu_memory_utilization {share})"
                if share
                else f"(HF engine: an unsharded {cfg.model.dtype} copy)"
            )
        ),
        (
            f"  training phase {gib(plan.training_phase)}; rollout phase "
            f"{gib(plan.rollout_phase)}"
            + (f"; initialization {gib(plan.initialization)}" if plan.initialization else "")
            + f"; peak with {_CUDA_CONTEXT_GIB:g} GiB reserve {gib(plan.peak)}"
        ),
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
            + (
                f"it fits on {smallest} GPUs (set cluster.nodes/cluster.gpus_per_node)"
                if smallest
                else "lower rl/sft.micro_batch_size or turn on model.gradient_checkpointing"
            )
            + "; `relift plan` shows the figures"
        )
