"""The `build_base_model` flow: the proof-world's starting policy, a tiny transformer pretrained on
part of the generated world, built once per (world, model, seed) and cached on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from relift_core.config import ExperimentConfig
from relift_core.proofworld.pretrain import base_model_key, pretrain_base_model
from tasks import progress as terminal
from tasks.tracking import mlflow_run


@task(name="pretrain-base-model", cache_policy=NO_CACHE, retries=1)
def pretrain(cfg: ExperimentConfig, out_dir: Path) -> dict[str, Any]:
    bar = terminal.callback("pretrain base model (steps)")
    return pretrain_base_model(
        cfg.data.world,
        cfg.model.tiny,
        out_dir,
        progress=None if bar is None else lambda done, total, _loss: bar(done, total),
    )


def _base_model_run_name() -> str:
    """`base-model-<key>`, as its MLflow run is named (not a random name)."""
    from prefect.runtime import flow_run

    try:
        cfg = ExperimentConfig.model_validate(flow_run.parameters["config"])
        return f"base-model-{base_model_key(cfg)}"
    except (KeyError, ValueError):  # a bad config fails in the flow itself, with its message
        return "base-model"


@flow(name="build_base_model", log_prints=True, flow_run_name=_base_model_run_name)
def build_base_model(config: dict[str, Any]) -> str:
    """The proof-world's base model, built once per (world, model, seed) and cached on disk."""
    cfg = ExperimentConfig.model_validate(config)
    key = base_model_key(cfg)
    out_dir = (Path(cfg.run.workdir) / "base_models" / key).resolve()
    logger = get_run_logger()
    if (out_dir / "config.json").exists():
        logger.info(f"base model cache hit: {out_dir}")
        terminal.say(f"base model: {out_dir} (built earlier)")
        return str(out_dir)
    with mlflow_run(
        cfg, kind="base_model", run_key=f"base-model:{out_dir}", run_name=f"base-model-{key}"
    ) as tracker:
        tracker.log_params(
            {
                k: v
                for k, v in cfg.flat_params().items()
                if k.startswith(("data.world.", "model.tiny."))
            }
        )
        stats = pretrain(cfg, out_dir)
        tracker.log_metrics({k: float(v) for k, v in stats.items() if isinstance(v, (int, float))})
    logger.info(f"pretrained base model in {stats['seconds']:.0f}s -> {out_dir}")
    terminal.say(f"base model: pretrained in {stats['seconds']:.0f} s -> {out_dir}")
    return str(out_dir)


def needs_base_model(cfg: ExperimentConfig) -> bool:
    """A tiny model on a world with a pretraining mix starts from that world's base model."""
    return (
        cfg.model.source == "tiny"
        and cfg.model.init_from is None
        and cfg.data.world is not None
        and cfg.data.world.pretrain_examples > 0
    )
