"""The comparison a sweep's parent run shows: per method the held-out mean, 95% t-interval over
seeds, seed count and demonstrations used (analysis.compare, on a table as runs_table builds it)."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis.compare import (
    CI_NAME,
    fmt_ci,
    method_summary,
    short_table,
    summary_metrics,
    summary_rows,
    summary_table_markdown,
)


def _table() -> pd.DataFrame:
    rows = [
        ("rl", 0, 0.30, 0),
        ("rl", 1, 0.34, 0),
        ("rl", 2, 0.32, 0),
        ("relift", 0, 0.0078125, 5),
        ("relift", 1, 0.0078125, 7),
        ("sft", 0, 0.5, 40),
    ]
    return pd.DataFrame(
        [
            {
                "variant": v,
                "run": f"{v}-s{s}",
                "run_id": f"{v}{s}",
                "algorithm": v,
                "seed": s,
                "status": "FINISHED",
                "iterations": 3,
                "demos_used": d,
                "rollout_accuracy": 0.1,
                "world": acc,
                "world:add/2": acc,
            }
            for v, s, acc, d in rows
        ]
    )


def test_each_method_gets_mean_ci_seeds_and_demonstrations():
    summary = method_summary(_table()).set_index("algorithm")
    assert list(summary["benchmark"].unique()) == ["world"]  # sub-groups are not benchmarks
    assert summary.loc["rl", "seeds"] == 3 and summary.loc["rl", "mean"] == pytest.approx(0.32)
    assert summary.loc["rl", "ci_low"] < 0.32 < summary.loc["rl", "ci_high"]
    assert summary.loc["relift", "demos_used"] == 6
    assert pd.isna(summary.loc["sft", "ci_low"])  # one seed: no interval
    metrics = summary_metrics(method_summary(_table()))
    assert metrics["rl/heldout_world_mean"] == pytest.approx(0.32)
    assert metrics["rl/heldout_world_seeds"] == 3 and metrics["relift/demos_used"] == 6
    assert "sft/heldout_world_ci_low" not in metrics and "sft/heldout_world_mean" in metrics


def test_an_interval_over_fewer_than_three_seeds_says_so():
    # Two seeds that ended identical: a zero-width interval, which must not pass for certainty.
    assert fmt_ci(0.0078125, 0.0078125, 2) == "0.008 to 0.008 (only 2 seeds)"
    assert fmt_ci(None, None, 1) == "- (1 seed)"
    assert fmt_ci(0.1, 0.3, 3) == "0.100 to 0.300"
    printed = short_table(_table()).set_index("algorithm")[CI_NAME]
    assert printed["relift"].endswith("(only 2 seeds)") and "only" not in printed["rl"]
    assert printed["sft"] == "- (1 seed)"
    text = summary_table_markdown(method_summary(_table()))
    assert "(only 2 seeds)" in text and "fewer than 3 seeds" in text


def test_displayed_values_are_rounded():
    rows = {r["method"]: r for r in summary_rows(method_summary(_table()))}
    assert rows["relift"]["mean"] == 0.008 and rows["relift"]["demos used"] == 6
    assert rows["rl"]["mean"] == 0.32
