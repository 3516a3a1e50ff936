"""The grader against every gold answer of the evaluation sets in ../shared/benchmarks
(all 7,393 rows of math_valid, gpqa_diamond and arc_c).

Rows repeat (AIME and AMC 32 times each), so the rows are reduced to distinct (source, gold)
pairs first and graded once each, in one batch over two workers; every row is then checked
through its pair.

There are 1,165 distinct pairs: 1,153 maths, 4 GPQA (A-D) and 8 ARC-C (A-D, 1-4). The
benchmarks' README counts 1,157 (maths and GPQA, all through math-verify); here the choice
pairs go through the letter grader, and 1,164 of 1,165 verify."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from relift_core.grading.extraction import answer_type_for
from relift_core.grading.grader import BatchGrader, Grade
from scripts.bench_grader import surely_wrong

pytestmark = [pytest.mark.shared, pytest.mark.slow]

BENCHMARK_FILES = ("math_valid.parquet", "gpqa_diamond.parquet", "arc_c.parquet")
ROWS = 7393

# Measured with math-verify 0.9.0, and by the benchmarks' README: `$gold$` and `\boxed{gold}`
# do not verify against each other for this one Minerva answer (its stray `$ $` splits the gold
# into two formulas). It stays a known, asserted exception: if math-verify starts verifying it,
# or anything else stops verifying, this test says so.
KNOWN_UNVERIFIABLE = {
    ("minerva", r"x_{0} \cos (\omega t)+$ $\dot{x}_{0} \sin (\omega t) / \omega"),
}

Pair = tuple[str, str]  # (data_source, gold)


def _response(answer: str) -> str:
    return f"<think>\nLet me work it out.\n</think>\nThe final answer is $\\boxed{{{answer}}}$."


@pytest.fixture(scope="module")
def rows(shared_benchmarks: Path) -> pd.DataFrame:
    frames = [pd.read_parquet(shared_benchmarks / name) for name in BENCHMARK_FILES]
    table = pd.concat(frames, ignore_index=True)
    table["gold"] = table["reward_model"].map(lambda reward_model: reward_model["ground_truth"])
    return table[["data_source", "gold"]]


@pytest.fixture(scope="module")
def pairs(rows: pd.DataFrame) -> list[Pair]:
    return sorted(set(zip(rows["data_source"], rows["gold"], strict=True)))


# These tests are about what verifies, not about deadlines: in a fresh worker (cold parser
# caches) the longest Minerva gold took 6.9 s on a 2-core machine at load average 8, past the
# default 5 s deadline.
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def grader() -> Iterator[BatchGrader]:
    with BatchGrader(workers=2, timeout_s=TIMEOUT_S) as batch_grader:
        yield batch_grader


@pytest.fixture(scope="module")
def gold_grades(pairs: list[Pair], grader: BatchGrader) -> dict[Pair, Grade]:
    types = [answer_type_for(source) for source, _ in pairs]
    grades = grader.grade(
        [_response(gold) for _, gold in pairs], [gold for _, gold in pairs], types, True
    )
    return dict(zip(pairs, grades, strict=True))


def test_every_gold_written_as_boxed_verifies_but_the_known_exception(
    rows: pd.DataFrame, pairs: list[Pair], gold_grades: dict[Pair, Grade]
) -> None:
    assert len(rows) == ROWS
    assert not [pair for pair, grade in gold_grades.items() if grade.timed_out]
    assert all(grade.format_ok for grade in gold_grades.values())
    failed = {pair for pair, grade in gold_grades.items() if not grade.correct}
    assert failed == KNOWN_UNVERIFIABLE
    # Every row, through its pair: 7,393 rows checked, the known exception's rows excepted.
    row_pairs = zip(rows["data_source"], rows["gold"], strict=True)
    correct_rows = sum(gold_grades[pair].correct for pair in row_pairs)
    exception_rows = rows.set_index(["data_source", "gold"]).index.isin(KNOWN_UNVERIFIABLE).sum()
    assert correct_rows == ROWS - exception_rows
    print(f"\n{len(pairs) - len(failed)} of {len(pairs)} distinct (source, gold) pairs verify")


def test_choice_golds_also_verify_as_answer_lines(pairs: list[Pair], grader: BatchGrader) -> None:
    choice = [(source, gold) for source, gold in pairs if answer_type_for(source) == "choice"]
    assert len(choice) == 12  # gpqa A-D, arc_c A-D and 1-4
    grades = grader.grade(
        [f"ANSWER: {gold}" for _, gold in choice], [g for _, g in choice], "choice"
    )
    assert all(grade.correct for grade in grades)


def test_perturbed_answers_are_rejected(pairs: list[Pair], grader: BatchGrader) -> None:
    cases = []
    for source, gold in pairs:
        answer_type = answer_type_for(source)
        wrong = surely_wrong(gold, answer_type)
        if wrong is not None:
            cases.append((gold, wrong, answer_type))
    assert len(cases) > 400  # 424 integer maths golds and 12 choice golds
    grades = grader.grade(
        [_response(wrong) for _, wrong, _ in cases],
        [gold for gold, _, _ in cases],
        [answer_type for _, _, answer_type in cases],
        True,
    )
    accepted = [
        (gold, wrong)
        for (gold, wrong, _), grade in zip(cases, grades, strict=True)
        if grade.correct
    ]
    assert not accepted
    assert all(grade.format_ok and not grade.timed_out for grade in grades)


def test_the_exact_number_fast_path_agrees_with_math_verify(pairs: list[Pair]) -> None:
    """The fast path may only decide where math-verify decides the same: on every shared maths
    gold and variants of it (itself, written otherwise, off by one, a decimal nearby)."""
    from relift_core.grading.grader import _verify_math, exact_number_verdict

    cases = set()
    for source, gold in pairs:
        if answer_type_for(source) != "math":
            continue
        g = gold.strip()
        cases |= {(g, g), (g, f"{g}.0"), (g, f"+{g}"), (g, f"0{g}"), (g, f"{g}0"), (g, f"-{g}")}
        if re.fullmatch(r"[+-]?\d+", g):
            cases |= {(g, str(int(g) + 1)), (g, str(int(g) - 1)), (g, f"{g}.5")}
        if re.fullmatch(r"[+-]?\d*\.\d+", g):
            cases |= {
                (g, g + "1"),
                (g, g.rstrip("0") or "0"),
                (g, f"{float(g):.2f}"),
                (g, g.replace("0.", ".", 1)),
            }
    decided = [(g, p, exact_number_verdict(p, g)) for g, p in sorted(cases)]
    decided = [(g, p, v) for g, p, v in decided if v is not None]
    assert len(decided) > 1000  # most maths golds are plain numbers
    disagree = [(g, p, v) for g, p, v in decided if _verify_math(g, p) != v]
    assert not disagree, disagree[:20]
