"""Prepared training data: the training set validated, its over-long prompts dropped, written as
parquet with a fingerprint, and the identity (config, source content, tokenizer) it is cached by.

Prompts over `data.max_prompt_tokens` (counted with the policy's tokenizer, chat template
included) are dropped here and counted (`PreparedData.dropped_over_long`, logged), so no
over-long prompt reaches a rollout. An empty or unreadable source, or one whose every row is
dropped, raises DataError naming the file.

The `prepare_data` flow (flows/prepare_data.py) runs this as a cached Prefect task, and writes
the proof-world's sets first when the config asks for them (the proof-world is known only above
relift_core's method and data layers).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from relift_core.config import ConfigError, DataConfig, ModelConfig
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

# Bumped when preparation changes what it writes (2: over-long prompts dropped; 3: JSON
# results), so results cached by an older version are not reused.
PREPARE_VERSION = 3

Log = logging.Logger | logging.LoggerAdapter
_LOG = logging.getLogger(__name__)


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
    """The prepared data's cache key: its source, seed, tokenizer and PREPARE_VERSION."""
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


def load_training_source(data: DataConfig) -> tuple[list[Example], str]:
    """The training rows of a file or Hugging Face source (before the prompt-length filter), and
    the source errors and warnings name. Raises DataError naming the file and row of a bad one.
    The generated world's rows are the proof-world's to build (only it imports itself): the
    flow writes them, and `preflight` takes them from its caller."""
    source = data.train_path or data.hf_dataset
    if source is None:
        raise ConfigError("data: set one of data.train_path, data.hf_dataset or data.world")
    examples = load_examples(
        source, split=data.hf_split, field_map=data.field_map or None, limit=data.limit
    )
    return examples, source


def warn_numeric_golds_under_choice_sources(
    examples: list[Example], source: str, log: Log = _LOG
) -> int:
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
        log.warning(
            f"{source}: {len(rows)} rows have a multiple-choice data_source but a gold that is no "
            f"choice letter (first: row {row}, data_source {ex.data_source!r}, gold "
            f"{ex.ground_truth[:40]!r}); they are graded as maths answers"
        )
    return len(rows)


def write_prepared(
    train: list[Example],
    source: str,
    data: DataConfig,
    out: Path,
    *,
    model: ModelConfig | None = None,
    over_long: OverLongPolicy = "drop",
    eval_paths: dict[str, str] | None = None,
    log: Log = _LOG,
) -> PreparedData:
    """Validate and filter the training rows `train` (read from `source`) and write them into
    `out`, beside the held-out sets `eval_paths` already written there.

    `model` picks the tokenizer prompts are counted with (None: the tiny model's character
    tokenizer). `over_long` is what happens to prompts over data.max_prompt_tokens: "drop" them
    (counted in the result and logged) or "error" (DataError naming the file and row)."""
    # Deferred: torch and transformers load only when data is prepared, not on importing this.
    from relift_core.runtime.models import load_tokenizer

    evals = eval_paths or {}
    if data.limit and len(train) > data.limit:
        train = train[: data.limit]
    warn_numeric_golds_under_choice_sources(train, source, log)
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
        log.warning(
            f"{source}: dropped {len(dropped)} of {total} rows whose prompt is over "
            f"data.max_prompt_tokens={data.max_prompt_tokens} tokens: {shown}{more}"
        )
    out.mkdir(parents=True, exist_ok=True)
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
