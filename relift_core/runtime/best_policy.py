"""The best validation checkpoint (`eval.keep_best`), as the reference keeps it.

The ReLIFT reference validates every `test_freq` steps and saves the policy whenever its score
beats the best so far (relift/verl/verl/relift/trainer.py `maybe_save_best_hf`); its paper
reports that checkpoint. Here the score is the mean avg@k over the evaluated benchmarks (each
benchmark weighs the same, as in the paper's tables), and the policy goes to `<run>/best`
together with its step and score, written as one directory so the two never disagree.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from relift_core.atomic import atomic_dir

BEST_DIR = "best"
BEST_META = "best.json"


def selection_score(summaries: dict[str, dict[str, Any]]) -> float | None:
    """Mean avg@k over the benchmarks that have questions; None when there are none."""
    values = [float(s["avg_at_k"]) for s in summaries.values() if s.get("questions")]
    return sum(values) / len(values) if values else None


def best_so_far(best_dir: Path) -> dict[str, Any] | None:
    """{"step", "score"} of the kept policy, or None before the first one."""
    meta = Path(best_dir) / BEST_META
    return json.loads(meta.read_text()) if meta.is_file() else None


def keep_if_best(best_dir: Path, step: int, score: float, model, tokenizer) -> bool:
    """Save `model` as the best policy if `score` beats the kept one's; True when it did. A tie
    keeps the earlier policy (as the reference's strict comparison does)."""
    best = best_so_far(best_dir)
    if not math.isfinite(score) or (best is not None and score <= best["score"]):
        return False
    with atomic_dir(Path(best_dir)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / BEST_META).write_text(json.dumps({"step": step, "score": score}))
    return True
