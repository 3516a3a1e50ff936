"""The `prepare_data` flow: load and validate the training set, write it as prepared parquet with
a fingerprint. Cached by input hash: the same data config and source file again is a cache hit
(a `Cached` task state in the Prefect UI) and writes nothing.

Prompts over `data.max_prompt_tokens` (counted with the policy's tokenizer, chat template
included) are dropped here and counted (`PreparedData.dropped_over_long`, logged), so no
over-long prompt reaches a rollout. An empty or unreadable source, or one whose every row is
dropped, raises DataError naming the file; such errors (and a bad config) are not retried:
retrying cannot fix them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.exceptions import MissingContextError

from relift_core.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig
from relift_core.data.examples import (
    DataError,
    Example,
    OverLongPolicy,
    filter_long_prompts,
    fingerprint_examples,
    load_examples,
    prompt_token_counter,
    write_examples,
)
from relift_core.grading.extraction import is_choice_label, names_choice_source
from tasks.retry import retry_unless_permanent

# Bumped when preparation changes what it writes (2: over-long prompts dropped; 3: JSON
# results), so results
# cached by an older version are not reused.
PREPARE_VERSION = 3


@dataclass
class PreparedData:
    train_path: str
    train_fingerprint: str
    # Held-out sets made with the training data (the proof-world's eval split): name -> parquet.
    eval_paths: dict[str, str] = field(default_factory=dict)
    eval_fingerprints: dict[str, str] = field(default_factory=dict)
    # Training rows left out because their prompt is over data.max_prompt_tokens.
    dropped_over_long: int = 0

    def train_examples(self) -> list[Example]:
        return load_examples(self.train_path)

    def mlflow_datasets(self) -> dict[str, tuple[pd.DataFrame, str, str]]:
        out = {"train": (pd.read_parquet(self.train_path), self.train_path, self.train_fingerprint)}
        for name, path in self.eval_paths.items():
            out[name] = (pd.read_parquet(path), path, self.eval_fingerprints[name])
        return out


def source_identity(data: DataConfig) -> dict[str, Any]:
    """What the prepared data depends on: the data config, plus the source file's content
    (sha256). Not its mtime: golds edited with the mtime put back were a cache hit that
    trained on the old golds."""
    ident: dict[str, Any] = {"data": data.model_dump(mode="json")}
    if data.train_path:
        try:
            digest = hashlib.sha256()
            with open(data.train_path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as e:
            raise DataError(
                f"{data.train_path}: cannot read the training file: {e.strerror}"
            ) from e
        ident["file"] = [os.path.abspath(data.train_path), digest.hexdigest()]
    return ident


def tokenizer_identity(model: ModelConfig | None) -> dict[str, Any] | None:
    """What prompt token counts depend on: which tokenizer the policy uses."""
    if model is None:
        return None
    # The prompt format changes the rendered prompt's length (only named when set, so the
    # keys of data prepared before it existed still match).
    prompt_format = {
        k: v
        for k, v in (
            ("chat_template", model.chat_template),
            ("system_prompt", model.system_prompt),
            ("prefill", model.prefill or None),
        )
        if v is not None
    }
    if model.source == "tiny":
        # always the character tokenizer, whatever init_from holds
        return {"source": "tiny", **prompt_format}
    return {
        "source": model.source,
        "name_or_path": model.name_or_path,
        "gguf_path": model.gguf_path,
        "init_from": model.init_from,
        **prompt_format,
    }


def data_key(data: DataConfig, seed: int, model: ModelConfig | None = None) -> str:
    blob = json.dumps(
        {
            **source_identity(data),
            "seed": seed,
            "version": PREPARE_VERSION,
            "tokenizer": tokenizer_identity(model),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_tokenizer(model: ModelConfig) -> Any:
    """The policy's tokenizer without its weights (the one
    `relift_core.runtime.models.load_policy` uses)."""
    from relift_core.runtime.models import apply_prompt_format

    tokenizer = _load_raw_tokenizer(model)
    apply_prompt_format(tokenizer, model)
    return tokenizer


def _load_raw_tokenizer(model: ModelConfig) -> Any:
    if model.source == "tiny":
        from relift_core.runtime.char_tokenizer import build_char_tokenizer

        return build_char_tokenizer()
    from transformers import AutoTokenizer

    if model.source == "hf":
        name = model.name_or_path or model.init_from
        if not name:
            raise ConfigError("model.source=hf needs model.name_or_path (a hub id or a local dir)")
        return AutoTokenizer.from_pretrained(name)
    if model.init_from:
        return AutoTokenizer.from_pretrained(model.init_from)
    from relift_core.runtime.models import convert_gguf, smollm2_gguf_path

    gguf = Path(model.gguf_path) if model.gguf_path else smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(
        convert_gguf(gguf, Path(model.cache_dir) if model.cache_dir else None)
    )


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # outside a flow or task run (tests, scripts)
        return logging.getLogger(__name__)


def warn_numeric_golds_under_choice_sources(examples: list[Example], source: str) -> int:
    """One warning for rows whose data_source names a multiple-choice set (gpqa*, ...) but whose
    gold is no choice letter: they are graded as maths (`answer_type_for`), not silently as
    letters that could never match. Returns how many there are."""
    rows = [
        (i, ex)
        for i, ex in enumerate(examples)
        if names_choice_source(ex.data_source) and not is_choice_label(ex.ground_truth)
    ]
    if rows:
        row, ex = rows[0]
        _logger().warning(
            f"{source}: {len(rows)} rows have a multiple-choice data_source but a gold that is no "
            f"choice letter (first: row {row}, data_source {ex.data_source!r}, gold "
            f"{ex.ground_truth[:40]!r}); they are graded as maths answers"
        )
    return len(rows)


def prepare_examples(
    data: DataConfig,
    out: Path,
    model: ModelConfig | None = None,
    over_long: OverLongPolicy = "drop",
) -> PreparedData:
    """Load, validate, filter and write the training set of `data` into `out`.

    `model` picks the tokenizer prompts are counted with (None: the tiny model's character
    tokenizer). `over_long` is what happens to prompts over data.max_prompt_tokens: "drop" them
    (counted in the result and logged) or "error" (DataError naming the file and row)."""
    out.mkdir(parents=True, exist_ok=True)
    if data.world is not None:
        from relift_core.proofworld.problems import write_world

        paths = write_world(data.world, out)
        source = str(paths["train"])
        train = load_examples(paths["train"])
        evals = {"world": str(paths["eval"])}
    else:
        source = data.train_path or data.hf_dataset
        if source is None:
            raise ConfigError("data: set one of data.train_path, data.hf_dataset or data.world")
        train = load_examples(
            source, split=data.hf_split, field_map=data.field_map or None, limit=data.limit
        )
        evals = {}
    if data.limit and len(train) > data.limit:
        train = train[: data.limit]
    warn_numeric_golds_under_choice_sources(train, source)
    counter = prompt_token_counter(load_tokenizer(model or ModelConfig()))
    total = len(train)
    train, dropped = filter_long_prompts(
        train,
        count_tokens=counter,
        max_tokens=data.max_prompt_tokens,
        origin=source,
        policy=over_long,
    )
    if dropped:
        shown = ", ".join(f"row {d.row} ({d.uid})" for d in dropped[:5])
        more = f" and {len(dropped) - 5} more" if len(dropped) > 5 else ""
        _logger().warning(
            f"{source}: dropped {len(dropped)} of {total} rows whose prompt is over "
            f"data.max_prompt_tokens={data.max_prompt_tokens} tokens: {shown}{more}"
        )
    train_path = out / "prepared_train.parquet"
    write_examples(train, train_path)
    return PreparedData(
        train_path=str(train_path),
        train_fingerprint=fingerprint_examples(train),
        eval_paths=evals,
        eval_fingerprints={
            k: fingerprint_examples(load_examples(v, allow_empty=True)) for k, v in evals.items()
        },
        dropped_over_long=len(dropped),
    )


def _cache_key(context, parameters) -> str:
    # Also the result's file name in Prefect's storage: the output directory enters as a hash.
    out_dir = hashlib.sha256(parameters["out_dir"].encode()).hexdigest()[:12]
    return f"prepare-{parameters['key']}-{out_dir}"


# The cached result is JSON (paths, fingerprints, counts), never a pickle: a cache hit reads
# data, it does not unpickle code from the results directory.
@task(
    name="prepare-training-set",
    cache_key_fn=_cache_key,
    persist_result=True,
    result_serializer="json",
    cache_expiration=timedelta(days=30),
    retries=1,
    retry_condition_fn=retry_unless_permanent,
)
def prepare_training_set(
    data_json: dict[str, Any],
    seed: int,
    key: str,
    out_dir: str,
    model_json: dict[str, Any] | None = None,
) -> dict[str, Any]:
    data = DataConfig.model_validate(data_json)
    model = ModelConfig.model_validate(model_json) if model_json is not None else None
    return asdict(prepare_examples(data, Path(out_dir), model, over_long=data.over_long_prompts))


@flow(name="prepare_data", log_prints=True)
def prepare_data(config: dict[str, Any]) -> PreparedData:
    """Validates and writes the training data of `config` (an ExperimentConfig as a dict)."""
    cfg = ExperimentConfig.model_validate(config)
    key = data_key(cfg.data, cfg.run.seed, cfg.model)  # raises DataError before any retried task
    out_dir = str((Path(cfg.run.workdir) / "data" / key).resolve())
    args = (
        cfg.data.model_dump(mode="json"),
        cfg.run.seed,
        key,
        out_dir,
        cfg.model.model_dump(mode="json"),
    )
    prepared = PreparedData(**prepare_training_set(*args))
    if not Path(prepared.train_path).exists():
        # A cache hit whose files were deleted: prepare again.
        prepared = PreparedData(**prepare_training_set.with_options(refresh_cache=True)(*args))
    dropped = prepared.dropped_over_long
    get_run_logger().info(
        f"training set {prepared.train_path} (fingerprint "
        f"{prepared.train_fingerprint}; {dropped} over-long prompts dropped)"
    )
    return prepared
