"""The comparison layer: MLflow runs into pandas tables, figures and one report. Never trains.

    table   = runs_table(uri, parent_run_id=...)         # one row per training run
    summary = summarize_by_algorithm(table, "world")     # mean and 95% t-interval over seeds
    report  = write_report(uri, out_dir, parent_run_id=...)  # report.md + figures

A run with 0 iterations is the starting model evaluated as is: its algorithm reads `base`.
Held-out columns are named by benchmark (`world`, `math500`) from the MLflow metrics
`heldout/<benchmark>/avg_at_k`; sub-groups of a mixed benchmark (`heldout/world/add/2/...`) are
`world:add/2`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient

from relift_core.algorithm.difficulty import LEVELS

TRAINING_CURVES = (
    "reward_mean",
    "rollout_accuracy",
    "response_length_mean",
    "rl/entropy",
    "demos_used",
)
LEVEL_SHARES = tuple(f"frac_{lv}" for lv in LEVELS)


def _eval_column(key: str) -> str | None:
    """`heldout/world/avg_at_k` -> `world`; `heldout/world/add/2/avg_at_k` -> `world:add/2`
    (the names tasks/eval_tasks.py logs)."""
    if not (key.startswith("heldout/") and key.endswith("/avg_at_k")):
        return None
    bench, *rest = key.split("/")[1:-1]
    return bench if not rest else f"{bench}:{'/'.join(rest)}"


def runs_table(
    tracking_uri: str, experiment: str = "relift", *, parent_run_id: str | None = None
) -> pd.DataFrame:
    """One row per training run: name, algorithm (`base` for 0 iterations), seed, status,
    demonstrations used, final rollout accuracy and every held-out avg@k."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return pd.DataFrame()
    filt = "tags.`relift.algorithm` != ''"
    if parent_run_id:
        filt += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    rows = []
    for run in client.search_runs(
        [exp.experiment_id],
        filter_string=filt,
        max_results=5000,
        order_by=["attributes.start_time ASC"],
    ):
        m, p = run.data.metrics, run.data.params
        iterations = int(p.get("run.iterations", "0") or 0)
        row = {
            "run": run.info.run_name,
            "run_id": run.info.run_id,
            "algorithm": "base" if iterations == 0 else run.data.tags.get("relift.algorithm"),
            "seed": int(p["run.seed"]) if p.get("run.seed") else None,
            "status": run.info.status,
            "iterations": iterations,
            "demos_used": m.get("demos_used", 0.0),
            "rollout_accuracy": m.get("rollout_accuracy"),
        }
        for key, value in m.items():
            column = _eval_column(key)
            if column is not None:
                row[column] = value
        rows.append((row, p))
    return _with_variants(rows)


# Params that differ between runs of one comparison without making them different methods.
_NOT_A_VARIANT = (
    "run.seed",
    "run.name",
    "algorithm.name",
    "run.iterations",
    "model.init_from",
    "run.workdir",
    "algorithm.teacher_model",
)


def _with_variants(rows: list[tuple[dict, dict]]) -> pd.DataFrame:
    """Adds `variant`: the algorithm, plus every other param whose value differs between the
    runs (a sweep's grid), so runs of one method and setting group across seeds."""
    keys = set().union(*(params for _, params in rows)) if rows else set()
    varying = sorted(
        k
        for k in keys
        if k not in _NOT_A_VARIANT and len({params.get(k) for _, params in rows}) > 1
    )
    out = []
    for row, params in rows:
        extra = ",".join(f"{k.rsplit('.', 1)[-1]}={params.get(k)}" for k in varying)
        out.append({"variant": f"{row['algorithm']} {extra}".strip(), **row})
    return pd.DataFrame(out)


def held_out_columns(table: pd.DataFrame) -> list[str]:
    """Benchmark columns (not their sub-groups), in table order."""
    fixed = {
        "variant",
        "run",
        "run_id",
        "algorithm",
        "seed",
        "status",
        "iterations",
        "demos_used",
        "rollout_accuracy",
    }
    return [c for c in table.columns if c not in fixed and ":" not in c]


# The interval a comparison over seeds gives, by its name: a t-interval over the seeds' scores.
# (The demo's report gives a paired bootstrap over questions and seeds, named
# relift_core.proofworld.report.CI_NAME.)
CI_NAME = "95% t-interval"
# Fewer seeds than this: the interval is shown, marked as resting on too few seeds (two seeds
# that ended identical give a zero-width interval).
MIN_SEEDS_FOR_CI = 3


def mean_ci(values: pd.Series) -> tuple[float, float | None, float | None]:
    """Mean and 95% t-interval over seeds (no interval from a single seed)."""
    x = values.dropna().to_numpy(dtype=float)
    if len(x) == 0:
        return math.nan, None, None
    if len(x) == 1:
        return float(x[0]), None, None
    from scipy import stats

    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def summarize_by_algorithm(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per variant (algorithm and swept settings): seeds (those with a value of `metric`), mean
    and 95% t-interval of `metric` over seeds, demonstrations used (mean over seeds)."""
    rows = []
    for algo, group in table.groupby("variant", sort=False):
        values = group[metric] if metric in group else pd.Series(dtype=float)
        mean, lo, hi = mean_ci(values)
        rows.append(
            {
                "algorithm": algo,
                "seeds": int(values.notna().sum()),
                "mean": mean,
                "ci_low": lo,
                "ci_high": hi,
                "demos_used": float(group["demos_used"].mean()),
            }
        )
    return pd.DataFrame(rows)


def method_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Which method is best: one row per variant and held-out benchmark, with the seeds, the
    mean and 95% t-interval over seeds, and the demonstrations used. Long format, the sweep's parent
    run logs it as metrics and shows it as its description."""
    frames = []
    for bench in held_out_columns(table):
        frames.append(summarize_by_algorithm(table, bench).assign(benchmark=bench))
    if not frames:
        return pd.DataFrame(
            columns=["algorithm", "benchmark", "seeds", "mean", "ci_low", "ci_high", "demos_used"]
        )
    out = pd.concat(frames, ignore_index=True)
    return out[["algorithm", "benchmark", "seeds", "mean", "ci_low", "ci_high", "demos_used"]]


def _metric_segment(text: str) -> str:
    """A variant as one MLflow metric-name segment (letters, digits, _ - . space only)."""
    return "".join(c if c.isalnum() or c in "_-. " else "_" for c in text).strip()


def summary_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """`method_summary` as MLflow metrics: `<variant>/heldout_<benchmark>_mean` (and `_ci_low`,
    `_ci_high`, `_seeds`) and `<variant>/demos_used`."""
    metrics: dict[str, float] = {}
    for row in summary.itertuples(index=False):
        key = f"{_metric_segment(row.algorithm)}/heldout_{_metric_segment(row.benchmark)}"
        values = {
            "mean": row.mean,
            "ci_low": row.ci_low,
            "ci_high": row.ci_high,
            "seeds": row.seeds,
        }
        metrics |= {
            f"{key}_{k}": float(v)
            for k, v in values.items()
            if v is not None and not (isinstance(v, float) and math.isnan(v))
        }
        metrics[f"{_metric_segment(row.algorithm)}/demos_used"] = float(row.demos_used)
    return metrics


def summary_rows(summary: pd.DataFrame) -> list[dict[str, object]]:
    """`method_summary` rounded for display (a Prefect table artifact, the console)."""
    return [
        {
            "method": r.algorithm,
            "held-out": r.benchmark,
            "seeds": int(r.seeds),
            "mean": None if math.isnan(r.mean) else round(r.mean, 3),
            CI_NAME: fmt_ci(r.ci_low, r.ci_high, r.seeds),
            "demos used": round(r.demos_used),
        }
        for r in summary.itertuples(index=False)
    ]


def summary_table_markdown(summary: pd.DataFrame) -> str:
    """`summary_rows` as one markdown table, with a line on what the interval means."""
    if summary.empty:
        return "No held-out evaluation among the runs."
    text = pd.DataFrame(summary_rows(summary)).to_markdown(index=False)
    # Line breaks that markdown ignores: the console (`relift sweep`) is 100 columns wide.
    return (
        text + "\n\nHeld-out accuracy (avg@k) on questions never trained on; mean and 95%\n"
        f"t-interval over seeds (fewer than {MIN_SEEDS_FOR_CI} seeds: marked, too few for the\n"
        "interval to say much); demonstrations used: mean over seeds."
    )


def metric_history(tracking_uri: str, run_id: str, key: str) -> pd.DataFrame:
    client = MlflowClient(tracking_uri=tracking_uri)
    hist = client.get_metric_history(run_id, key)
    return pd.DataFrame({"step": [h.step for h in hist], key: [h.value for h in hist]})


def curves(tracking_uri: str, table: pd.DataFrame, keys: tuple[str, ...]) -> pd.DataFrame:
    """Long table (algorithm, seed, run_id, key, step, value) of the trained runs' histories."""
    client = MlflowClient(tracking_uri=tracking_uri)
    rows = []
    for run in table[table["iterations"] > 0].itertuples():
        for key in keys:
            for h in client.get_metric_history(run.run_id, key):
                rows.append(
                    {
                        "algorithm": run.variant,
                        "seed": run.seed,
                        "run_id": run.run_id,
                        "key": key,
                        "step": h.step,
                        "value": h.value,
                    }
                )
    return pd.DataFrame(rows, columns=["algorithm", "seed", "run_id", "key", "step", "value"])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: pd.DataFrame, keys: tuple[str, ...], out_path: Path) -> Path:
    """One panel per metric: the mean over seeds per algorithm, with the seeds' range as a band."""
    plt = _pyplot()
    keys = tuple(k for k in keys if (history["key"] == k).any()) or keys[:1]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        part = history[history["key"] == key]
        for algo, group in part.groupby("algorithm", sort=False):
            by_step = group.groupby("step")["value"]
            mean, low, high = by_step.mean(), by_step.min(), by_step.max()
            ax.plot(mean.index, mean.to_numpy(), label=algo)
            ax.fill_between(mean.index, low.to_numpy(), high.to_numpy(), alpha=0.2)
        ax.set_title(key)
        ax.set_xlabel("iteration")
    axes[0][0].legend()
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_level_shares(history: pd.DataFrame, out_path: Path) -> Path:
    """The paper's stacked shares of questions per difficulty level over iterations (mean over
    seeds), one panel per algorithm."""
    plt = _pyplot()
    algos = list(dict.fromkeys(history["algorithm"])) or ["(none)"]
    fig, axes = plt.subplots(1, len(algos), figsize=(4 * len(algos), 3.2), squeeze=False)
    for ax, algo in zip(axes[0], algos, strict=True):
        part = history[(history["algorithm"] == algo) & history["key"].isin(LEVEL_SHARES)]
        if part.empty:
            continue
        shares = part.pivot_table(index="step", columns="key", values="value", aggfunc="mean")
        shares = shares.reindex(columns=[k for k in LEVEL_SHARES if k in shares.columns])
        ax.stackplot(
            shares.index,
            shares.to_numpy().T,
            labels=[c.removeprefix("frac_") for c in shares.columns],
        )
        ax.set_title(algo)
        ax.set_xlabel("iteration")
        ax.set_ylim(0, 1)
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def fmt_ci(lo: float | None, hi: float | None, seeds: int) -> str:
    """`lo to hi`, marked when it rests on fewer than MIN_SEEDS_FOR_CI seeds."""
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):  # NaN: None in a frame
        return f"- ({seeds} seed{'s' if seeds != 1 else ''})"
    text = f"{lo:.3f} to {hi:.3f}"
    return text if seeds >= MIN_SEEDS_FOR_CI else f"{text} (only {seeds} seeds)"


def summary_markdown(table: pd.DataFrame) -> str:
    """Per held-out benchmark: one row per algorithm, mean and 95% t-interval over seeds."""
    lines = []
    for bench in held_out_columns(table):
        summary = summarize_by_algorithm(table, bench)
        frame = pd.DataFrame(
            {
                "algorithm": summary["algorithm"],
                "seeds": summary["seeds"],
                f"held-out {bench}": summary["mean"].map(lambda v: f"{v:.3f}"),
                CI_NAME: [
                    fmt_ci(lo, hi, n)
                    for lo, hi, n in zip(
                        summary["ci_low"], summary["ci_high"], summary["seeds"], strict=True
                    )
                ],
                "demos used": summary["demos_used"].map(lambda v: f"{v:.0f}"),
            }
        )
        lines += [f"### Held-out `{bench}`", "", frame.to_markdown(index=False), ""]
        groups = [c for c in table.columns if c.startswith(f"{bench}:")]
        if groups:
            by_group = table.groupby("variant", sort=False)[groups].mean()
            by_group.columns = [c.split(":", 1)[1] for c in groups]
            lines += [
                "Per group (mean over seeds):",
                "",
                by_group.map(lambda v: f"{v:.3f}").to_markdown(),
                "",
            ]
    return "\n".join(lines)


def write_report(
    tracking_uri: str,
    out_dir: Path,
    experiment: str = "relift",
    *,
    parent_run_id: str | None = None,
) -> dict[str, Path]:
    """report.md (tables with CIs over seeds) and the figures it embeds, under `out_dir`."""
    out_dir = Path(out_dir)
    table = runs_table(tracking_uri, experiment, parent_run_id=parent_run_id)
    if table.empty:
        raise ValueError(
            f"no training runs in {tracking_uri}"
            + (f" under parent run {parent_run_id}" if parent_run_id else "")
        )
    history = curves(tracking_uri, table, TRAINING_CURVES + LEVEL_SHARES)
    figures = {
        "curves": plot_curves(history, TRAINING_CURVES, out_dir / "training_curves.png"),
        "levels": plot_level_shares(history, out_dir / "level_shares.png"),
    }
    runs = table[
        ["run", "variant", "seed", "status", "demos_used", *held_out_columns(table)]
    ].round(3)
    text = "\n".join(
        [
            "# RL vs SFT vs ReLIFT",
            "",
            f"{len(table)} runs from `{tracking_uri}`"
            + (f", children of `{parent_run_id}`" if parent_run_id else "")
            + ". Means over seeds with 95% t-intervals.",
            "",
            summary_markdown(table),
            "## Training curves (mean over seeds, band: the seeds' range)",
            "",
            "![training curves](training_curves.png)",
            "",
            "## Questions per difficulty level over iterations",
            "",
            "![level shares](level_shares.png)",
            "",
            "## Runs",
            "",
            runs.to_markdown(index=False),
            "",
        ]
    )
    report = out_dir / "report.md"
    report.write_text(text)
    return {"report": report, **figures}


def short_table(table: pd.DataFrame) -> pd.DataFrame:
    """What `relift compare` prints: per algorithm, seeds, held-out mean and 95% t-interval of
    the first benchmark, demonstrations used; fits 100 columns."""
    benches = held_out_columns(table)
    bench = benches[0] if benches else "rollout_accuracy"
    summary = summarize_by_algorithm(table, bench)
    return pd.DataFrame(
        {
            "algorithm": summary["algorithm"],
            "seeds": summary["seeds"],
            f"held-out {bench}": summary["mean"].map(lambda v: "-" if np.isnan(v) else f"{v:.3f}"),
            CI_NAME: [
                fmt_ci(lo, hi, n)
                for lo, hi, n in zip(
                    summary["ci_low"], summary["ci_high"], summary["seeds"], strict=True
                )
            ],
            "demos": summary["demos_used"].map(lambda v: f"{v:.0f}"),
        }
    )
