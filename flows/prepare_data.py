"""The `prepare_data` flow: load and validate the training set, write it as prepared parquet with
a fingerprint. Cached by input hash: the same data config and source file again is a cache hit
(a `Cached` task state in the Prefect UI) and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task

from relift_core.config import DataConfig, ExperimentConfig
from relift_core.data import Example, fingerprint_examples, load_examples, write_examples


@dataclass
class PreparedData:
    train_path: str
    train_fingerprint: str
    # Held-out sets made with the training data (the proof-world's eval split): name -> parquet.
    eval_paths: dict[str, str] = field(default_factory=dict)
    eval_fingerprints: dict[str, str] = field(default_factory=dict)

    def train_examples(self) -> list[Example]:
        return load_examples(self.train_path)

    def mlflow_datasets(self) -> dict[str, tuple[pd.DataFrame, str, str]]:
        out = {"train": (pd.read_parquet(self.train_path), self.train_path, self.train_fingerprint)}
        for name, path in self.eval_paths.items():
            out[name] = (pd.read_parquet(path), path, self.eval_fingerprints[name])
        return out


def source_identity(data: DataConfig) -> dict[str, Any]:
    """What the prepared data depends on: the data config, plus the source file's size and mtime."""
    ident: dict[str, Any] = {"data": data.model_dump(mode="json")}
    if data.train_path:
        st = os.stat(data.train_path)
        ident["file"] = [os.path.abspath(data.train_path), st.st_size, st.st_mtime_ns]
    return ident


def data_key(data: DataConfig, seed: int) -> str:
    blob = json.dumps({**source_identity(data), "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_key(context, parameters) -> str:
    return f"prepare-{parameters['key']}-{parameters['out_dir']}"


@task(name="prepare-training-set", cache_key_fn=_cache_key, persist_result=True,
      cache_expiration=timedelta(days=30), retries=1)
def prepare_training_set(data_json: dict[str, Any], seed: int, key: str, out_dir: str) -> PreparedData:
    data = DataConfig.model_validate(data_json)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if data.world is not None:
        from relift_core.world import write_world

        paths = write_world(data.world, out)
        train = load_examples(paths["train"])
        evals = {"world": str(paths["eval"])}
    else:
        source = data.train_path or data.hf_dataset
        if source is None:
            raise ValueError("data: set one of data.train_path, data.hf_dataset or data.world")
        train = load_examples(source, split=data.hf_split, field_map=data.field_map or None,
                              limit=data.limit)
        evals = {}
    if data.limit and len(train) > data.limit:
        train = train[: data.limit]
    train_path = out / "prepared_train.parquet"
    write_examples(train, train_path)
    return PreparedData(
        train_path=str(train_path),
        train_fingerprint=fingerprint_examples(train),
        eval_paths=evals,
        eval_fingerprints={k: fingerprint_examples(load_examples(v)) for k, v in evals.items()},
    )


@flow(name="prepare_data", log_prints=True)
def prepare_data(config: dict[str, Any]) -> PreparedData:
    """Validates and writes the training data of `config` (an ExperimentConfig as a dict)."""
    cfg = ExperimentConfig.model_validate(config)
    key = data_key(cfg.data, cfg.run.seed)
    out_dir = str((Path(cfg.run.workdir) / "data" / key).resolve())
    prepared = prepare_training_set(cfg.data.model_dump(mode="json"), cfg.run.seed, key, out_dir)
    if not Path(prepared.train_path).exists():
        # A cache hit whose files were deleted: prepare again.
        prepared = prepare_training_set.with_options(refresh_cache=True)(
            cfg.data.model_dump(mode="json"), cfg.run.seed, key, out_dir)
    get_run_logger().info(f"training set {prepared.train_path} (fingerprint {prepared.train_fingerprint})")
    return prepared
