"""Held-out comparison of methods over seeds: means with bootstrap 95% confidence intervals.

Every method is evaluated on the same held-out questions under several run seeds, so a
question's accuracy under method M and seed s is one cell of an (S seeds x Q questions) matrix.
The bootstrap resamples questions and seeds together (a resample draws Q questions and S seeds
with replacement, the same draw for every method), which makes differences between methods
*paired*: question difficulty, which dominates the spread, cancels out of `a - b`.

The claims the demo checks (its `differences`) are the paper's mechanism:
  rl-base@non_hardest   RL improves what the base model could sometimes solve
  sft-rl@hardest        demonstrations teach what RL cannot reach (0 of n solved at the start)
  relift-rl, relift-sft ReLIFT beats both overall
and, where the demo runs them, ReLIFT against the methods the field compares it with:
  relift-luffy          LUFFY: every question's demonstration mixed into its RL group
  relift-dapo           DAPO: dynamic sampling, clip-higher, token-level loss, overlong penalty
"""

from __future__ import annotations

from typing import Any

import numpy as np

from relift_core.algorithm.difficulty import LEVELS, Level

CLAIMS = {
    "rl-base@non_hardest": ("rl", "base", (Level.HARD, Level.MEDIUM, Level.EASY)),
    "sft-rl@hardest": ("sft", "rl", (Level.HARDEST,)),
    "relift-rl": ("relift", "rl", None),
    "relift-sft": ("relift", "sft", None),
    "relift-luffy": ("relift", "luffy", None),
    "relift-dapo": ("relift", "dapo", None),
}


def accuracy_matrix(
    results: list[dict[str, Any]], method: str, seeds: list[int], uids: list[str]
) -> np.ndarray:
    """(seeds x questions) held-out accuracy of one method; results hold {algo, seed, accuracy}."""
    by_seed = {r["seed"]: r["accuracy"] for r in results if r["algo"] == method}
    missing = [s for s in seeds if s not in by_seed]
    if missing:
        raise ValueError(f"no {method} result for seeds {missing}")
    return np.array([[by_seed[s][u] for u in uids] for s in seeds], dtype=np.float64)


def bootstrap_means(matrix: np.ndarray, q_draws: np.ndarray, s_draws: np.ndarray) -> np.ndarray:
    """Mean accuracy under each resample: q_draws (B x Q') and s_draws (B x S') index
    columns/rows."""
    per_seed = matrix[:, q_draws].mean(axis=2)  # (S, B): each seed's mean over resampled questions
    return np.take_along_axis(per_seed.T, s_draws, axis=1).mean(axis=1)  # (B,)


def _ci(values: np.ndarray) -> list[float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def summarize(
    results: list[dict[str, Any]],
    levels: dict[str, str],
    families: dict[str, str],
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """The demo's results: per method accuracy (+CI, by level, by family), demos used, the
    paired differences of CLAIMS (+CI). `levels`: uid -> level under the base model."""
    methods = list(dict.fromkeys(r["algo"] for r in results))
    seeds = sorted({r["seed"] for r in results})
    uids = sorted(next(iter(results))["accuracy"])
    mats = {m: accuracy_matrix(results, m, seeds, uids) for m in methods}
    rng = np.random.default_rng(seed)
    s_draws = rng.integers(0, len(seeds), size=(resamples, len(seeds)))

    def draws_for(subset: np.ndarray) -> np.ndarray:
        return subset[rng.integers(0, len(subset), size=(resamples, len(subset)))]

    all_q = np.arange(len(uids))
    q_all = draws_for(all_q)
    runs: dict[str, Any] = {}
    for m in methods:
        mat = mats[m]
        boot = bootstrap_means(mat, q_all, s_draws)
        by_level = {}
        for lv in LEVELS:
            cols = [j for j, u in enumerate(uids) if levels.get(u) == lv]
            by_level[lv] = round(float(mat[:, cols].mean()), 4) if cols else None
        by_family = {}
        for fam in sorted(set(families.values())):
            cols = [j for j, u in enumerate(uids) if families.get(u) == fam]
            by_family[fam] = round(float(mat[:, cols].mean()), 4)
        demos = [r["demos_used"] for r in results if r["algo"] == m]
        runs[m] = {
            "accuracy": round(float(mat.mean()), 4),
            "ci": _ci(boot),
            "per_seed": [round(float(x), 4) for x in mat.mean(axis=1)],
            "demos_used": round(float(np.mean(demos)), 1),
            "by_level": by_level,
            "by_family": by_family,
        }
    differences: dict[str, Any] = {}
    for claim, (a, b, lv_subset) in CLAIMS.items():
        if a not in mats or b not in mats:
            continue
        subset = (
            all_q
            if lv_subset is None
            else np.array([j for j, u in enumerate(uids) if levels.get(u) in lv_subset], dtype=int)
        )
        if len(subset) == 0:
            differences[claim] = {"mean": None, "ci": [None, None], "questions": 0}
            continue
        q = draws_for(subset)
        diff = bootstrap_means(mats[a], q, s_draws) - bootstrap_means(mats[b], q, s_draws)
        mean = float(mats[a][:, subset].mean() - mats[b][:, subset].mean())
        differences[claim] = {"mean": round(mean, 4), "ci": _ci(diff), "questions": len(subset)}
    return {
        "runs": runs,
        "differences": differences,
        "seeds": seeds,
        "questions": len(uids),
        "levels": {lv: sum(1 for u in uids if levels.get(u) == lv) for lv in LEVELS},
    }
