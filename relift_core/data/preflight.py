"""What a run will read, checked before any server starts: the training rows (every one validated,
as preparation will), the settings that only the data can refute, and the benchmarks.

`relift train` calls `preflight` before it starts a Prefect server, so a bad row, a missing
benchmark file or an unreachable buffer threshold is one line in seconds instead of after a
20-110 s server start; the `train` flow calls `settings_against_data` again on the prepared
data (a deployment's run has no CLI in front of it). Errors raise ConfigError (a setting the
data refutes), DataError (a row) or BenchmarkError; warnings are returned as lines to show.
"""

from __future__ import annotations

from pathlib import Path

from relift_core.config import ConfigError, ExperimentConfig
from relift_core.data.benchmarks import (
    _LOCAL_SUFFIXES,
    BenchmarkError,
    get_spec,
    resolve_benchmarks_dir,
)
from relift_core.data.examples import Example
from relift_core.data.prepared import load_training_source

# Held-out sets that data preparation writes beside the training set (not looked up).
PREPARED_SETS = {"world"}


def settings_against_data(cfg: ExperimentConfig, examples: list[Example], source: str) -> list[str]:
    """Refuses a setting the data makes degenerate (ConfigError, naming key, value and source);
    returns warnings for settings that run but waste work."""
    warnings = []
    questions = len({ex.uid for ex in examples})
    if cfg.rl.prompts_per_step > questions:
        warnings.append(
            f"rl.prompts_per_step={cfg.rl.prompts_per_step} is more than the {questions} "
            f"training questions of {source}: every step draws some questions twice"
        )
    if cfg.algorithm.name == "relift":
        # The buffer keeps one demonstration per waiting question (DemoBuffer.add_all), so it
        # can never hold more than the questions that have one.
        if cfg.algorithm.demonstrations == "teacher":
            holdable, which = questions, "training questions"
        else:
            holdable = len({ex.uid for ex in examples if ex.target})
            which = "training questions with a demonstration (a `target`)"
        threshold = cfg.algorithm.sft_buffer_threshold
        if threshold > holdable:
            raise ConfigError(
                f"algorithm.sft_buffer_threshold={threshold} but {source} has only {holdable} "
                f"{which}: the buffer holds one per question, so it would never fill and "
                "ReLIFT would never fine-tune"
            )
    return warnings


def check_benchmarks(cfg: ExperimentConfig) -> None:
    """Every eval.benchmarks entry exists: a known name whose file is in the benchmarks
    directory, or a path to a .parquet/.jsonl file. Raises BenchmarkError saying which."""
    for name in cfg.eval.benchmarks:
        if name in PREPARED_SETS and cfg.data.world is not None:
            continue
        if Path(name).suffix.lower() in _LOCAL_SUFFIXES:
            if not Path(name).is_file():
                raise BenchmarkError(f"eval.benchmarks: {name}: no such file")
            continue
        spec = get_spec(name)
        if spec.is_local:
            path = Path(spec.source)
            if not path.is_absolute():
                path = resolve_benchmarks_dir(cfg.eval.benchmarks_dir) / path
            if not path.is_file():
                raise BenchmarkError(f"benchmark {name!r}: {path} not found")


def preflight(cfg: ExperimentConfig, world_examples: list[Example] | None = None) -> list[str]:
    """Everything above, in the order a run would meet it; returns the warnings. With
    data.world, `world_examples` are its training rows."""
    check_benchmarks(cfg)
    if cfg.data.world is not None:
        if world_examples is None:
            raise ValueError("data.world: pass the world's training rows as world_examples")
        return settings_against_data(cfg, world_examples, "data.world")
    examples, source = load_training_source(cfg.data)  # as preparation will read them
    return settings_against_data(cfg, examples, source)
