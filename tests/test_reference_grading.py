"""The reference's reading of answers (eval_scripts/generate_vllm.py:69-76) beside the hardened one.

The reference grades the text after the first `</think>` (or the whole response without one) with
math-verify's default extraction, no `\\boxed{}` needed; the hardened reading (the default, and
the only one rewards use) needs `</think>` and a box. Evaluation reports both.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from relift_core.data.benchmarks import Benchmark, BenchmarkSpec
from relift_core.data.examples import Example
from relift_core.grading.evaluation import evaluate_benchmark
from relift_core.grading.extraction import reference_answer_text
from relift_core.grading.grader import BatchGrader

# (response, gold, hardened correct, reference correct)
CASES = [
    ("<think>2+2 is 4</think>The answer is $\\boxed{4}$.", "4", True, True),
    # No box: the hardened reading finds no answer; math-verify reads the last number.
    ("<think>2+2 is 4</think>The answer is 4.", "4", False, True),
    # No </think>: the reference grades the whole response (the hardened one refuses it).
    ("2+2 = \\boxed{4}", "4", False, True),
    # The right answer only in the thinking: neither reading credits it.
    ("<think>maybe \\boxed{4}</think>So it is \\boxed{5}.", "4", False, False),
]


def test_reference_answer_text():
    assert reference_answer_text("a</think>b</think>c") == "b"  # up to the next </think>
    assert reference_answer_text("no tag") == "no tag"


@pytest.fixture(scope="module")
def grader():
    with BatchGrader(workers=1, timeout_s=10.0) as g:
        yield g


def test_both_readings(grader):
    responses, golds = [c[0] for c in CASES], [c[1] for c in CASES]
    hardened = grader.grade(responses, golds, require_think=True)
    reference = grader.grade(responses, golds, reading="reference")
    assert [g.correct for g in hardened] == [c[2] for c in CASES]
    assert [g.correct for g in reference] == [c[3] for c in CASES]


@dataclass
class _Sample:
    text: str
    length: int = 5
    finish_reason: str = "eos"


class _Engine:
    """Answers every question with the CASES' responses, one per sample."""

    def generate(
        self, prompts, *, n, temperature, top_p=1.0, max_new_tokens, seed=None, progress=None
    ):
        return [[_Sample(CASES[j][0]) for j in range(n)] for _ in prompts]


class _Tokenizer:
    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return messages[-1]["content"]


def test_evaluation_reports_both_readings(grader):
    spec = BenchmarkSpec(
        name="four",
        source="four.parquet",
        data_source="math",
        answer_type="math",
        default_samples=len(CASES),
        group="math",
        in_paper_average=False,
    )
    question = Example(
        uid="q0", data_source="math", prompt=[{"role": "user", "content": "2+2?"}], ground_truth="4"
    )
    bench = Benchmark(name="four", spec=spec, questions=[question], samples=len(CASES))
    records, summary = evaluate_benchmark(
        _Engine(), _Tokenizer(), bench, grader, require_think=True, reference_reading=True
    )
    assert records[0].correct == [c[2] for c in CASES]
    assert records[0].correct_reference == [c[3] for c in CASES]
    assert summary["avg_at_k"] == pytest.approx(1 / 4)
    assert summary["reference_avg_at_k"] == pytest.approx(3 / 4)

    # Off by default: the hardened reading only.
    records, summary = evaluate_benchmark(
        _Engine(), _Tokenizer(), bench, grader, require_think=True
    )
    assert records[0].correct_reference == [] and "reference_avg_at_k" not in summary
