"""Metrics: pass@k against brute-force enumeration, maj@k ties, summaries, paper averages."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from fractions import Fraction

import pytest

from relift_core.grading.metrics import (
    avg_at_k,
    maj_at_k,
    paper_averages,
    pass_at_k,
    summarize,
    summarize_by,
)


def _brute_pass_at_k(n: int, c: int, k: int) -> Fraction:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))


def test_pass_at_k_equals_brute_force_over_all_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_brute_pass_at_k(n, c, k)))


def test_pass_at_k_is_stable_where_binomials_overflow():
    n, c, k = 2000, 3, 700  # C(2000, 700) is far beyond a float
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(n, 0, k) == 0.0 and pass_at_k(n, n, k) == 1.0


def test_pass_at_k_rejects_impossible_counts():
    for bad in [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_avg_at_k():
    assert avg_at_k([True, False, True, True]) == 0.75
    with pytest.raises(ValueError):
        avg_at_k([])


def test_maj_at_k_votes_and_tie_break():
    assert maj_at_k(["3", "4", "3"], [True, False, True])
    assert not maj_at_k(["4", "3", "4"], [False, True, False])
    # A tie goes to the answer that appeared first.
    assert not maj_at_k(["4", "3", "3", "4"], [False, True, True, False])
    assert maj_at_k(["3", "4", "4", "3"], [True, False, False, True])
    # Unextracted answers do not vote; whitespace does not split votes.
    assert maj_at_k([None, None, " 3", "3 ", "4"], [False, False, True, True, False])
    assert not maj_at_k([None, None], [False, False])
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True, False])


@dataclass
class Rec:
    correct: list[bool]
    extracted: list[str | None]
    benchmark: str = "b"
    data_source: str = "d"
    lengths: list[int] = field(default_factory=list)
    format_ok: list[bool] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.correct)
        self.lengths = self.lengths or [10] * n
        self.format_ok = self.format_ok or [x is not None for x in self.extracted]
        self.finish_reasons = self.finish_reasons or ["eos"] * n


def test_summarize_one_benchmark():
    records = [
        Rec([True, True, False, False], ["1", "1", "2", "2"], lengths=[1, 2, 3, 30]),
        Rec([False, False, False, False], ["5", None, None, "6"], finish_reasons=["length"] * 4),
    ]
    s = summarize(records)
    assert (s["questions"], s["k"], s["responses"]) == (2, 4, 8)
    assert s["avg_at_k"] == pytest.approx(0.25) == s["pass_at_1"]
    assert s["pass_at_k"] == pytest.approx(0.5)
    assert s["maj_at_k"] == pytest.approx(0.5)  # tie 1 vs 2 -> "1" (first), correct
    assert (s["solved_questions"], s["correct_responses"]) == (1, 2)
    assert s["response_length_mean"] == pytest.approx((36 + 40) / 8)
    assert s["response_length_max"] == 30
    assert s["format_failure_rate"] == pytest.approx(2 / 8)
    assert s["truncation_rate"] == pytest.approx(0.5)
    assert summarize([])["questions"] == 0


def test_summarize_by_data_source_keeps_families_apart():
    records = [Rec([True], ["1"], data_source="add"), Rec([False], ["2"], data_source="mul")]
    by = summarize_by(records, "data_source")
    assert list(by) == ["add", "mul"]
    assert by["add"]["avg_at_k"] == 1.0 and by["mul"]["avg_at_k"] == 0.0


def test_paper_averages():
    acc = {
        "aime24": 0.1, "aime25": 0.3, "amc23": 0.4, "math500": 0.8, "minerva": 0.3,
        "olympiadbench": 0.4, "gpqa_diamond": 0.35, "arc_c": 0.75, "world": 0.99,
    }  # fmt: skip
    per = {name: {"questions": 10, "avg_at_k": a} for name, a in acc.items()}
    out = paper_averages(per)
    assert out["avg_math"] == pytest.approx((0.1 + 0.3 + 0.4 + 0.8 + 0.3 + 0.4) / 6)
    assert out["avg_ood"] == pytest.approx((0.35 + 0.75) / 2)
    assert out["avg_all"] == pytest.approx((2.3 + 1.1) / 8)
    assert out["avg_paper"] == pytest.approx((0.1 + 0.4 + 0.8 + 0.3 + 0.4 + 0.35) / 6)
    assert out["paper_complete"] == 1.0
    partial = paper_averages({"math500": per["math500"]})
    assert partial == {"avg_math": 0.8, "avg_all": 0.8, "avg_paper": 0.8, "paper_complete": 0.0}
    assert paper_averages({"world": per["world"]}) == {}
