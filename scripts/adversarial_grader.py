"""Grades thousands of adversarial answers and checks that none is graded correct and none
reaches the timeout (issue 13, item 4).

Every answer is wrong by construction (a relation between values, a hedge or alternative, TeX
programming, garbage around the gold, or a pathological expression built around a value that
is not the gold), written against golds from the evaluation sets in ../shared/benchmarks when
they are there (else a built-in list). Families: relations, hedges/alternatives, TeX
programming, deep nesting at every depth 1..40, power towers, factorial chains, huge numbers,
long garbage ending in the gold, very long strings, strings that made the choice extractor
backtrack, and mixtures of them.

The families' forms are data, in scripts/adversarial_forms.yaml beside this script: each a
template that the family fills with the values it draws.

It grades them all in one batch with BatchGrader(workers=2) (throughput), then times every
answer that reached a worker on its own (the slowest single answer), and prints:

    .venv/bin/python scripts/adversarial_grader.py            # 10,000 answers, seed 0
    .venv/bin/python scripts/adversarial_grader.py --n 20000 --seed 1

Exits 1 when an answer was graded correct or timed out.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import yaml

from relift_core.grading.extraction import AnswerType
from relift_core.grading.grader import BatchGrader, Grade, _MathJob, _prepare

DEFAULT_BENCHMARKS = Path(__file__).resolve().parent.parent.parent / "shared" / "benchmarks"
BENCHMARK_FILES = ("math_valid.parquet",)
# The catalogue of attack forms, family by family: data beside this script.
FORMS_FILE = Path(__file__).with_name("adversarial_forms.yaml")
BUILT_IN_GOLDS = [
    "42",
    "0",
    "-7",
    "1996",
    "3.5",
    "0.25",
    r"\frac{1}{2}",
    r"\frac{3}{4}",
    r"\sqrt{2}",
    r"2\sqrt{3}",
    r"\pi",
    r"12\pi",
    r"42^\circ",
    "1, 2",
    "(2,4)",
    r"(-\infty, 0]",
    "x=5",
    "y = 2x + 3",
    r"k \geqslant 2",
    r"\text{even}",
    r"3 \pm 2 \sqrt{2}",
    "2k+2",
    r"\begin{pmatrix} 1 & 0 \\ 0 & 1 \end{pmatrix}",
    "1e-5",
    r"2^{1009}",
]
TIMEOUT_S = 5.0
# Not a gold anywhere, and never equal to one: the wrong value inside pathological answers.
WRONG = "1234567"

Case = tuple[str, str, AnswerType, str]  # (response, gold, answer type, family)


def load_golds(benchmarks: Path) -> list[str]:
    if not (benchmarks / "math_valid.parquet").exists():
        return list(BUILT_IN_GOLDS)
    import pandas as pd

    frame = pd.concat([pd.read_parquet(benchmarks / name) for name in BENCHMARK_FILES])
    golds = frame["reward_model"].map(lambda reward_model: reward_model["ground_truth"])
    return sorted(set(golds))


def _plain(gold: str) -> str:
    """The gold without its `$...$` wrapper, as it would sit in a box."""
    return gold.strip().strip("$").strip()


def _other(gold: str) -> str:
    """A value that differs from the gold: the integer plus one, else the fixed wrong value."""
    if re.fullmatch(r"[+-]?\d{1,15}", gold.strip()):
        return str(int(gold) + 1)
    return WRONG


def _boxed(answer: str, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"<think>\nLet me think.\n</think>\nThe final answer is $\\boxed{{{answer}}}$."
    return f"\\boxed{{{answer}}}"


# --- families: each returns an answer (boxed content) that must be graded wrong --------------


def load_forms(path: Path) -> dict[str, list[str]]:
    """Each family's forms: str.format templates over the values the family draws."""
    with path.open(encoding="utf-8") as stream:
        forms: dict[str, list[str]] = yaml.safe_load(stream)
    return forms


FORMS = load_forms(FORMS_FILE)


def _render(family: str, rng: random.Random, **values: object) -> str:
    """One of the family's forms, drawn by rng, filled with the values."""
    form: str = rng.choice(FORMS[family])
    return form.format(**values)


def _runs(length: int, **units: str) -> dict[str, str]:
    """Each unit repeated `length` times, under its name: the long runs the forms hold."""
    return {name: unit * length for name, unit in units.items()}


def relations(gold: str, rng: random.Random) -> str:
    return _render("relations", rng, g=_plain(gold), w=_other(gold))


HEDGE_TEXT = [
    "or maybe",
    "or",
    "possibly",
    "approximately",
    "not",
    "either",
    "or perhaps",
    "unless",
]


def hedges(gold: str, rng: random.Random) -> str:
    word = rng.choice(HEDGE_TEXT)
    return _render("hedges", rng, g=_plain(gold), w=WRONG, word=word)


def tex_programming(gold: str, rng: random.Random) -> str:
    return _render("tex_programming", rng, g=_plain(gold), w=WRONG)


# The shapes of deep nesting, each an opening and its closing, repeated to the depth.
NESTS = {
    "brace": ("{", "}"),
    "paren": ("(", ")"),
    "bracket": ("[", "]"),
    "left": ("\\left(", "\\right)"),
    "frac": ("\\frac{", "}{1}"),
    "sqrt": ("\\sqrt{", "}"),
}


def nesting(gold: str, rng: random.Random, depth: int | None = None) -> str:
    """Depth 1..40 of braces, parentheses, brackets, fractions, roots and mixtures, around a
    wrong value (or around a relation with the gold)."""
    depth = depth if depth is not None else rng.randint(1, 40)
    inner = rng.choice([WRONG, f"{WRONG} = {_plain(gold)}", f"{_plain(gold)}, {WRONG}"])
    kind = rng.choice([*NESTS, "mixed"])
    if kind in NESTS:
        opening, closing = NESTS[kind]
        return opening * depth + inner + closing * depth
    opens = [rng.choice("{([") for _ in range(depth)]
    closes = {"{": "}", "(": ")", "[": "]"}
    return "".join(opens) + inner + "".join(closes[o] for o in reversed(opens))


def power_towers(gold: str, rng: random.Random) -> str:
    return _render("power_towers", rng, w=WRONG)


def factorial_chains(gold: str, rng: random.Random) -> str:
    count = rng.randint(2, 30)
    w = rng.choice([WRONG, "42", "9", "100", "3"])
    return _render("factorial_chains", rng, w=w, bangs="!" * count)


def huge_numbers(gold: str, rng: random.Random) -> str:
    digits = rng.randint(41, 400)
    # Drawn in this order (keyword arguments are evaluated left to right), so that a seed
    # builds the same answers as when the forms were written in the code.
    return _render(
        "huge_numbers",
        rng,
        g=_plain(gold),
        w=WRONG,
        **_runs(digits, ones="1", zeros="0", nines="9"),
        short_nines="9" * rng.randint(3, 12),
        power=10 ** rng.randint(5, 12),
        thousands="1,000" * rng.randint(14, 60),
        tiny_exponent=10 ** rng.randint(5, 9),
        exponent=digits * 10,
        long_nines="9" * rng.randint(6, 30),
    )


GARBAGE = list("0123456789+-*/^_(){}[],.;:=<>!|'~ ") + [
    r"\lim",
    r"\sum",
    r"\int",
    r"\,",
    r"\;",
    r"\quad",
    "e",
    "x",
    r"\frac",
    r"\text{a}",
    r"\\",
]
POISON = ["2e,,(=", ",", "1=", r"\lim", ")(", "<", ";", "(=", ",,", "=>"]


def garbage(gold: str, rng: random.Random) -> str:
    """Random text that always holds a poison (a relation, a separator, a stray bracket, a
    command that is no value), then the gold, as in `2e,,(=42\\lim`."""
    body = "".join(rng.choice(GARBAGE) for _ in range(rng.randint(0, 60)))
    poison = rng.choice(POISON)
    cut = rng.randint(0, len(body))
    answer = body[:cut] + poison + body[cut:] + _plain(gold)
    if rng.random() < 0.3:
        answer += rng.choice([r"\lim", ")", "=", ","])
    # Keep the box closable: balance the braces the garbage opened.
    balance = answer.count("{") - answer.count("}")
    return answer + "}" * max(0, balance) if balance >= 0 else "{" * -balance + answer


def very_long(gold: str, rng: random.Random) -> str:
    size = rng.randint(2_000, 100_000)
    runs = _runs(size, spaces=" ", xs="x", parens="(", dashes="-", zeros="0", bangs="!")
    runs |= _runs(size // 2, one_plus="1+", open_braces="{", close_braces="}", a_plus="a+")
    runs |= _runs(size // 2, thin_spaces="\\,", superscripts="^{")
    runs |= _runs(size // 6, quads="\\quad ")
    return _render("very_long", rng, g=_plain(gold), w=WRONG, **runs)


def choice_backtracking(rng: random.Random) -> tuple[str, str]:
    """A multiple-choice response that made the old answer-line regex backtrack, and its gold
    (never the letter it might yield)."""
    size = rng.randint(5_000, 40_000)
    runs = _runs(size, spaces=" ") | _runs(size // 2, open_parens=" (")
    runs |= _runs(size // 3, iss="IS ", whitespace=" \t\n")
    runs |= _runs(size // 6, texts="\\text{", answers="answer") | _runs(size // 6 + 1, closes="}")
    runs |= _runs(size // 107, padded_answers="answer " + " " * 100)
    return _render("choice_backtracking", rng, **runs), "C"


FAMILIES: dict[str, Callable[[str, random.Random], str]] = {
    "relations": relations,
    "hedges/alternatives": hedges,
    "TeX programming": tex_programming,
    "deep nesting": nesting,
    "power towers": power_towers,
    "factorial chains": factorial_chains,
    "huge numbers": huge_numbers,
    "garbage ending in the gold": garbage,
    "very long strings": very_long,
}


def mixed(gold: str, rng: random.Random) -> str:
    """Two families' answers combined: one inside the other, or side by side."""
    first, second = rng.sample([f for f in FAMILIES.values() if f is not very_long], 2)
    a, b = first(gold, rng), second(gold, rng)
    return rng.choice([f"{a} {b}", f"{{{a}}} = {b}", f"{a}, {b}", a.replace(_plain(gold), b, 1)])


def build(n: int, seed: int, golds: list[str]) -> list[Case]:
    rng = random.Random(seed)
    cases: list[Case] = []
    families = [*FAMILIES, "mixed", "choice backtracking"]
    # Every nesting depth 1..40, in every shape, against a few golds first.
    for depth in range(1, 41):
        gold = golds[depth % len(golds)]
        cases.append((_boxed(nesting(gold, rng, depth), rng), gold, "math", "deep nesting"))
    while len(cases) < n:
        family = families[len(cases) % len(families)]
        if family == "choice backtracking":
            response, gold = choice_backtracking(rng)
            cases.append((response, gold, "choice", family))
            continue
        gold = rng.choice(golds)
        answer = mixed(gold, rng) if family == "mixed" else FAMILIES[family](gold, rng)
        cases.append((_boxed(answer, rng), gold, "math", family))
    return cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="answers to grade (default 10000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--benchmarks", type=Path, default=DEFAULT_BENCHMARKS)
    args = parser.parse_args()

    golds = load_golds(args.benchmarks)
    source = (
        f"{len(golds)} golds from {args.benchmarks}"
        if args.benchmarks.exists()
        else (f"{len(golds)} built-in golds")
    )
    cases = build(args.n, args.seed, golds)
    responses = [c[0] for c in cases]
    gold_list = [c[1] for c in cases]
    types: list[AnswerType] = [c[2] for c in cases]

    with BatchGrader(workers=2, timeout_s=TIMEOUT_S) as grader:
        grader.grade([r"\boxed{1}"], ["1"])  # wait for the workers to start
        start = time.monotonic()
        grades = grader.grade(responses, gold_list, types)
        elapsed = time.monotonic() - start

        # The slowest single answer: the pre-filters timed in this process, and every answer
        # that reached a worker graded again on its own.
        slowest, slowest_case = 0.0, ""
        reached = 0
        for response, gold, answer_type, family in cases:
            began = time.perf_counter()
            prepared = _prepare(response, gold, answer_type, False)
            if isinstance(prepared, _MathJob):
                reached += 1
                grader.grade([response], [gold], answer_type)
            took = time.perf_counter() - began
            if took > slowest:
                slowest, slowest_case = took, f"{family}: {response[:80]!r}"

    wrong = [(c, g) for c, g in zip(cases, grades, strict=True) if g.correct]
    timeouts = [(c, g) for c, g in zip(cases, grades, strict=True) if g.timed_out]
    per_family = Counter(c[3] for c in cases)
    print(f"golds: {source}; seed {args.seed}")
    print("families: " + ", ".join(f"{name} {count}" for name, count in per_family.items()))
    print(f"answers graded: {len(cases)}")
    print(f"reached a worker (passed the pre-filters): {reached}")
    print(f"wrongly-correct: {len(wrong)}")
    print(f"timeouts: {len(timeouts)}")
    print(f"max seconds per answer: {slowest:.3f} ({slowest_case})")
    print(f"throughput: {len(cases) / elapsed:.0f} answers/s ({elapsed:.2f} s for the batch)")
    for (response, gold, _, family), grade in (wrong + timeouts)[:20]:
        print(f"  FAIL {family}: gold {gold!r}, {_describe(grade)}: {response[:200]!r}")
    return 1 if wrong or timeouts else 0


def _describe(grade: Grade) -> str:
    return "timed out" if grade.timed_out else f"graded correct (extracted {grade.extracted!r})"


if __name__ == "__main__":  # the grader's workers come from a fork server: keep this guard
    sys.exit(main())
