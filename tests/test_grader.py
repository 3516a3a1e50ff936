"""The grader on hand-written responses: extraction, `</think>` handling, multiple choice, the
pool (order, dedupe, timeouts) and adversarial input. The evaluation sets are in
test_grader_shared.py."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from relift_core.grading.extraction import answer_part, answer_type_for, extract_choice, last_boxed
from relift_core.grading.grader import (
    MAX_ANSWER_CHARS,
    BatchGrader,
    Grade,
    _single_lock,
    _single_worker_pool,
    grade_answer,
)

# An answer that keeps sympy busy far past any deadline. The pre-filters refuse it before it
# reaches a worker (tests/test_grader_adversarial.py), so the deadline tests below hand it to the
# pool directly with `_run`, which takes (gold, predicted) pairs past every check: the deadlines
# stay the last resort for whatever the pre-filters miss.
HANGS = r"9^{9^{9^{9}}}"

# Short, so the adversarial tests are quick; generous against a loaded 2-core machine, where an
# ordinary answer takes milliseconds.
TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def grader() -> Iterator[BatchGrader]:
    with BatchGrader(workers=2, timeout_s=TIMEOUT_S) as batch_grader:
        yield batch_grader


# --- answer types and Grade ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data_source", "expected"),
    [
        ("gpqa", "choice"),
        ("gpqa_diamond", "choice"),
        ("Idavidrein/gpqa", "choice"),
        ("arc_c", "choice"),
        ("mmlu_pro", "choice"),
        ("math", "math"),
        ("aime25", "math"),
        ("minerva", "math"),
        ("olympiad_bench", "math"),
    ],
)
def test_answer_type_for(data_source: str, expected: str) -> None:
    assert answer_type_for(data_source) == expected


def test_reward_is_one_only_when_correct() -> None:
    assert Grade(correct=True, format_ok=True, extracted="4").reward == 1.0
    assert Grade(correct=False, format_ok=True, extracted="5").reward == 0.0
    assert Grade(correct=False, format_ok=False, extracted=None, timed_out=True).reward == 0.0


# --- extraction ------------------------------------------------------------------------------


def test_answer_part_is_after_the_last_think_tag() -> None:
    assert answer_part("<think>a</think> b </think> c") == " c"
    assert answer_part("no tag") is None


@pytest.mark.parametrize(
    ("text", "content"),
    [
        (r"so \boxed{4}.", "4"),
        (r"\boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed {x^{2}}", "x^{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are content
        (r"\fbox{7}", "7"),
        (r"\boxed{1} and then \boxed{2", None),  # the last box never closes: truncated
        (r"\boxed 5", None),
        (r"\boxed{43 \boxed{42}}", r"43 \boxed{42}"),  # a box in a box is the outer box's content
        (r"\boxed{1} \boxed 5", None),  # the last box never opens
        ("no box at all", None),
    ],
)
def test_last_boxed(text: str, content: str | None) -> None:
    box = last_boxed(text)
    assert (box.content if box else None) == content


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("ANSWER: C", "C"),
        ("Answer: (B)", "B"),
        ("**Answer:** D", "D"),
        ("The answer is A.", "A"),
        ("the correct answer is option B", "B"),
        (r"\boxed{C}", "C"),
        (r"\boxed{(D)}", "D"),
        (r"\boxed{\text{A}}", "A"),
        (r"\boxed{C) Planetary days will become shorter.}", "C"),
        (r"ANSWER: 3", "3"),  # ARC-C numbers some choices
        (r"ANSWER: A ... on reflection \boxed{B}", "B"),  # the later one wins
        (r"\boxed{B} ... ANSWER: A", "A"),
        (r"\boxed{10^{-4}\ \text{eV}} ANSWER: A", "A"),  # a box that holds no letter
        ("Answer: Apples are red", None),
        ("I cannot decide", None),
    ],
)
def test_extract_choice(text: str, letter: str | None) -> None:
    assert extract_choice(text) == letter


# --- grade_answer ----------------------------------------------------------------------------


def test_math_equivalence_is_semantic() -> None:
    grade = grade_answer(r"<think>half</think> The answer is $\boxed{\frac{1}{2}}$.", "0.5")
    assert grade == Grade(correct=True, format_ok=True, extracted=r"\frac{1}{2}")


def test_wrong_math_answer_is_well_formed_but_incorrect() -> None:
    grade = grade_answer(r"\boxed{3}", "4")
    assert (grade.correct, grade.format_ok, grade.extracted) == (False, True, "3")


def test_math_without_a_box_is_a_format_failure() -> None:
    # No fall-back to free-text extraction, even though "4" is right there.
    assert grade_answer("The answer is 4.", "4") == Grade(False, False, None)


def test_missing_think_tag_is_a_format_failure_only_when_required() -> None:
    assert grade_answer(r"\boxed{4}", "4", require_think=True) == Grade(False, False, None)
    assert grade_answer(r"\boxed{C}", "C", "choice", require_think=True).format_ok is False
    assert grade_answer(r"\boxed{4}", "4").correct


def test_box_written_while_thinking_does_not_count() -> None:
    response = r"<think>maybe \boxed{4}</think> I am not sure."
    assert grade_answer(response, "4", require_think=True) == Grade(False, False, None)
    assert grade_answer(r"<think>\boxed{3}</think> \boxed{4}", "4").correct


@pytest.mark.parametrize(
    ("response", "gold", "correct"),
    [
        ("ANSWER: C", "C", True),
        ("ANSWER: c", "C", False),  # a lower-case letter is not taken as a choice
        (r"\boxed{D}", "C", False),
        (r"\boxed{2}", "2", True),
        (r"\boxed{(A)}", " (a) ", True),  # the ground truth is normalised
    ],
)
def test_choice_grading(response: str, gold: str, correct: bool) -> None:
    assert grade_answer(response, gold, "choice").correct is correct


def test_grade_answer_times_out_and_recovers() -> None:
    # Through grade_answer the tower never reaches the worker: refused at once.
    refused = grade_answer(rf"\boxed{{{HANGS}}}", "4", timeout_s=1.0)
    assert (refused.correct, refused.format_ok, refused.timed_out) == (False, True, False)
    # Past the pre-filters, grade_answer's own pool still times it out and recovers.
    with _single_lock:
        assert _single_worker_pool()._run([("4", HANGS)], 1.0) == [(False, True)]
    assert grade_answer(r"\boxed{4}", "4").correct


def test_unknown_answer_type_is_an_error() -> None:
    with pytest.raises(ValueError, match="answer type"):
        grade_answer(r"\boxed{4}", "4", "essay")  # type: ignore[arg-type]


# --- BatchGrader -----------------------------------------------------------------------------


def test_batch_keeps_input_order_and_mixes_answer_types(grader: BatchGrader) -> None:
    responses = [r"\boxed{4}", "ANSWER: B", r"\boxed{5}", "no answer", r"\boxed{x^2+2x+1}"]
    golds = ["4", "B", "4", "4", "(x+1)^2"]
    types = ["math", "choice", "math", "math", "math"]
    grades = grader.grade(responses, golds, types)  # type: ignore[arg-type]
    assert [g.correct for g in grades] == [True, True, False, False, True]
    assert [g.extracted for g in grades] == ["4", "B", "5", None, "x^2+2x+1"]
    assert [g.format_ok for g in grades] == [True, True, True, False, True]


def test_batch_dedupes_identical_answers_without_mixing_them_up(grader: BatchGrader) -> None:
    responses = [rf"\boxed{{{i % 3}}}" for i in range(30)]
    grades = grader.grade(responses, ["1"] * 30)
    assert [g.correct for g in grades] == [i % 3 == 1 for i in range(30)]


def test_batch_rejects_mismatched_lengths(grader: BatchGrader) -> None:
    with pytest.raises(ValueError, match="same length"):
        grader.grade([r"\boxed{4}"], ["4", "5"])


def test_empty_batch(grader: BatchGrader) -> None:
    assert grader.grade([], []) == []


def test_one_worker_still_grades_in_a_worker_process() -> None:
    with BatchGrader(workers=1, timeout_s=TIMEOUT_S) as one:
        grades = one.grade([r"\boxed{4}", rf"\boxed{{{HANGS}}}", r"\boxed{2}"], ["4", "4", "2"])
        outcomes = one._run([("4", "4"), ("4", HANGS), ("2", "2")], TIMEOUT_S)
    assert [(g.correct, g.timed_out) for g in grades] == [
        (True, False),
        (False, False),  # refused before sympy
        (True, False),
    ]
    assert outcomes == [(True, False), (False, True), (True, False)]


def test_a_worker_killed_from_outside_is_replaced() -> None:
    with BatchGrader(workers=1, timeout_s=TIMEOUT_S) as one:
        # Fractions need math-verify (plain numbers take the fast path, no worker).
        assert one.grade([r"\boxed{\frac{8}{2}}"], ["4"])[0].correct  # the worker is up
        victim = one._workers[0].process
        os.kill(victim.pid, signal.SIGKILL)
        victim.join()
        grades = one.grade([r"\boxed{\frac{8}{2}}", r"\boxed{\frac{10}{2}}"], ["4", "5"])
        assert [g.correct for g in grades] == [True, True]
        assert one._workers[0].process.pid != victim.pid


def test_closed_grader_refuses_work() -> None:
    closed = BatchGrader(workers=1, timeout_s=TIMEOUT_S)
    closed.close()
    closed.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        closed.grade([r"\boxed{4}"], ["4"])


# --- adversarial input -----------------------------------------------------------------------

ADVERSARIAL = {
    "power tower": r"\boxed{9^9^9^9}",
    "braced power tower": r"\boxed{9^{9^{9^{9}}}}",
    "huge power": r"\boxed{10^{10^{10}}}",
    "10k nested braces": r"\boxed{" + "{" * 10_000 + "4" + "}" * 10_000 + "}",
    "100k characters": r"\boxed{" + "1+" * 50_000 + "2}",
    "100k characters of prose": "4 " * 50_000,
    "unbalanced box": r"\boxed{4",
    "unbalanced box after a balanced one": r"\boxed{4} \boxed{",
    "only braces": "}" * 1000 + "{" * 1000,
}


def test_adversarial_answers_are_incorrect_and_bounded_in_time(grader: BatchGrader) -> None:
    names = list(ADVERSARIAL)
    responses = [ADVERSARIAL[name] for name in names] + [r"\boxed{4}"]
    start = time.monotonic()
    grades = grader.grade(responses, ["4"] * len(responses))
    elapsed = time.monotonic() - start
    wrong = {name: grade for name, grade in zip(names, grades, strict=False) if grade.correct}
    assert not wrong
    assert grades[-1].correct  # the honest answer in the same batch is unaffected
    # Two workers, each answer bounded by its own deadline: at worst the timeouts run in pairs.
    timeouts = sum(g.timed_out for g in grades)
    assert elapsed < (timeouts / 2 + 1) * (TIMEOUT_S + 1) + 5
    assert grader.grade([r"\boxed{4}"], ["4"])[0].correct  # the pool still works


def test_pathological_answers_never_reach_sympy() -> None:
    nested = grade_answer(ADVERSARIAL["10k nested braces"], "4")
    long = grade_answer(ADVERSARIAL["100k characters"], "4")
    for grade in (nested, long):
        assert (grade.correct, grade.format_ok, grade.timed_out) == (False, True, False)
        assert grade.extracted is not None and len(grade.extracted) <= MAX_ANSWER_CHARS


def test_parent_kills_a_worker_that_cannot_stop_itself() -> None:
    """With the worker's own alarm switched off (a test-only seam), only the parent's
    deadline can end the answer: the worker is killed and replaced, the batch goes on."""
    with BatchGrader(workers=2, timeout_s=1.0) as killer:
        killer._worker_alarm = False
        pids_before = {worker.process.pid for worker in killer._workers}
        start = time.monotonic()
        outcomes = killer._run(
            [("4", HANGS), ("4", "4"), ("4", r"10^{10^{10}}"), ("5", "5")], killer.timeout_s
        )
        elapsed = time.monotonic() - start
        pids_after = {worker.process.pid for worker in killer._workers}
    assert outcomes == [
        (False, True),
        (True, False),
        (False, True),
        (True, False),
    ]
    assert pids_before.isdisjoint(pids_after)  # both hung workers were replaced
    assert elapsed < 2 * (1.0 + 0.5) + 5


# The (predicted, gold) pairs by the verdict the fast path must give them: True or False for plain
# numbers (integers compare exactly at any length; decimals within NUMERIC_REL_TOL of the gold),
# None for anything not a plain number, which only math-verify can tell.
FAST_PATH_VERDICTS: dict[bool | None, list[tuple[str, str]]] = {
    True: [
        ("42", "42"),
        ("42.0", "42"),
        ("+42", "42"),
        ("-0", "0"),
        ("0.50", "0.5"),
        (".5", "0.5"),
        ("0.3333333", "0.333333"),
        ("42.0000001", "42"),
        ("0.5000001", "0.5"),
    ],
    False: [
        ("43", "42"),
        ("-42", "42"),
        ("1" * 16, "1" * 15 + "2"),
        ("42.5", "42"),
        ("0.0000001", "0"),
    ],
    None: [
        ("1.", "1"),
        ("\\frac{84}{2}", "42"),
        ("42", "\\frac{84}{2}"),
        ("4,2", "42"),
        ("1e3", "1000"),
    ],
}


@pytest.mark.parametrize(
    ("predicted", "gold", "verdict"),
    [(p, g, verdict) for verdict, pairs in FAST_PATH_VERDICTS.items() for p, g in pairs],
)
def test_exact_number_fast_path_decides_only_the_sure_cases(predicted, gold, verdict):
    from relift_core.grading.grader import exact_number_verdict

    assert exact_number_verdict(predicted, gold) is verdict


# --- one reading of percent, one tolerance at every scale (issue 22) -------------------------

# (answer, gold, correct). A percent sign is a unit: `42\%` is 42, never 0.42. Where a decimal
# is involved, a number is right within NUMERIC_REL_TOL (5e-6) of the gold's magnitude.
READINGS = [
    (r"42\%", "42", True),
    (r"42\%", "0.42", False),  # was right too: one answer matched two golds
    (r"4200\%", "42", False),  # was right
    ("42", r"42\%", True),
    ("0.42", r"42\%", False),  # was right
    (r"62.5\,\%", "62.5%", True),
    ("8", r"$8 \%$", True),
    (r"42\text{ percent}", "42", True),
    (r"(20\%, 30\%)", "(20, 30)", True),
    ("0.5000001", "0.5", True),
    ("42.0000001", "42", True),  # was wrong while 0.5000001 was right
    ("42.001", "42", False),
    ("0.5001", "0.5", False),
    (r"\frac{1}{3}", "0.333333", True),
    ("0.333333", r"\frac13", True),
    (r"1.0000001 \times 10^{-9}", r"10^{-9}", True),
    (r"2 \times 10^{-9}", r"10^{-9}", False),  # six decimal places made both 0
    ("0.0000001", "0", False),
    ("(0.5000001, 42.0000001)", "(0.5, 42)", True),  # inside tuples too
    ("(0.5001, 42)", "(0.5, 42)", False),
]


@pytest.mark.parametrize(("answer", "gold", "correct"), READINGS)
def test_one_reading_of_percent_and_a_relative_tolerance(grader, answer, gold, correct) -> None:
    [grade] = grader.grade([rf"\boxed{{{answer}}}"], [gold])
    assert (grade.correct, grade.format_ok, grade.timed_out) == (correct, True, False)
    assert grade.extracted == answer  # the record keeps the answer as written


def test_no_answer_matches_two_different_golds(grader) -> None:
    """Each answer is right for at most one of golds that differ (42 and 0.42, 0.5 and 0.5001)."""
    answers = [r"42\%", r"4200\%", "42", "0.42", r"0.42\%", "0.5000001", "0.5"]
    golds = ["42", "0.42", "4200", r"42\%", "0.5", "0.5001"]
    pairs = [(a, g) for a in answers for g in golds]
    grades = grader.grade([rf"\boxed{{{a}}}" for a, _ in pairs], [g for _, g in pairs])
    right: dict[str, set[str]] = {}
    for (answer, gold), grade in zip(pairs, grades, strict=True):
        if grade.correct:
            right.setdefault(answer, set()).add(gold.replace("\\%", ""))
    assert all(len(values) == 1 for values in right.values()), right
