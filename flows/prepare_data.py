"""The `prepare_data` flow: load and validate the training set, write it as prepared parquet with
a fingerprint (relift_core.data.prepared). Cached by input hash: the same data config and source
file again is a cache hit (a `Cached` task state in the Prefect UI) and writes nothing.

Bad data (DataError naming the file) and a bad config are not retried: retrying cannot fix them.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.exceptions import MissingContextError

from relift_core.config import DataConfig, ExperimentConfig, ModelConfig
from relift_core.data.examples import OverLongPolicy, load_examples
from relift_core.data.prepared import PreparedData, data_key, load_training_source, write_prepared
from tasks.retry import retry_unless_permanent


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # outside a flow or task run (tests, scripts)
        return logging.getLogger(__name__)


def prepare_examples(
    data: DataConfig,
    out: Path,
    model: ModelConfig | None = None,
    over_long: OverLongPolicy = "drop",
) -> PreparedData:
    """Load, validate, filter and write the training set of `data` into `out`
    (`relift_core.data.prepared.write_prepared`), the proof-world's sets written first when
    `data.world` is set: only the layers above relift_core's data know the proof-world."""
    out.mkdir(parents=True, exist_ok=True)
    if data.world is not None:
        from relift_core.proofworld.problems import write_world

        paths = write_world(data.world, out)
        train, source = load_examples(paths["train"]), str(paths["train"])
        evals = {"world": str(paths["eval"])}
    else:
        (train, source), evals = load_training_source(data), {}
    return write_prepared(
        train, source, data, out, model=model, over_long=over_long, eval_paths=evals, log=_logger()
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
