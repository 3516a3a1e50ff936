"""Reads MLflow runs into tables and figures: RL vs SFT vs ReLIFT. Never trains."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

SUMMARY_METRICS = ("accuracy", "reward_mean", "frac_hardest", "demos_used", "response_length_mean")


def runs_table(tracking_uri: str, experiment: str = "relift", *,
               parent_run_id: str | None = None) -> pd.DataFrame:
    """One row per training run: algorithm, seed, status, final training and evaluation metrics."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return pd.DataFrame()
    filt = "tags.`relift.algorithm` != ''"
    if parent_run_id:
        filt += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    rows = []
    for run in client.search_runs([exp.experiment_id], filter_string=filt, max_results=1000,
                                  order_by=["attributes.start_time ASC"]):
        m, p = run.data.metrics, run.data.params
        row = {"run": run.info.run_name, "algorithm": run.data.tags.get("relift.algorithm"),
               "seed": p.get("run.seed"), "status": run.info.status,
               "iterations": p.get("run.iterations")}
        row.update({k: m.get(k) for k in SUMMARY_METRICS})
        row.update({k: v for k, v in m.items() if k.startswith("eval/") and k.endswith("avg_at_k")})
        rows.append(row)
    return pd.DataFrame(rows)


def metric_history(tracking_uri: str, run_id: str, key: str) -> pd.DataFrame:
    client = MlflowClient(tracking_uri=tracking_uri)
    hist = client.get_metric_history(run_id, key)
    return pd.DataFrame({"step": [h.step for h in hist], key: [h.value for h in hist]})


def plot_comparison(table: pd.DataFrame, out_path: Path, columns: list[str]) -> Path:
    """A grouped bar chart of `columns` per algorithm (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = table.groupby("algorithm")[columns].mean(numeric_only=True)
    ax = grouped.T.plot.bar(figsize=(max(6, 1.2 * len(columns)), 4), rot=30)
    ax.set_ylabel("value (mean over seeds)")
    ax.legend(title="algorithm")
    plt.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    plt.savefig(out_path, dpi=120)
    plt.close()
    return out_path
