"""Grading throughput (answers/s) of BatchGrader with 1 and with 2 worker processes.

The responses are built from the gold answers of the evaluation sets: every distinct
(source, gold) pair once answered right, then answered wrong (integer + 1, the next choice, or
another question's gold), until there are --responses of them. The (gold, answer) pairs are
distinct, so the grader's in-batch dedupe saves nothing. Each measurement uses fresh worker
processes (their parse caches start empty) after a small warm-up batch that only waits for the
workers to start. Timings depend on the load: the script prints the load average.

    .venv/bin/python scripts/bench_grader.py            # 2000 responses, 1 then 2 processes
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import pandas as pd

from relift_core.grading.extraction import AnswerType, answer_type_for
from relift_core.grading.grader import BatchGrader, _MathJob, _prepare

DEFAULT_BENCHMARKS = Path(__file__).resolve().parent.parent.parent / "shared" / "benchmarks"
BENCHMARK_FILES = ("math_valid.parquet", "gpqa_diamond.parquet", "arc_c.parquet")


def distinct_pairs(benchmarks: Path) -> list[tuple[str, str]]:
    frames = [pd.read_parquet(benchmarks / name) for name in BENCHMARK_FILES]
    table = pd.concat(frames, ignore_index=True)
    golds = table["reward_model"].map(lambda reward_model: reward_model["ground_truth"])
    return sorted(set(zip(table["data_source"], golds, strict=True)))


def surely_wrong(gold: str, answer_type: AnswerType) -> str | None:
    """A surely wrong answer: the next choice, or the integer plus one (None otherwise).
    tests/test_grader_shared.py checks the grader rejects every one."""
    if answer_type == "choice":
        labels = "1234" if gold.isdigit() else "ABCD"
        return labels[(labels.index(gold) + 1) % len(labels)]
    if re.fullmatch(r"[+-]?\d+", gold.strip()):
        return str(int(gold) + 1)
    return None


def build_batch(
    pairs: list[tuple[str, str]], size: int
) -> tuple[list[str], list[str], list[AnswerType]]:
    responses, golds, types = [], [], []
    for index in range(size):
        source, gold = pairs[index % len(pairs)]
        answer_type = answer_type_for(source)
        right = (index // len(pairs)) % 2 == 0
        other_gold = pairs[(index + 1) % len(pairs)][1]
        answer = gold if right else (surely_wrong(gold, answer_type) or other_gold)
        responses.append(
            f"<think>\nLet me think about this step by step.\n</think>\n"
            f"The final answer is $\\boxed{{{answer}}}$."
        )
        golds.append(gold)
        types.append(answer_type)
    return responses, golds, types


def measure(workers: int, batch: tuple[list[str], list[str], list[AnswerType]]) -> None:
    responses, golds, types = batch
    started = time.perf_counter()
    with BatchGrader(workers=workers) as grader:
        grader.grade([r"\boxed{1}"] * workers, ["1"] * workers)  # waits for the workers
        ready = time.perf_counter()
        grades = grader.grade(responses, golds, types, require_think=True)
        elapsed = time.perf_counter() - ready
    correct = sum(grade.correct for grade in grades)
    timed_out = sum(grade.timed_out for grade in grades)
    print(
        f"{workers} process(es): {len(responses) / elapsed:7.1f} answers/s "
        f"({len(responses)} answers in {elapsed:.1f} s; pool start {ready - started:.1f} s; "
        f"{correct} correct, {timed_out} timed out)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmarks", type=Path, default=DEFAULT_BENCHMARKS)
    parser.add_argument("--responses", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    pairs = distinct_pairs(args.benchmarks)
    batch = build_batch(pairs, args.responses)
    math_jobs = sum(
        isinstance(_prepare(r, g, t, True), _MathJob) for r, g, t in zip(*batch, strict=True)
    )
    print(
        f"{args.responses} responses from {len(pairs)} distinct (source, gold) pairs; "
        f"{math_jobs} go to math-verify (the rest: choices, plain numbers, pre-filtered); "
        f"{os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    for workers in args.workers:
        measure(workers, batch)
    measure_proof_world(args.responses * 5)


def measure_proof_world(n: int) -> None:
    """The demo's answers: plain integers, graded by the exact-number path without a worker."""
    import random

    rng = random.Random(0)
    golds = [str(rng.randint(0, 999)) for _ in range(n)]
    responses = [
        f"<think>7+8=15 4+5+1=10</think> \\boxed{{{int(g) + rng.choice((0, 0, 1))}}}" for g in golds
    ]
    with BatchGrader(workers=1) as grader:
        started = time.perf_counter()
        grades = grader.grade(responses, golds, "math", require_think=True)
        elapsed = time.perf_counter() - started
    print(
        f"proof-world answers (plain integers): {n / elapsed:9.0f} answers/s "
        f"({n} in {elapsed:.2f} s; {sum(g.correct for g in grades)} correct)",
        flush=True,
    )


# The guard matters: grader workers start from a fork server that imports this script.
if __name__ == "__main__":
    main()
