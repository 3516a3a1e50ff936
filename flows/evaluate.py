"""The `evaluate` flow: a base model or a checkpoint on chosen benchmarks, logged to MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.prepare_data import prepare_data
from relift_core.config import load_config
from relift_core.grading.grader import BatchGrader
from relift_core.runtime.assembly import build_engine, seed_everything
from relift_core.runtime.models import export_dtype, load_policy, resolve_device
from tasks.eval_tasks import evaluate_all
from tasks.tracking import mlflow_run


@flow(name="evaluate", log_prints=True)
def evaluate(
    preset: str = "smollm2-135m",
    overrides: list[str] | None = None,
    checkpoint: str | None = None,
    benchmarks: list[str] | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Evaluate the preset's model (or `checkpoint`, a saved policy directory) on `benchmarks`.

    Args:
        preset: a config preset in configs/ (toy, smollm2-135m, qwen2.5-math-1.5b,
            qwen2.5-math-7b) or a YAML file; its model is evaluated.
        overrides: dotted `key=value` config overrides, e.g. `eval.samples=4`.
        checkpoint: a trained policy directory (runs/<name>/checkpoints/step_N/model) instead
            of the preset's model.
        benchmarks: aime24, aime25, amc23, math500, minerva, olympiadbench, gpqa_diamond, arc_c,
            mmlu_pro, or world
            (the preset's `eval.benchmarks` when empty).
        limit: questions per benchmark (a quick look; empty: all).
    """
    extra = list(overrides or [])
    if benchmarks:
        extra.append(f"eval.benchmarks=[{','.join(benchmarks)}]")
    if limit:
        extra.append(f"eval.limit={limit}")
    if checkpoint:
        extra.append(f"model.init_from={Path(checkpoint).resolve()}")
    cfg = load_config(preset, extra)
    logger = get_run_logger()
    seed_everything(cfg.run.seed)
    device = resolve_device(cfg.run.device)
    # Inference only: the weights in the compute dtype (no float32 masters needed).
    model, tokenizer = load_policy(
        cfg.model, device=str(device), seed=cfg.run.seed, dtype=export_dtype(cfg.model)
    )
    engine = build_engine(cfg, model, tokenizer, device)
    # The proof-world's held-out split is made with the data, not registered: prepare it.
    local_sets = {}
    if cfg.data.world is not None and "world" in cfg.eval.benchmarks:
        local_sets = prepare_data(cfg.model_dump(mode="json")).eval_paths
    label = f"eval-{Path(checkpoint).name if checkpoint else preset}"
    out_dir = Path(cfg.run.workdir) / "evaluations" / label
    with mlflow_run(
        cfg, kind="evaluate", run_key=f"evaluate:{label}:{cfg.fingerprint()}", run_name=label
    ) as tracker:
        tracker.log_params(
            {
                "preset": preset,
                "checkpoint": checkpoint or "",
                **{k: v for k, v in cfg.flat_params().items() if k.startswith(("eval.", "model."))},
            }
        )
        with BatchGrader(
            workers=cfg.run.grader_workers, timeout_s=cfg.run.grader_timeout_s
        ) as grader:
            summaries = evaluate_all(
                engine,
                tokenizer,
                grader,
                names=cfg.eval.benchmarks,
                eval_cfg=cfg.eval,
                out_dir=out_dir,
                tracker=tracker,
                step=0,
                local_sets=local_sets,
                require_think=cfg.algorithm.require_think,
                seed=cfg.run.seed,
                label=label,
            )
    logger.info(f"evaluation logged to MLflow run {tracker.run_id}")
    return {"mlflow_run_id": tracker.run_id, "summaries": summaries}
