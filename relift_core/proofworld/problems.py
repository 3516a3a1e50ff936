"""The proof-world: generated arithmetic problems of graded difficulty, with demonstrations.

Every problem carries a short step-by-step demonstration `<think>steps</think> \\boxed{answer}`.
All families share one scratchpad grammar -- space-separated facts `x op y[+c]=r`, computed
least-significant digit first -- so a model that learned `add` and `mul` already knows the
vocabulary of `chain`, and fine-tuning on a handful of demonstrations of an unseen family or
size teaches a new *composition* of known steps rather than a new language. Demonstrations stay
under ~40 characters (the tiny model generates at most ~96 tokens, one per character).

Families (size = digits of the operands, or for `chain` the number of operators minus one):
  add    a+b, both `size`-digit. Per digit: `x+y=r` or `x+y+1=r` (carry in). 47+38 -> 7+8=15 4+3+1=8
  sub    a-b with a >= b, both `size`-digit. Per digit, a borrowed-from digit is written with its
         ten: 47-38 -> 17-8=9 4-3-1=0, answer 9 (leading zeros dropped).
  mul    a*m, a `size`-digit, m one digit 2..9. Per digit `x*m+c=r` (c = tens of the last r).
  chain  `size`+1 operators over one-digit operands, * before +/-, left to right; every step is a
         one-digit fact (left operand <= 9, no negatives). 8-1*7+4 -> 1*7=7 8-7=1 1+4=5.

The answer of every family is the integer the steps spell out; the demonstration's boxed answer
always equals the ground truth (tests check it).
"""

from __future__ import annotations

import hashlib
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relift_core.atomic import atomic_file
from relift_core.config import WorldConfig

ABILITY = "arithmetic"


@dataclass(frozen=True)
class Problem:
    uid: str
    family: str
    size: int
    question: str
    answer: str
    demonstration: str


def format_demonstration(steps: list[str], answer: str) -> str:
    return f"<think>{' '.join(steps)}</think> \\boxed{{{answer}}}"


def _digits_lsb_first(n: int, width: int) -> list[int]:
    return [(n // 10**i) % 10 for i in range(width)]


def _random_operand(size: int, rng: random.Random) -> int:
    # Size 1 includes 0; larger sizes have exactly `size` digits (no leading zero).
    return rng.randint(0, 9) if size == 1 else rng.randint(10 ** (size - 1), 10**size - 1)


def _add(size: int, rng: random.Random) -> tuple[str, int, list[str]]:
    a, b = _random_operand(size, rng), _random_operand(size, rng)
    steps, carry = [], 0
    for x, y in zip(_digits_lsb_first(a, size), _digits_lsb_first(b, size), strict=True):
        r = x + y + carry
        steps.append(f"{x}+{y}+1={r}" if carry else f"{x}+{y}={r}")
        carry = r // 10
    return f"{a}+{b}", a + b, steps


def _sub(size: int, rng: random.Random) -> tuple[str, int, list[str]]:
    a, b = _random_operand(size, rng), _random_operand(size, rng)
    a, b = max(a, b), min(a, b)
    steps, borrow = [], 0
    for x, y in zip(_digits_lsb_first(a, size), _digits_lsb_first(b, size), strict=True):
        top = x + 10 if x - y - borrow < 0 else x
        r = top - y - borrow
        steps.append(f"{top}-{y}-1={r}" if borrow else f"{top}-{y}={r}")
        borrow = int(top >= 10)
    return f"{a}-{b}", a - b, steps


def _mul(size: int, rng: random.Random) -> tuple[str, int, list[str]]:
    a, m = _random_operand(size, rng), rng.randint(2, 9)
    steps, carry = [], 0
    for x in _digits_lsb_first(a, size):
        r = x * m + carry
        steps.append(f"{x}*{m}+{carry}={r}" if carry else f"{x}*{m}={r}")
        carry = r // 10
    return f"{a}*{m}", a * m, steps


def _chain(size: int, rng: random.Random) -> tuple[str, int, list[str]]:
    # Rejection keeps every step a one-digit fact the arithmetic families already teach (left
    # operand <= 9, never negative): what is new in `chain` is only the order of the steps.
    while True:
        values = [rng.randint(1, 9) for _ in range(size + 2)]
        ops = [rng.choice("+-*") for _ in range(size + 1)]
        question = str(values[0]) + "".join(f"{o}{v}" for o, v in zip(ops, values[1:], strict=True))
        steps: list[str] = []
        facts: list[tuple[int, int]] = []  # (left operand, result) of every step
        terms, term_ops = [values[0]], []
        for op, v in zip(ops, values[1:], strict=True):  # first pass: products, left to right
            if op == "*":
                r = terms[-1] * v
                steps.append(f"{terms[-1]}*{v}={r}")
                facts.append((terms[-1], r))
                terms[-1] = r
            else:
                terms.append(v)
                term_ops.append(op)
        total = terms[0]
        for op, v in zip(term_ops, terms[1:], strict=True):  # second pass: sums, left to right
            r = total + v if op == "+" else total - v
            steps.append(f"{total}{op}{v}={r}")
            facts.append((total, r))
            facts.append((v, r))
            total = r
        if all(x <= 9 and r >= 0 for x, r in facts):
            return question, total, steps


FAMILIES: dict[str, Callable[[int, random.Random], tuple[str, int, list[str]]]] = {
    "add": _add,
    "sub": _sub,
    "mul": _mul,
    "chain": _chain,
}


def problem_uid(family: str, size: int, question: str) -> str:
    # Content-addressed: the same question always has the same uid, across runs and splits.
    digest = hashlib.sha1(question.encode()).hexdigest()[:8]
    return f"{family}{size}-{digest}"


def make_problem(family: str, size: int, rng: random.Random) -> Problem:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    question, value, steps = FAMILIES[family](size, rng)
    answer = str(value)
    return Problem(
        uid=problem_uid(family, size, question),
        family=family,
        size=size,
        question=question,
        answer=answer,
        demonstration=format_demonstration(steps, answer),
    )


def generate_problems(
    family: str,
    size: int,
    count: int,
    rng: random.Random,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> list[Problem]:
    """`count` distinct problems whose questions are not in `exclude`.

    Small cells (one-digit add has 100 questions) may hold fewer than asked: after a bounded
    number of draws it returns what it found rather than looping forever.
    """
    found: dict[str, Problem] = {}
    for _ in range(50 * count + 1000):
        if len(found) >= count:
            break
        p = make_problem(family, size, rng)
        if p.question not in exclude and p.question not in found:
            found[p.question] = p
    return list(found.values())


def parse_cell(cell: str) -> tuple[str, int]:
    family, _, size = cell.partition("/")
    if family not in FAMILIES or not size.isdigit():
        raise ValueError(
            f"world cell {cell!r}: expected 'family/size' with family one of {', '.join(FAMILIES)}"
        )
    return family, int(size)


def train_cells(cfg: WorldConfig) -> list[tuple[str, int]]:
    if cfg.cells is not None:
        return [parse_cell(c) for c in cfg.cells]
    return [(f, s) for f in cfg.families for s in cfg.sizes]


def pretrain_cells(cfg: WorldConfig) -> dict[tuple[str, int], float]:
    """(family, size) -> relative draw weight of each pretraining cell."""
    if cfg.pretrain_cells is not None:
        return {parse_cell(c): float(w) for c, w in cfg.pretrain_cells.items() if w > 0}
    return {(f, s): 1.0 for f in cfg.pretrain_families for s in cfg.pretrain_sizes}


def miscopy_answer(p: Problem, rng: random.Random) -> Problem:
    """`p` with one digit of its boxed answer replaced by another digit (steps unchanged)."""
    digits = [i for i, c in enumerate(p.answer) if c.isdigit()]
    i = rng.choice(digits)
    wrong = rng.choice([d for d in "0123456789" if d != p.answer[i]])
    answer = p.answer[:i] + wrong + p.answer[i + 1 :]
    head = p.demonstration.rsplit("\\boxed{", 1)[0]
    return Problem(p.uid, p.family, p.size, p.question, answer, f"{head}\\boxed{{{answer}}}")


def slip_last_digit(p: Problem) -> Problem:
    """`p` with the last digit of its boxed answer one too high, 9 wrapping to 0 (steps
    unchanged)."""
    answer = p.answer[:-1] + str((int(p.answer[-1]) + 1) % 10)
    head = p.demonstration.rsplit("\\boxed{", 1)[0]
    return Problem(p.uid, p.family, p.size, p.question, answer, f"{head}\\boxed{{{answer}}}")


HOLDOUT_SKILLS: dict[str, Callable[[Problem], bool]] = {
    # Any add or mul answer longer than its operands, one digit included (7+8=15, 64*3=192):
    # every step is a known fact, only writing the final carry into the answer is new.
    "long_answer": lambda p: p.family in ("add", "mul") and len(p.answer) > p.size,
}


def build_world(cfg: WorldConfig) -> dict[str, list[Problem]]:
    """{"train", "eval", "pretrain"}: train/eval per family x size cell, pretrain from its mix.

    No question appears in two splits: eval is held out from everything, and train questions are
    held out of pretraining too, so a train question's difficulty measures what the base model
    generalised, not what it memorised. Pretraining draws a cell by its weight, then a problem.
    """
    rng = random.Random(cfg.seed)
    train: list[Problem] = []
    evals: list[Problem] = []
    taken: set[str] = set()
    for family, size in train_cells(cfg):
        cell = generate_problems(
            family, size, cfg.train_per_cell + cfg.eval_per_cell, rng, exclude=taken
        )
        taken.update(p.question for p in cell)
        # A cell smaller than asked (one-digit add has 100 questions) shortchanges both.
        n_eval = cfg.eval_per_cell
        if len(cell) < cfg.train_per_cell + cfg.eval_per_cell:
            n_eval = min(cfg.eval_per_cell, len(cell) // 2)
        evals.extend(cell[:n_eval])
        train.extend(cell[n_eval:])
    weights = pretrain_cells(cfg)
    held_out = [HOLDOUT_SKILLS[h] for h in cfg.pretrain_holdout]
    pretrain: list[Problem] = []
    for _ in range(4 * cfg.pretrain_examples):  # bounded: held-out draws are redrawn
        if not weights or len(pretrain) >= cfg.pretrain_examples:
            break
        family, size = rng.choices(list(weights), weights=list(weights.values()))[0]
        drawn = generate_problems(family, size, 1, rng, exclude=taken)
        if not drawn:
            # Every question of this cell is held out as train/eval: drop the cell instead of
            # paying generate_problems' bounded search again on each later draw.
            del weights[(family, size)]
        elif not any(skill(drawn[0]) for skill in held_out):
            problem = drawn[0]
            if cfg.pretrain_noise and rng.random() < cfg.pretrain_noise:
                problem = (
                    slip_last_digit(problem)
                    if cfg.pretrain_noise_style == "last_digit_slip"
                    else miscopy_answer(problem, rng)
                )
            pretrain.append(problem)
    if len(pretrain) < cfg.pretrain_examples:
        warnings.warn(
            f"world: only {len(pretrain)} of {cfg.pretrain_examples} pretraining "
            "examples could be drawn (pretraining cells exhausted by train/eval)",
            stacklevel=2,
        )
    return {"train": train, "eval": evals, "pretrain": pretrain}


def problem_to_record(
    p: Problem, system_prompt: str | None = None, *, index: int = 0, split: str = "train"
) -> dict:
    """One row in verl's RL parquet layout, plus the demonstration as `target` (LUFFY/ReLIFT)."""
    prompt = [{"role": "system", "content": system_prompt}] if system_prompt else []
    prompt.append({"role": "user", "content": p.question})
    return {
        "data_source": f"world/{p.family}/{p.size}",
        "prompt": prompt,
        "ability": ABILITY,
        "reward_model": {"ground_truth": p.answer, "style": "rule"},
        "extra_info": {
            "index": index,
            "split": split,
            "family": p.family,
            "size": p.size,
            "uid": p.uid,
        },
        "target": p.demonstration,
    }


def record_to_problem(record: dict) -> Problem:
    info = record["extra_info"]
    question = next(m["content"] for m in record["prompt"] if m["role"] == "user")
    return Problem(
        uid=info["uid"],
        family=info["family"],
        size=int(info["size"]),
        question=question,
        answer=record["reward_model"]["ground_truth"],
        demonstration=record["target"],
    )


def write_world(
    cfg: WorldConfig, out_dir: Path, system_prompt: str | None = None
) -> dict[str, Path]:
    """Write train/eval/pretrain.parquet; each file appears whole or not at all
    (relift_core.atomic)."""
    import pandas as pd  # heavy; only writers need it

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, problems in build_world(cfg).items():
        rows = [
            problem_to_record(p, system_prompt, index=i, split=split)
            for i, p in enumerate(problems)
        ]
        path = out_dir / f"{split}.parquet"
        with atomic_file(path) as tmp:
            pd.DataFrame(rows).to_parquet(tmp, index=False)
        paths[split] = path
    return paths
