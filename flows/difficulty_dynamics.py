"""The `difficulty_dynamics` flow (the paper's Section 3 analysis): classify every training
question with the base model and with a trained checkpoint, and tabulate how questions moved
between difficulty levels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from flows.base_model import build_base_model, needs_base_model
from flows.prepare_data import prepare_data
from relift_core.algorithm.difficulty import Level, transition_table
from relift_core.config import ExperimentConfig, load_config
from relift_core.grading.levels import policy_levels
from tasks import progress as terminal
from tasks.tracking import mlflow_run


@task(name="classify-all-questions", cache_policy=NO_CACHE, retries=1)
def classify_all(cfg: ExperimentConfig, questions, init_from: str | None) -> dict[str, Level]:
    return policy_levels(cfg, questions, init_from)


@flow(name="difficulty_dynamics", log_prints=True)
def difficulty_dynamics(
    preset: str = "toy",
    checkpoint: str = "",
    base: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """`checkpoint`: a trained policy directory; `base`: the starting policy (default: the
    preset's model). Returns the transition table as {level_before: {level_after: count}}."""
    cfg = load_config(preset, overrides or [])
    if base is None and needs_base_model(cfg):
        # The toy preset's runs start from the world's pretrained base model, not random weights.
        base = build_base_model(cfg.model_dump(mode="json"))
    data = prepare_data(cfg.model_dump(mode="json"))
    questions = data.train_examples()
    # The MLflow run spans the classification: a failed analysis shows FAILED there.
    run_name = f"dynamics-{Path(checkpoint).name}"
    with mlflow_run(
        cfg, kind="difficulty_dynamics", run_key=f"dynamics:{checkpoint}", run_name=run_name
    ) as tracker:
        before = classify_all(cfg, quote(questions), base)
        terminal.say(f"levels of {len(before)} training questions under the base policy")
        after = classify_all(cfg, quote(questions), str(Path(checkpoint).resolve()))
        terminal.say(f"levels under {checkpoint}")
        table = transition_table(before, after)
        tracker.log_text(table.to_csv(), "difficulty_transitions.csv")
        tracker.log_text(table.to_string(), "difficulty_transitions.txt")
    create_markdown_artifact(
        markdown="### Difficulty transitions (rows: base, columns: trained)\n\n"
        f"```\n{table.to_string()}\n```",
        key="difficulty-transitions",
    )
    return {"table": table.to_dict(), "mlflow_run_id": tracker.run_id}
