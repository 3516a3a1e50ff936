"""Grades thousands of adversarial answers and checks that none is graded correct and none
reaches the timeout (issue 13, item 4).

Every answer is wrong by construction (a relation between values, a hedge or alternative, TeX
programming, garbage around the gold, or a pathological expression built around a value that
is not the gold), written against golds from the evaluation sets in ../shared/benchmarks when
they are there (else a built-in list). Families: relations, hedges/alternatives, TeX
programming, deep nesting at every depth 1..40, power towers, factorial chains, huge numbers,
long garbage ending in the gold, very long strings, strings that made the choice extractor
backtrack, and mixtures of them.

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

from relift_core.grading.extraction import AnswerType
from relift_core.grading.grader import BatchGrader, Grade, _MathJob, _prepare

DEFAULT_BENCHMARKS = Path(__file__).resolve().parent.parent.parent / "shared" / "benchmarks"
BENCHMARK_FILES = ("math_valid.parquet",)
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


def relations(gold: str, rng: random.Random) -> str:
    g, w = _plain(gold), _other(gold)
    forms = [
        f"{w} = {g}",
        f"{g} = {w}",
        f"{g} \\approx {w}",
        f"{w} < {g}",
        f"{g} > {w}",
        f"\\geq {g}",
        f"\\le {g}",
        f"\\leq {g}",
        f"{g} \\neq {w}",
        f"{g} \\ne {w}",
        f"{g} \\sim {w}",
        f"{g} \\equiv {w}",
        f"{w} \\to {g}",
        f"{w} \\Rightarrow {g}",
        f"x = {w} = {g}",
        f"{w} := {g}",
        f"{g} ≈ {w}",
        f"{w} ≤ {g}",
        f"{g} \\simeq {w}",
        f"\\pi = {g}",
        f"{w} \\leqslant {g}",
        f"{g} \\gtrsim {w}",
        f"{g} \\propto {w}",
        f"{w} \\cong {g}",
        f"{w}={g}",
        f"{w} \\iff {g}",
        f"{g} \\lt {w}",
    ]
    return rng.choice(forms)


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
    g, w = _plain(gold), WRONG
    word = rng.choice(HEDGE_TEXT)
    forms = [
        f"{g} \\text{{ ({word} {w})}}",
        f"{g}, {w}",
        f"{w}, {g}",
        f"{g} or {w}",
        f"{w} or {g}",
        f"{g} \\pm 1",
        f"{g} \\mp 1",
        f"{g} \\text{{ {word} }} {w}",
        f"{g}; {w}",
        f"\\{{{g}, {w}\\}}",
        f"{g} \\lor {w}",
        f"{g} \\vee {w}",
        f"{g} \\\\ {w}",
        f"{g} & {w}",
        f"{g}?",
        f"\\text{{about }} {g}",
        f"{g} \\text{{ (approx.)}}",
        f"{g} \\quad ({w})",
        f"{g} \\text{{ ({w})}}",
        f"{g} \\text{{ or }} {w}",
        f"\\mathrm{{or}}\\ {g}",
        f"{g} \\ldots {w}",
        f"{g}, \\dots",
        f"{w} \\cup {g}",
        f"{g} \\text{{ and }} {w}",
        f"{g} \\; ({w})",
        f"{g} \\text{{ {word} }}",
        f"{g} ± 1",
        f"{g} : {w}",
    ]
    return rng.choice(forms)


def tex_programming(gold: str, rng: random.Random) -> str:
    g = _plain(gold)
    forms = [
        f"\\let\\x={g}",
        f"\\def\\x{{{g}}}\\x",
        f"\\csname relax\\endcsname {g}",
        f"\\catcode`\\{{=12 {g}",
        f"\\edef\\x{{{g}}}\\x",
        f"\\newcommand{{\\x}}{{{g}}}\\x",
        f"\\expandafter {g}",
        f"\\input{{{g}}}",
        f"\\relax {g}",
        f"\\gdef\\y{{{WRONG}}}{g}",
        f"\\renewcommand{{\\y}}{{{g}}}\\y",
        f"\\providecommand{{\\z}}{{{g}}}",
        f"\\makeatletter {g}",
        f"\\the\\numexpr {g}",
        f"\\string {g}",
        f"\\noexpand {g}",
        f"\\begingroup {g} \\endgroup",
        f"\\global\\let\\x={g}",
        f"\\uppercase{{{g}}}",
        f"\\romannumeral {g}",
        f"\\phantom{{{WRONG}}}{g}",
        f"\\color{{white}}{{{WRONG}}}{g}",
        f"\\iffalse {WRONG} \\fi {g}",
        f"\\cancel{{{WRONG}}} {g}",
        f"\\hspace{{1cm}}{g}",
        f"\\def\\a#1{{#1}}\\a{{{g}}}",
        f"\\lim {g}",
        f"\\boxed{{{g}}}",
        f"{WRONG} \\boxed{{{g}}}",
        f"\\tag{{{WRONG}}} {g}",
        f"\\verb|{g}|",
        f'\\mathchar"34 {g}',
        f"^^34{g}",
        f"\\afterassignment\\x {g}",
        f"\\count0={g}",
        f"\\detokenize{{{g}}}",
        f"{WRONG} % {g}",
        f"\\not {WRONG} {g}",
    ]
    return rng.choice(forms)


def nesting(gold: str, rng: random.Random, depth: int | None = None) -> str:
    """Depth 1..40 of braces, parentheses, brackets, fractions, roots and mixtures, around a
    wrong value (or around a relation with the gold)."""
    depth = depth if depth is not None else rng.randint(1, 40)
    inner = rng.choice([WRONG, f"{WRONG} = {_plain(gold)}", f"{_plain(gold)}, {WRONG}"])
    kind = rng.choice(["brace", "paren", "bracket", "left", "frac", "sqrt", "mixed"])
    if kind == "brace":
        return "{" * depth + inner + "}" * depth
    if kind == "paren":
        return "(" * depth + inner + ")" * depth
    if kind == "bracket":
        return "[" * depth + inner + "]" * depth
    if kind == "left":
        return "\\left(" * depth + inner + "\\right)" * depth
    if kind == "frac":
        return "\\frac{" * depth + inner + "}{1}" * depth
    if kind == "sqrt":
        return "\\sqrt{" * depth + inner + "}" * depth
    opens = [rng.choice("{([") for _ in range(depth)]
    closes = {"{": "}", "(": ")", "[": "]"}
    return "".join(opens) + inner + "".join(closes[o] for o in reversed(opens))


def power_towers(gold: str, rng: random.Random) -> str:
    forms = [
        r"9^{9^{9^9}}",
        r"10^{10^{10}}",
        r"9^{9^9}",
        "9^9^9",
        "9^9^9^9",
        r"2^{2^{2^{2^2}}}",
        r"e^{e^{e^{e}}}",
        r"9^{\sqrt{9^{99}}}",
        r"10^{1e9}",
        r"(10^{40})^{10^{40}}",
        r"x^{x^{x^x}}",
        r"{9^9}^{9^9}",
        r"10^{10^{10}} - 10^{10^{10}} + " + WRONG,
        r"\left(9^{9}\right)^{9^{9}}",
        r"2^{3^{4^{5}}}",
        r"99^{99^{99}}",
        r"7^{7^{7^{7^{7}}}}",
        r"9**9**9",
        r"10^{9999999}",
        r"{10}^{10}^{10}",
        r"9^{9!}",
        r"2^{10^{5}}",
        r"(a+b+c+d)^{24}",
        r"(x+1)^{1000}",
        r"(a+b)^{8}(c+d)^{8}(e+f)^{8}",
        r"(a+b+c)^{6}(d+f+g)^{6}(h+j+k)^{6}",
        r"\frac{1}{10^{-99999}}",
        r"0.5^{-10^{8}}",
    ]
    return rng.choice(forms)


def factorial_chains(gold: str, rng: random.Random) -> str:
    count = rng.randint(2, 30)
    w = rng.choice([WRONG, "42", "9", "100", "3"])
    forms = [
        w + "!" * count,
        f"({w}!)!",
        f"(({w}!)!)!",
        "100000!",
        r"(10^{5})!",
        r"\binom{100000}{50000}",
        r"\Gamma(10^{6})",
        r"\binom{10^{9}}{5}",
        "3!" + "!" * count,
        f"{w}! !",
        r"(3!)!!",
        r"\left(10^{4}\right)!",
        r"10000!",
    ]
    return rng.choice(forms)


def huge_numbers(gold: str, rng: random.Random) -> str:
    g = _plain(gold)
    digits = rng.randint(41, 400)
    forms = [
        "1" * digits,
        WRONG + "0" * digits,
        "0." + "0" * digits + "1",
        "1e" + "9" * rng.randint(3, 12),
        f"{WRONG} \\times 10^{{{10 ** rng.randint(5, 12)}}}",
        "1,000" * rng.randint(14, 60),
        f"{g} + 10^{{-{10 ** rng.randint(5, 9)}}}",
        "9" * digits + ".5",
        f"{WRONG}e{digits * 10}",
        f"10^{{{'9' * rng.randint(6, 30)}}}",
    ]
    return rng.choice(forms)


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
    g = _plain(gold)
    forms = [
        "1+" * (size // 2) + WRONG,
        "{" * (size // 2) + WRONG + "}" * (size // 2),
        " " * size + f"{WRONG} = {g}",
        "x" * size + g,
        f"{g} " + "\\quad " * (size // 6) + WRONG,
        "(" * size + g,
        "-" * size + g,
        "\\," * (size // 2) + f"{g} \\approx {WRONG}",
        g + "0" * size,
        "a+" * (size // 2) + g,
        "!" * size,
        "^{" * (size // 2) + g,
    ]
    return rng.choice(forms)


def choice_backtracking(rng: random.Random) -> tuple[str, str]:
    """A multiple-choice response that made the old answer-line regex backtrack, and its gold
    (never the letter it might yield)."""
    size = rng.randint(5_000, 40_000)
    forms = [
        "answer" + " " * size + "!",
        "Answer is" + " " * size + "!",
        "answer:" + " (" * (size // 2),
        ("answer " + " " * 100) * (size // 107),
        "\\boxed{" + "\\text{" * (size // 6) + "A" + "}" * (size // 6 + 1),
        "answer" * (size // 6),
        "ANSWER " + "IS " * (size // 3),
        "answer: " + "\\text{" * (size // 6),
        "the answer is option" + " " * size + "!",
        "answer" + " \t\n" * (size // 3) + "?",
    ]
    return rng.choice(forms), "C"


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
