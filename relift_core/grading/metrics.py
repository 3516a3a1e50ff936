"""Evaluation metrics over graded samples: avg@k, unbiased pass@k, maj@k, and the paper's
averages. Pure functions over plain values; no model, no grader, no I/O.

All accuracies are fractions in [0, 1]. Summary keys avoid `@` (MLflow rejects it in metric
names): `avg_at_k`, `pass_at_1`, `pass_at_k`, `maj_at_k`, with the k in `k`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from relift_core.data.benchmarks import BUILTIN_BENCHMARKS


class GradedQuestion(Protocol):
    """What a summary needs from a question's record (evaluation.QuestionRecord has it)."""

    benchmark: str
    data_source: str
    extracted: list[str | None]
    correct: list[bool]
    format_ok: list[bool]
    lengths: list[int]
    finish_reasons: list[str]


def avg_at_k(correct: Sequence[bool]) -> float:
    """The fraction of a question's k samples that are correct (the paper's avg@k per question)."""
    if not correct:
        raise ValueError("avg_at_k needs at least one sample")
    return sum(bool(c) for c in correct) / len(correct)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples is correct) from n samples, c correct.

    1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1..n} (1 - k/i): the binomials
    overflow floats for n in the hundreds, the product never leaves [0, 1].
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the most frequent extracted answer is correct (majority vote over k samples).

    Answers are compared as strings after stripping surrounding whitespace, so `1/2` and
    `\\frac{1}{2}` are different votes. Samples with no extracted answer (None) do not vote;
    with no votes at all the result is False. Ties go to the answer that appears first in
    sample order, so the result is deterministic for a given sample order. An answer's
    correctness is that of its samples (any of them graded correct: they share the string).
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    votes: dict[str, int] = {}  # insertion order = first appearance, which breaks ties
    is_correct: dict[str, bool] = {}
    for answer, ok in zip(answers, correct, strict=True):
        if answer is None:
            continue
        key = answer.strip()
        votes[key] = votes.get(key, 0) + 1
        is_correct[key] = is_correct.get(key, False) or bool(ok)
    if not votes:
        return False
    winner = max(votes, key=votes.__getitem__)  # max keeps the first of equal counts
    return is_correct[winner]


def summarize(records: Iterable[GradedQuestion]) -> dict[str, float]:
    """One summary over a set of questions (normally one benchmark's).

    k is the smallest number of samples any question has (they normally all have the same).
    Keys: questions, k, responses, avg_at_k (mean over questions of each one's fraction
    correct), pass_at_1 (equal to avg_at_k; kept for the name), pass_at_k, maj_at_k,
    solved_questions (at least one correct sample), correct_responses,
    response_length_mean/max (tokens), format_failure_rate, truncation_rate (stopped at
    max_new_tokens). Rates are over responses; accuracies are averaged per question first, so
    every question weighs the same.
    """
    records = list(records)
    if not records:
        return {"questions": 0, "k": 0, "responses": 0}
    ns = [len(r.correct) for r in records]
    if min(ns) == 0:
        raise ValueError("a question without samples cannot be summarized")
    k = min(ns)
    counts = [sum(bool(c) for c in r.correct) for r in records]
    lengths = [x for r in records for x in r.lengths]
    format_ok = [bool(x) for r in records for x in r.format_ok]
    finish = [x for r in records for x in r.finish_reasons]
    q = len(records)
    return {
        "questions": q,
        "k": k,
        "responses": sum(ns),
        "avg_at_k": sum(avg_at_k(r.correct) for r in records) / q,
        "pass_at_1": sum(pass_at_k(n, c, 1) for n, c in zip(ns, counts, strict=True)) / q,
        "pass_at_k": sum(pass_at_k(n, c, k) for n, c in zip(ns, counts, strict=True)) / q,
        "maj_at_k": sum(maj_at_k(r.extracted, r.correct) for r in records) / q,
        "solved_questions": sum(c > 0 for c in counts),
        "correct_responses": sum(counts),
        "response_length_mean": sum(lengths) / len(lengths) if lengths else 0.0,
        "response_length_max": max(lengths, default=0),
        "format_failure_rate": _rate(format_ok, False),
        "truncation_rate": _rate(finish, "length"),
    }


def summarize_by(records: Iterable[GradedQuestion], key: str = "benchmark") -> dict[str, dict]:
    """Summaries grouped by a record attribute: `benchmark`, or `data_source` for the families
    of a mixed set (the demo's world benchmark). Groups keep first-seen order."""
    groups: dict[str, list[GradedQuestion]] = {}
    for r in records:
        groups.setdefault(str(getattr(r, key)), []).append(r)
    return {name: summarize(rs) for name, rs in groups.items()}


# Which built-in benchmark counts towards which average. User-registered benchmarks (e.g. the
# demo's `world`) are never averaged in: the averages must mean the same thing in every run.
MATH_BENCHMARKS = tuple(s.name for s in BUILTIN_BENCHMARKS if s.group == "math")
OOD_BENCHMARKS = tuple(s.name for s in BUILTIN_BENCHMARKS if s.group == "ood")
PAPER_BENCHMARKS = tuple(s.name for s in BUILTIN_BENCHMARKS if s.in_paper_average)


def paper_averages(per_benchmark: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Unweighted means of `avg_at_k` over the benchmarks present (each benchmark weighs the
    same, as in the paper's tables, whatever its size).

    avg_math: the math benchmarks present (AIME24, AIME25, AMC23, MATH-500, Minerva,
    OlympiadBench); avg_ood: GPQA-Diamond, ARC-c, MMLU-Pro present; avg_all: both;
    avg_paper: the paper's headline average, AIME24, AMC23, MATH-500, Minerva, OlympiadBench
    and GPQA-Diamond (five competition-level + one out-of-distribution benchmark), and
    `paper_complete` (1.0 / 0.0) says whether all six were there. A key is left out when none
    of its benchmarks is present.
    """

    def mean_of(names: Sequence[str]) -> float | None:
        values = [
            float(per_benchmark[n]["avg_at_k"])
            for n in names
            if n in per_benchmark and per_benchmark[n].get("questions")
        ]
        return sum(values) / len(values) if values else None

    out: dict[str, float] = {}
    for key, names in (
        ("avg_math", MATH_BENCHMARKS),
        ("avg_ood", OOD_BENCHMARKS),
        ("avg_all", MATH_BENCHMARKS + OOD_BENCHMARKS),
        ("avg_paper", PAPER_BENCHMARKS),
    ):
        value = mean_of(names)
        if value is not None:
            out[key] = value
    if "avg_paper" in out:
        out["paper_complete"] = float(all(n in per_benchmark for n in PAPER_BENCHMARKS))
    return out


def _rate(values: Sequence[Any], hit: Any) -> float:
    return sum(v == hit for v in values) / len(values) if values else 0.0
