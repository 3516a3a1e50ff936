"""`relift demo`: the proof-world comparison of RL, SFT and ReLIFT on a CPU, as Prefect flows.

    base model   <- pretrain a tiny transformer on part of the generated world (cached by config)
    levels       <- each held-out question's difficulty under the base model (n rollouts)
    runs         <- train rl, sft and relift from that base, same seed, same iteration budget
    comparison   <- held-out accuracy per family and per starting difficulty level,
                    demonstrations used, response length: a table and a figure, in MLflow
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.base_model import build_base_model
from flows.prepare_data import prepare_data
from flows.train import train
from relift_core import iteration as it
from relift_core.config import ExperimentConfig, load_config
from relift_core.data import load_examples
from relift_core.difficulty import LEVELS, DifficultyLedger
from relift_core.grader import BatchGrader
from relift_core.models import load_policy
from relift_core.runtime import build_engine, seed_everything
from tasks.tracking import close_run, open_run

DEMO_ALGORITHMS = ("rl", "sft", "relift")


@task(name="measure-difficulty", cache_policy=NO_CACHE)
def measure_levels(cfg: ExperimentConfig, model_dir: str, examples_path: str) -> dict[str, str]:
    """Each question's level under the model, from cfg.rollout.n samples (as training sees it)."""
    questions = load_examples(examples_path)
    seed_everything(cfg.run.seed)
    model, tokenizer = load_policy(cfg.model.model_copy(update={"init_from": model_dir}),
                                   device="cpu", seed=cfg.run.seed)
    engine = build_engine(cfg, model, tokenizer, "cpu")
    ledger = DifficultyLedger()
    with BatchGrader(workers=cfg.run.grader_workers, timeout_s=cfg.run.grader_timeout_s) as grader:
        rollouts = it.rollout(engine, tokenizer, questions, cfg, seed=cfg.run.seed)
        it.grade(rollouts, grader, require_think=cfg.algorithm.require_think)
        levels = it.classify(ledger, 0, rollouts)
    return {q.uid: lv.value for q, lv in zip(questions, levels, strict=True)}


def final_records(cfg: ExperimentConfig, run_name: str, step: int | None = None) -> pd.DataFrame:
    step = cfg.run.iterations if step is None else step
    path = (Path(cfg.run.workdir) / run_name / "eval" / f"step_{step:06d}"
            / "world.records.parquet")
    return pd.read_parquet(path, columns=["uid", "data_source", "accuracy", "lengths"])


def comparison_tables(records: dict[str, pd.DataFrame], levels: dict[str, str],
                      demos_used: dict[str, int]) -> dict[str, pd.DataFrame]:
    """Held-out accuracy per family and per starting level, one column per run."""
    by_family, by_level, summary = {}, {}, []
    for name, df in records.items():
        df = df.assign(family=df["data_source"].str.split("/").str[1],
                       level=df["uid"].map(levels))
        by_family[name] = df.groupby("family")["accuracy"].mean()
        by_level[name] = df.groupby("level")["accuracy"].mean().reindex([lv.value for lv in LEVELS])
        summary.append({"run": name, "accuracy": df["accuracy"].mean(),
                        "demos_used": demos_used.get(name, 0),
                        "response_length": df["lengths"].map(lambda x: sum(x) / max(len(x), 1)).mean()})
    level_counts = pd.Series(levels).value_counts().reindex([lv.value for lv in LEVELS]).fillna(0)
    by_level_df = pd.DataFrame(by_level)
    by_level_df.insert(0, "questions", level_counts.astype(int))
    return {"summary": pd.DataFrame(summary).set_index("run"),
            "by_family": pd.DataFrame(by_family), "by_level": by_level_df}


def plot(tables: dict[str, pd.DataFrame], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    tables["by_family"].plot.bar(ax=axes[0], rot=0, title="held-out accuracy per family")
    tables["by_level"].drop(columns="questions").plot.bar(
        ax=axes[1], rot=0, title="accuracy per starting difficulty level")
    tables["summary"][["demos_used"]].plot.bar(ax=axes[2], rot=0, legend=False,
                                               title="demonstrations used")
    for ax in axes[:2]:
        ax.set_ylim(0, 1)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@flow(name="demo", log_prints=True)
def demo(preset: str = "toy", overrides: list[str] | None = None,
         algorithms: list[str] | None = None, name: str = "demo") -> dict[str, Any]:
    algorithms = list(algorithms or DEMO_ALGORITHMS)
    cfg = load_config(preset, overrides or [])
    logger = get_run_logger()
    base_dir = build_base_model(cfg.model_dump(mode="json"))
    data = prepare_data(cfg.model_dump(mode="json"))
    base_overrides = list(overrides or []) + [f"model.init_from={base_dir}"]
    base_cfg = load_config(preset, base_overrides)
    levels = measure_levels(base_cfg, base_dir, data.eval_paths["world"])
    train_levels = measure_levels(base_cfg, base_dir, data.train_path)

    parent = open_run(cfg, run_key=f"demo:{Path(cfg.run.workdir).resolve()}:{name}",
                      run_name=name, tags={"relift.kind": "demo"})
    counts = pd.Series(train_levels).value_counts().to_dict()
    parent.log_metrics({f"base/train_frac_{lv.value}": counts.get(lv.value, 0) / len(train_levels)
                        for lv in LEVELS})
    results, records = {}, {}
    try:
        # The base model itself, evaluated exactly as the trained runs are (same eval settings,
        # same code path: a `train` run of 0 iterations): the reference every method moves from.
        results["base"] = train.with_options(flow_run_name=f"{name}-base")(
            preset=preset, parent_mlflow_run_id=parent.run_id,
            overrides=base_overrides + ["algorithm.name=rl", "run.iterations=0",
                                        f"run.name={name}-base"])
        records["base"] = final_records(base_cfg, f"{name}-base", step=0)
        for algo in algorithms:
            run_name = f"{name}-{algo}"
            results[algo] = train.with_options(flow_run_name=run_name)(
                preset=preset, parent_mlflow_run_id=parent.run_id,
                overrides=base_overrides + [f"algorithm.name={algo}", f"run.name={run_name}"])
            records[algo] = final_records(base_cfg, run_name)
        tables = comparison_tables(records, levels, {a: r["demos_used"] for a, r in results.items()})
        out_dir = Path(cfg.run.workdir) / name
        figure = plot(tables, out_dir / "comparison.png")
        text = render_markdown(tables, counts)
        (out_dir / "comparison.md").write_text(text)
        parent.log_artifact(figure)
        parent.log_text(text, "comparison.md")
        for run, row in tables["summary"].iterrows():
            parent.log_metrics({f"{run}/heldout_accuracy": float(row["accuracy"]),
                                f"{run}/demos_used": float(row["demos_used"])})
        create_markdown_artifact(markdown=text, key="demo-comparison",
                                 description="RL vs SFT vs ReLIFT on the proof-world")
        close_run(parent)
    except BaseException:
        close_run(parent, "FAILED")
        raise
    logger.info("\n" + text)
    return {"tables": {k: v.to_dict() for k, v in tables.items()}, "markdown": text,
            "figure": str(figure), "mlflow_run_id": parent.run_id, "train_levels": counts,
            "runs": results}


def render_markdown(tables: dict[str, pd.DataFrame], train_level_counts: dict[str, int]) -> str:
    start = ", ".join(f"{lv.value} {train_level_counts.get(lv.value, 0)}" for lv in LEVELS)
    return "\n\n".join([
        f"Training questions by level under the base model: {start}",
        "**Held-out accuracy and demonstrations used**\n\n" + df_markdown(tables["summary"]),
        "**Held-out accuracy per family**\n\n" + df_markdown(tables["by_family"]),
        "**Held-out accuracy per starting difficulty level** (level under the base model)\n\n"
        + df_markdown(tables["by_level"]),
    ])


def df_markdown(df: pd.DataFrame) -> str:
    """A pipe table (pandas' to_markdown needs the optional `tabulate`)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if pd.isna(v) else f"{v:.3f}"
        return str(v)

    cols = [str(df.index.name or "")] + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    # itertuples keeps each column's own type (iterrows would turn integer counts into floats).
    for row in df.itertuples(name=None):
        lines.append("| " + " | ".join([str(row[0])] + [cell(v) for v in row[1:]]) + " |")
    return "\n".join(lines)
