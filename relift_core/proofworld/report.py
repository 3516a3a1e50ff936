"""The proof-world comparison's one core, shared by the `demo` flow (flows/demo.py) and its
tuning loop (scripts/demo_experiment.py): which overrides make each method's run, and how the
result reads -- one markdown renderer and one figure. The statistics are statistics.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from relift_core.algorithm.difficulty import LEVELS

# The interval the report gives: a paired bootstrap over questions and seeds
# (statistics.summarize). `relift compare`'s interval over seeds alone is a t-interval, and is
# named so (analysis/compare.py).
CI_NAME = "95% bootstrap CI"
# The untrained base model: evaluated exactly as the trained runs are, as a `train` run of 0
# iterations with the same eval settings and seed.
BASE_METHOD = "base"
# ReLIFT whose demonstrations come from a teacher model instead of the dataset: the world's model
# pretrained without its two gaps (no held-out carry-out sums, no miscopied answers). A teacher
# answer enters the buffer only if the grader verifies it (algorithm.demonstrations=teacher).
TEACHER_METHOD = "relift-teacher"
TEACHER_WORLD = ["data.world.pretrain_holdout=[]", "data.world.pretrain_noise=0.0"]


def method_overrides(method: str, teacher_model: str | None = None) -> list[str]:
    """The overrides that make `method`'s run from the shared base model."""
    if method == BASE_METHOD:
        return ["algorithm.name=rl", "run.iterations=0"]
    # Each seed's base run is every trained run's step-0 evaluation already.
    trained = ["eval.at_start=false"]
    if method == TEACHER_METHOD:
        if teacher_model is None:
            raise ValueError(f"{TEACHER_METHOD} needs the teacher model's directory")
        return [
            *trained,
            "algorithm.name=relift",
            "algorithm.demonstrations=teacher",
            f"algorithm.teacher_model={teacher_model}",
        ]
    return [*trained, f"algorithm.name={method}"]


def render_markdown(summary: dict[str, Any]) -> str:
    """The comparison's report: per method, held-out accuracy with its bootstrap CI, the
    demonstrations used and accuracy per level and per family; then the paired differences.
    `summary` is statistics.summarize's, with `train_levels` (counts under the base model)."""
    seeds = summary["seeds"]
    runs = summary["runs"]
    start = ", ".join(f"{lv} {n}" for lv, n in summary["train_levels"].items())
    held = ", ".join(f"{lv} {n}" for lv, n in summary["levels"].items())
    # One sentence a line, a table under 100 columns: `relift demo` prints it to a terminal.
    lines = [
        f"Seeds {', '.join(map(str, seeds))}; {summary['questions']} held-out questions (avg@k).",
        f"Training questions by level under the base model: {start}.",
        f"Held-out: {held}.",
        "",
        f"| run | held-out accuracy | {CI_NAME} | demos used | " + " | ".join(LEVELS) + " |",
        "|---|---|---|---|" + "---|" * len(LEVELS),
    ]
    for m, r in runs.items():
        levels = " | ".join(
            "-" if r["by_level"][lv] is None else f"{r['by_level'][lv]:.3f}" for lv in LEVELS
        )
        lines.append(
            f"| {m} | {r['accuracy']:.3f} | {r['ci'][0]:.3f} to {r['ci'][1]:.3f} | "
            f"{r['demos_used']:.0f} | {levels} |"
        )
    families = sorted(next(iter(runs.values()))["by_family"])
    lines += ["", "| run | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
    for m, r in runs.items():
        lines.append(f"| {m} | " + " | ".join(f"{r['by_family'][f]:.3f}" for f in families) + " |")
    if "teacher" in summary:
        t = summary["teacher"]
        lines += [
            "",
            f"{TEACHER_METHOD}: ReLIFT with demonstrations from a teacher model (the world's model",
            "pretrained without its gaps), each verified by the grader: "
            f"{t['teacher_verified']} verified and used, {t['teacher_rejected']} rejected.",
        ]
    lines += ["", f"| paired difference | mean | {CI_NAME} | questions |", "|---|---|---|---|"]
    for k, d in summary["differences"].items():
        if d["mean"] is None:
            continue
        lines.append(
            f"| {k} | {d['mean']:+.3f} | {d['ci'][0]:+.3f} to {d['ci'][1]:+.3f} | "
            f"{d['questions']} |"
        )
    return "\n".join(lines)


def plot(summary: dict[str, Any], out: Path) -> Path:
    """The report as a figure: accuracy with CIs, accuracy by level, paired differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    names = list(runs)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    acc = [runs[m]["accuracy"] for m in names]
    err = [
        [runs[m]["accuracy"] - runs[m]["ci"][0] for m in names],
        [runs[m]["ci"][1] - runs[m]["accuracy"] for m in names],
    ]
    axes[0].bar(names, acc, yerr=err, capsize=4, color="tab:blue")
    axes[0].set_title(f"held-out accuracy ({CI_NAME}, seeds {summary['seeds']})")
    by_level = pd.DataFrame({m: runs[m]["by_level"] for m in names}).reindex(list(LEVELS))
    by_level.plot.bar(ax=axes[1], rot=0, title="accuracy by level under the base model")
    axes[1].set_ylim(0, 1)
    diffs = {k: d for k, d in summary["differences"].items() if d["mean"] is not None}
    keys = list(diffs)
    axes[2].barh(
        keys,
        [diffs[k]["mean"] for k in keys],
        xerr=[
            [diffs[k]["mean"] - diffs[k]["ci"][0] for k in keys],
            [diffs[k]["ci"][1] - diffs[k]["mean"] for k in keys],
        ],
        capsize=4,
        color="tab:green",
    )
    axes[2].axvline(0, color="black", linewidth=0.8)
    axes[2].set_title(f"paired differences ({CI_NAME})")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
