"""The grader against answers built to game it or to stall it (issue 13, item 4).

An answer is correct only if the boxed expression AS A WHOLE equals the gold: relations between
values, hedges and alternatives, TeX programming and garbage around the gold are wrong. And no
answer may cost a worker's timeout: the pre-filters in relift_core/grading/answer_checks.py refuse
pathological input before sympy sees it, in the calling process, in well under a second.
scripts/adversarial_grader.py runs the same families at scale (10,000+ answers)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from relift_core.grading.answer_checks import (
    _SCIENTIFIC,
    MAX_ANSWER_CHARS,
    MAX_GOLD_CHARS,
    MAX_NESTING_DEPTH,
    _gold,
    rejection,
)
from relift_core.grading.extraction import extract_choice
from relift_core.grading.grader import BatchGrader, _prepare, grade_answer
from scripts import adversarial_grader

# Generous against a loaded 2-core machine; the slow cases must not come near it anyway.
TIMEOUT_S = 5.0
# What "graded fast" means: the pre-filters take microseconds; this leaves room for load.
FAST_S = 0.5


@pytest.fixture(scope="module")
def grader() -> Iterator[BatchGrader]:
    with BatchGrader(workers=2, timeout_s=TIMEOUT_S) as batch_grader:
        yield batch_grader


def _boxed(answer: str) -> str:
    return f"<think>\nwork\n</think>\nThe final answer is $\\boxed{{{answer}}}$."


# --- every failure the issue lists: graded CORRECT against 42 before the fix -----------------

GAMED = {
    "value equals value": r"43 = 42",
    "gold equals value": r"42 = 43",
    "approx": r"42 \approx 43",
    "hedge in text": r"42 \text{ (or maybe 43)}",
    "inequality": r"\geq 42",
    "let": r"\let\x=42",
    "csname": r"\csname relax\endcsname 42",
    "catcode": r"\catcode`\{=12 42",
    "garbage ending in the gold": r"2e,,(=42\lim",
}

# More of the same kinds, each wrong against 42.
WRONG = {
    "less than": r"41 < 42",
    "le": r"\le 42",
    "leq": r"42 \leq 43",
    "neq": r"42 \neq 43",
    "sim": r"42 \sim 43",
    "unicode approx": "42 ≈ 43",
    "chained assignment": r"x = 43 = 42",
    "constant assigned": r"\pi = 42",
    "comma": "42, 43",
    "or": "42 or 43",
    "text or": r"42 \text{ or } 43",
    "pm": r"42 \pm 1",
    "set": r"\{42, 43\}",
    "semicolon": "42; 43",
    "lor": r"42 \lor 43",
    "new row": r"42 \\ 43",
    "question mark": "42?",
    "about": r"\text{about } 42",
    "numbers in text": r"42 \text{ (43)}",
    "mathrm or": r"\mathrm{or}\ 42",
    "def": r"\def\x{42}\x",
    "edef": r"\edef\x{42}\x",
    "newcommand": r"\newcommand{\x}{42}\x",
    "expandafter": r"\expandafter 42",
    "input": r"\input{a} 42",
    "relax": r"\relax 42",
    "phantom": r"\phantom{0}42",
    "color": r"\color{white}{0}42",
    "nested box": r"43 \boxed{42}",
    "comment": "42 % 43",
    "juxtaposed numbers (math-verify adds them)": "20 22",
    "juxtaposed groups": "(20)(22)",
    "juxtaposed braces": "{20}{22}",
    "number and group": "2(40)",
    "thin space": r"20\,22",
    "text between numbers": r"20 \text{ apples } 22",
    "cancelled variable": "x - x + 42",
    "garbage with lim": r"\lim 42",
    "unbalanced": ")42(",
}

# Pathological input: before the fix each of these ran seconds or to the 5 s timeout.
SLOW = {
    "brace depth 8": "{" * 8 + "43" + "}" * 8,
    "brace depth 12": "{" * 12 + "43" + "}" * 12,
    "brace depth 14": "{" * 14 + "43" + "}" * 14,
    "brace depth 31": "{" * 31 + "43" + "}" * 31,
    "parenthesis depth 40": "(" * 40 + "43" + ")" * 40,
    "tower 9^9^9^9": r"9^{9^{9^9}}",
    "tower 10^10^10": r"10^{10^{10}}",
    "tower 9^9^9": r"9^{9^9}",
    "double superscript": "9^9^9",
    "root of a huge power": r"9^{\sqrt{9^{99}}}",
    "scientific exponent": r"10^{1e9}",
    "factorial chain": "42!!!!!!",
    "nested factorial": "(3!)!",
    "huge factorial": "100000!",
    "huge binomial": r"\binom{100000}{50000}",
    "50-digit number": "1" * 50,
    "huge scientific": "1e999999",
    "symbolic expansion": "(a+b+c+d)^{24}",
    "long symbolic expansion": "(x+1)^{1000}",
    "product expansion": "(a+b)(c+d)(e+f)(g+h)(j+k)(m+n)(p+q)(r+s)",
}

# Honest forms: each right against its gold.
HONEST = [
    ("42", "42"),
    ("42", " 42 "),
    ("42", "42.0"),
    ("42", r"\frac{84}{2}"),
    ("42", r"\text{42}"),
    ("42", r"\textbf{42}"),
    ("42", "x=42"),
    ("42", r"x = 42"),
    ("42", r"\left(42\right)"),
    ("42", r"6 \cdot 7"),
    (r"42^\circ", r"42^\circ"),
    (r"\frac12", r"\dfrac{1}{2}"),
    ("0.5", r"\frac{1}{2}"),
    ("x=5", "5"),
    ("y = 2x + 3", "2x+3"),
    ("2k+2", "2(k+1)"),
    ("(2,4)", "(2, 4)"),
    ("1, 2", "2,1"),
    (r"(-\infty, 0]", r"(-\infty,0]"),
    (r"(-\infty, 2) \cup (3, \infty)", r"(-\infty,2)\cup(3,\infty)"),
    (r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}", r"\begin{pmatrix}-1&0\\0&-1\end{pmatrix}"),
    ("k \\geqslant 2", "k \\geqslant 2"),
    (r"5.4 \text{ cents}", r"5.4 \text{ cents}"),
    ("58,500", "58500"),
    (r"2^{1009}", r"2^{1009}"),
    (r"1\frac{4}{5}", r"\frac{9}{5}"),
    (r"3 \pm 2 \sqrt{2}", r"3 \pm 2\sqrt{2}"),
]


def _assert_refused_fast(grade, elapsed: float) -> None:
    assert (grade.correct, grade.format_ok, grade.timed_out) == (False, True, False)
    assert elapsed < FAST_S


@pytest.mark.parametrize("answer", list(GAMED.values()), ids=list(GAMED))
def test_listed_gamed_answers_are_wrong(answer: str) -> None:
    assert rejection(answer, "42") is not None
    start = time.monotonic()
    grade = grade_answer(_boxed(answer), "42", require_think=True)
    _assert_refused_fast(grade, time.monotonic() - start)


@pytest.mark.parametrize("answer", list(WRONG.values()), ids=list(WRONG))
def test_relations_hedges_and_programming_are_wrong(answer: str) -> None:
    grade = grade_answer(_boxed(answer), "42", require_think=True)
    assert not grade.correct and not grade.timed_out


@pytest.mark.parametrize("answer", list(SLOW.values()), ids=list(SLOW))
def test_pathological_answers_are_refused_fast_without_a_timeout(answer: str) -> None:
    start = time.monotonic()
    grade = grade_answer(_boxed(answer), "42", require_think=True)
    _assert_refused_fast(grade, time.monotonic() - start)
    # Refused before sympy: the pre-filter itself says so, in the calling process.
    assert rejection(answer, "42") is not None


def test_slow_answers_in_one_batch_take_no_worker_time(grader: BatchGrader) -> None:
    answers = list(SLOW.values()) + list(GAMED.values())
    start = time.monotonic()
    grades = grader.grade(
        [_boxed(a) for a in answers] + [_boxed("42")], ["42"] * (len(answers) + 1)
    )
    elapsed = time.monotonic() - start
    assert not any(g.correct or g.timed_out for g in grades[:-1])
    assert grades[-1].correct  # the honest answer in the same batch
    assert elapsed < 5 * FAST_S


@pytest.mark.parametrize("depth", range(1, 41))
def test_every_brace_depth_is_graded_fast(depth: int) -> None:
    """Cost used to grow exponentially with depth below the old cut-off of 32."""
    answer = _boxed("{" * depth + "43" + "}" * depth)
    # Exponential cost is slow on every try; a loaded machine's pause, on one (_best_of).
    wrong, elapsed = _best_of(2, lambda: grade_answer(answer, "42"))
    assert not wrong.correct and not wrong.timed_out
    assert elapsed < TIMEOUT_S / 2
    refused = _prepare(_boxed("{" * depth + "43" + "}" * depth), "42", "math", False)
    assert (depth > MAX_NESTING_DEPTH) == (not hasattr(refused, "predicted"))


@pytest.mark.parametrize(("gold", "answer"), HONEST, ids=[a for _, a in HONEST])
def test_honest_forms_stay_right(gold: str, answer: str) -> None:
    assert rejection(answer, gold) is None
    assert grade_answer(_boxed(answer), gold, require_think=True).correct


@pytest.mark.parametrize(
    ("gold", "answer"),
    [
        ("1, 2", "1, 2, 3"),  # a list longer than the gold's
        ("(2,4)", "(2,4), (4,2)"),
        ("x=5", "x = 5 = 6"),
        ("k \\geqslant 2", r"k \geqslant 2 \text{ or } k \le 1"),
        (r"3 \pm 2 \sqrt{2}", r"3 \pm 2 \sqrt{2} \pm 1"),
        ("42", "42,000"),  # a thousands separator makes 42000, not an alternative
    ],
)
def test_structured_golds_do_not_open_the_door(gold: str, answer: str) -> None:
    assert not grade_answer(_boxed(answer), gold).correct


# --- the multiple-choice extractor runs in linear time ---------------------------------------

BACKTRACKING = {
    "spaces after answer": "answer" + " " * 40_000 + "!",
    "spaces after answer is": "Answer is" + " " * 40_000 + "!",
    "separators": "answer:" + " (" * 20_000,
    "repeated answer": ("answer " + " " * 100) * 400,
    "nested text box": "\\boxed{" + "\\text{" * 5_000 + "A" + "}" * 5_001,
    "many answers": "answer" * 10_000,
}


@pytest.mark.parametrize("text", list(BACKTRACKING.values()), ids=list(BACKTRACKING))
def test_choice_extraction_is_linear(text: str) -> None:
    # Linear is milliseconds here; the bound leaves room for a loaded 2-core machine and still
    # catches the backtracking (19 s for the first one).
    start = time.monotonic()
    extract_choice(text)
    assert time.monotonic() - start < 1.0
    start = time.monotonic()
    grade = grade_answer(text, "C", "choice")
    assert not grade.correct
    assert time.monotonic() - start < 1.0


def test_choice_extraction_still_finds_answers_after_long_runs() -> None:
    assert extract_choice("answer" + " " * 40_000 + "C") == "C"
    assert extract_choice("The answer is" + " " * 10_000 + "(B)") == "B"


# --- every step before the pool is linear in the answer's length (issue 22) ------------------

# Each shape is built to make one pre-filter re-read its input: digit runs (the scientific-
# notation pattern tried every split of every suffix of a run: 4 s at 1,000 digits, 54 s at
# 2,000), stray closing brackets before opening ones (each operand lookup read to the end).
LONG_SHAPES = {
    "digits": lambda n: "1" * n,
    "digits then e": lambda n: "1" * (n - 2) + "e5",
    "decimal digits": lambda n: "0." + "1" * (n - 2),
    "closes then opens": lambda n: ")" * (n // 2) + "(" * (n // 2),
    "open sums": lambda n: "(a+" * (n // 3),
    "factorials": lambda n: "2!" * (n // 2),
    "juxtaposed groups": lambda n: "(1)" * (n // 3),
    "spaces": lambda n: "1" + " " * (n - 2) + "1",
}


def _best_of(tries: int, check):
    """The check's result and its fastest time of `tries`: a quadratic pre-filter is slow on
    every try, a scheduler pause on a loaded CI machine (0.97 s once for a 5 ms check) on one."""
    timings = []
    for _ in range(tries):
        start = time.monotonic()
        result = check()
        timings.append(time.monotonic() - start)
    return result, min(timings)


@pytest.mark.parametrize("shape", list(LONG_SHAPES.values()), ids=list(LONG_SHAPES))
@pytest.mark.parametrize("length", [2_000, 100_000])
def test_long_boxed_answers_are_graded_fast(shape, length: int) -> None:
    answer = shape(length)
    for gold in ("42", "1" * MAX_GOLD_CHARS):
        # gold=gold: bound now, though _best_of calls it before the loop moves on anyway.
        grade, elapsed = _best_of(3, lambda gold=gold: _prepare(_boxed(answer), gold, "math", True))
        assert elapsed < FAST_S, (gold[:5], length)
        assert getattr(grade, "correct", None) is False  # refused before any worker


@pytest.mark.parametrize("shape", list(LONG_SHAPES.values()), ids=list(LONG_SHAPES))
def test_the_longest_gold_and_answer_are_checked_fast(shape) -> None:
    """Both at their bounds, so every check reads them in full (the gold's side is what the
    50 MB ground truth kept busy for 10 min)."""
    gold, answer = shape(MAX_GOLD_CHARS), shape(MAX_ANSWER_CHARS)

    def check():
        _gold.cache_clear()
        return rejection(answer, gold)

    _, elapsed = _best_of(3, check)
    assert elapsed < FAST_S  # 17.8 s for the digits before the fix


def test_the_scientific_notation_pattern_reads_a_digit_run_once() -> None:
    start = time.monotonic()
    assert _SCIENTIFIC.search("1" * 100_000) is None
    assert _SCIENTIFIC.search("1" * 100_000 + "e5") is not None
    assert time.monotonic() - start < 0.1

    # What it reads is unchanged: a number written with an exponent, not a letter after one.
    def found(text: str) -> list[tuple[str | None, ...]]:
        return [m.groups() for m in _SCIENTIFIC.finditer(text)]

    assert found("1.2e-3") == [("1.2", "-3")] and found(".5E3") == [(".5", "3")]
    assert found("10^{1e9}") == [("1", "9")] and found("x1e5") == [] and found("2e") == []


def test_a_gold_past_the_bound_is_refused_not_graded() -> None:
    with pytest.raises(ValueError, match="ground truth of 50,000,000 characters"):
        _prepare(_boxed("42"), "4" * 50_000_000, "math", False)


# --- scripts/adversarial_forms.yaml: the script's catalogue of forms --------------------------


class _EveryChoice(random.Random):
    """Takes the index-th item of every choice: each form in turn, not one drawn at random."""

    def __init__(self, index: int) -> None:
        super().__init__(0)
        self.index = index

    def choice(self, seq: Any) -> Any:
        return seq[self.index % len(seq)]


@pytest.mark.parametrize("family", sorted(adversarial_grader.FORMS))
def test_every_form_of_a_family_renders_with_the_values_it_draws(family: str) -> None:
    """A placeholder the family does not draw, or a brace left single, fails here rather than
    in the one seed that happens to draw that form."""
    forms = adversarial_grader.FORMS[family]

    def render(index: int) -> str:
        if family == "choice_backtracking":
            return adversarial_grader.choice_backtracking(_EveryChoice(index))[0]
        attack: Callable[[str, random.Random], str] = getattr(adversarial_grader, family)
        return attack("42", _EveryChoice(index))

    assert len({render(index) for index in range(len(forms))}) == len(forms)
