"""Running a benchmark with a fake engine and the real grader: planted accuracy comes back,
and a killed run resumes to the same records without grading a question twice."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace

import pyarrow.parquet as pq
import pytest

from relift_core.data.benchmarks import Benchmark, load_benchmark
from relift_core.grading.evaluation import (
    TABLE_LEGEND,
    QuestionRecord,
    ResumeError,
    evaluate_benchmark,
    markdown_table,
    read_records_jsonl,
    records_to_parquet,
)
from relift_core.grading.grader import BatchGrader
from relift_core.grading.metrics import paper_averages

K = 3  # samples per question in these tests


@dataclass
class FakeSample:  # the fields evaluation reads from relift_core.runtime.rollout.Sample
    text: str
    length: int
    finish_reason: str


class FakeTokenizer:
    """Renders a conversation as its last message, so the engine can look the question up."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return messages[-1]["content"]


class PlantedEngine:
    """Answers question i correctly in `plan[uid]` of its K samples (the first ones), wrongly
    in the rest. Records every call; raises on call number `fail_on_call` (a simulated kill)."""

    def __init__(self, bench: Benchmark, plan: dict[str, int], fail_on_call: int | None = None):
        self.by_prompt = {q.prompt[-1]["content"]: q for q in bench.questions}
        self.choice = {q.uid: bench.answer_type_for(q) == "choice" for q in bench.questions}
        self.plan = plan
        self.fail_on_call = fail_on_call
        self.calls: list[tuple[list[str], int | None]] = []  # (uids, seed)

    def generate(self, prompts, *, n, temperature, top_p=1.0, max_new_tokens, seed=None,
                 progress=None):  # fmt: skip
        questions = [self.by_prompt[p] for p in prompts]
        if self.fail_on_call is not None and len(self.calls) + 1 == self.fail_on_call:
            raise RuntimeError("killed")
        self.calls.append(([q.uid for q in questions], seed))
        return [[self._sample(q, j) for j in range(n)] for q in questions]

    def _sample(self, q, j: int) -> FakeSample:
        right = j < self.plan[q.uid]
        if self.choice[q.uid]:
            letter = q.ground_truth if right else ("B" if q.ground_truth == "A" else "A")
            text = f"<think>hmm</think>\nANSWER: {letter}"
        else:
            answer = q.ground_truth if right else "-98765"
            text = f"<think>hmm</think>\nSo the answer is $\\boxed{{{answer}}}$."
        return FakeSample(text=text, length=10 + j, finish_reason="eos")


@pytest.fixture(scope="module")
def grader():
    with BatchGrader(workers=1, timeout_s=10.0) as g:
        yield g


@pytest.fixture(scope="module")
def small_benches(shared_benchmarks) -> dict[str, Benchmark]:
    return {
        name: load_benchmark(name, shared_benchmarks, limit=6)
        for name in ("math500", "gpqa_diamond")
    }


def _plan(bench: Benchmark) -> dict[str, int]:
    return {q.uid: i % (K + 1) for i, q in enumerate(bench.questions)}  # 0..K correct


@pytest.mark.shared
@pytest.mark.parametrize("name", ["math500", "gpqa_diamond"])
def test_accuracy_is_what_the_engine_planted(name, small_benches, grader):
    bench = small_benches[name]
    plan = _plan(bench)
    engine = PlantedEngine(bench, plan)
    seen: list[tuple[int, int]] = []
    records, summary = evaluate_benchmark(
        engine, FakeTokenizer(), bench, grader, samples=K, batch_questions=4,
        progress=lambda done, total: seen.append((done, total)),
    )  # fmt: skip
    assert [r.uid for r in records] == [q.uid for q in bench.questions]
    for r in records:
        assert r.correct == [j < plan[r.uid] for j in range(K)], r
        assert all(r.format_ok) and not any(r.timed_out)
    expected = sum(plan.values()) / (K * len(plan))
    assert summary["avg_at_k"] == pytest.approx(expected)
    assert summary["pass_at_k"] == pytest.approx(sum(c > 0 for c in plan.values()) / len(plan))
    # maj@k: the wrong answer is one string, so the majority is right iff more than half.
    assert summary["maj_at_k"] == pytest.approx(sum(c > K / 2 for c in plan.values()) / len(plan))
    assert summary["k"] == K and summary["questions"] == 6
    assert seen == [(0, 6), (4, 6), (6, 6)]
    assert [len(uids) for uids, _ in engine.calls] == [4, 2]


@pytest.mark.shared
def test_killed_run_resumes_to_the_uninterrupted_records(small_benches, grader, tmp_path):
    bench = small_benches["math500"]
    plan = _plan(bench)
    kwargs = {"samples": K, "batch_questions": 2, "seed": 7}

    reference = PlantedEngine(bench, plan)
    expected, expected_summary = evaluate_benchmark(
        reference, FakeTokenizer(), bench, grader, **kwargs
    )

    path = tmp_path / "records.jsonl"
    dying = PlantedEngine(bench, plan, fail_on_call=2)
    with pytest.raises(RuntimeError, match="killed"):
        evaluate_benchmark(dying, FakeTokenizer(), bench, grader, records_path=path, **kwargs)
    assert [r.uid for r in read_records_jsonl(path)] == [q.uid for q in bench.questions[:2]]
    # A kill in the middle of the next write leaves a torn line behind.
    with path.open("a") as f:
        f.write('{"benchmark": "math500", "uid": "math-2", "samp')

    resumed = PlantedEngine(bench, plan)
    records, summary = evaluate_benchmark(
        resumed, FakeTokenizer(), bench, grader, records_path=path, **kwargs
    )
    asked = [uid for uids, _ in resumed.calls for uid in uids]
    assert asked == [q.uid for q in bench.questions[2:]]  # nothing sampled or graded twice
    assert [seed for _, seed in resumed.calls] == [seed for _, seed in reference.calls[1:]]
    assert [asdict(r) for r in records] == [asdict(r) for r in expected]
    assert summary == expected_summary
    on_disk = read_records_jsonl(path)
    assert [r.uid for r in on_disk] == [q.uid for q in bench.questions]  # torn line cut off
    assert all(json.loads(line) for line in path.read_text().splitlines())

    # Everything done: a third run asks the engine nothing.
    idle = PlantedEngine(bench, plan)
    again, _ = evaluate_benchmark(idle, FakeTokenizer(), bench, grader, records_path=path, **kwargs)
    assert idle.calls == [] and [asdict(r) for r in again] == [asdict(r) for r in expected]


def _record(uid: str, correct: list[bool], benchmark: str = "b") -> QuestionRecord:
    n = len(correct)
    return QuestionRecord(
        benchmark=benchmark, uid=uid, data_source="d", ground_truth="1",
        samples=["x"] * n, extracted=["1" if c else None for c in correct], correct=correct,
        format_ok=[c for c in correct], lengths=[5] * n, finish_reasons=["eos"] * n,
        timed_out=[False] * n,
    )  # fmt: skip


def test_records_of_another_evaluation_are_refused(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(_record("q1", [True, False]).to_json() + "\n")
    bench = Benchmark(name="b", spec=None, questions=[], samples=3)  # type: ignore[arg-type]
    with pytest.raises(ResumeError, match="fresh records path"):
        evaluate_benchmark(None, None, bench, None, records_path=path)  # type: ignore[arg-type]


def test_corrupt_middle_line_raises_but_torn_tail_is_ignored(tmp_path):
    path = tmp_path / "r.jsonl"
    good = _record("q1", [True]).to_json() + "\n"
    path.write_text(good + "not json\n" + good)
    with pytest.raises(ValueError, match="line 2"):
        read_records_jsonl(path)
    path.write_text(good + good[:20])
    assert len(read_records_jsonl(path)) == 1
    assert path.read_text() == good + good[:20]  # read-only unless repair=True
    read_records_jsonl(path, repair=True)
    assert path.read_text() == good


def test_records_to_parquet_round_trip(tmp_path):
    records = [_record("q1", [True, False]), _record("q2", [False, False])]
    path = tmp_path / "out" / "records.parquet"
    records_to_parquet(records, path)
    table = pq.read_table(path).to_pylist()
    assert [row["uid"] for row in table] == ["q1", "q2"]
    assert table[0]["extracted"] == ["1", None]
    assert table[0]["correct"] == [True, False] and table[0]["accuracy"] == 0.5
    assert sorted(p.name for p in path.parent.iterdir()) == ["records.parquet"]  # no temp left
    records_to_parquet([replace(records[0], uid="q3")], path)  # replaces whole
    assert [row["uid"] for row in pq.read_table(path).to_pylist()] == ["q3"]


def test_markdown_table():
    summaries = {
        "math500": {"questions": 500, "k": 1, "avg_at_k": 0.5, "pass_at_k": 0.5, "maj_at_k": 0.5,
                    "response_length_mean": 99.6, "response_length_max": 300,
                    "format_failure_rate": 0.02, "truncation_rate": 0.0},
    }  # fmt: skip
    table = markdown_table(summaries, paper_averages(summaries))
    lines = table.splitlines()
    assert lines[0].startswith("| benchmark | questions | k | avg@k | ref avg@k |")
    # "–": no avg@k under the reference's reading of answers in these summaries.
    assert lines[2] == "| math500 | 500 | 1 | 50.0 | – | 50.0 | 50.0 | 100 | 300 | 2.0 | 0.0 |"
    assert "| **avg_paper** |  |  | 50.0 |" in table
    assert "paper_complete" not in table
    # A 100-column terminal shows it unwrapped (`relift evaluate`), and says what each column is.
    assert max(map(len, lines)) < 100
    assert TABLE_LEGEND in table and all(
        title in TABLE_LEGEND for title in lines[0].strip("| ").split(" | ")[3:]
    )


@pytest.mark.slow
@pytest.mark.shared
def test_smollm2_end_to_end(shared_benchmarks, grader, tmp_path):
    """A real pretrained chat model on 4 MATH-500 + 4 GPQA questions, 64 new tokens."""
    models = pytest.importorskip("relift_core.runtime.models")
    from relift_core.config import ModelConfig
    from relift_core.runtime.rollout import HFRolloutEngine

    try:
        model_dir = models.smollm2_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model, tokenizer = models.load_policy(ModelConfig(source="hf", name_or_path=str(model_dir)))
    engine = HFRolloutEngine(model, tokenizer, batch_size=8, device="cpu")
    summaries = {}
    for name in ("math500", "gpqa_diamond"):
        bench = load_benchmark(name, shared_benchmarks, limit=4)
        start = time.perf_counter()
        records, summary = evaluate_benchmark(
            engine, tokenizer, bench, grader, max_new_tokens=64, batch_questions=4,
            records_path=tmp_path / f"{name}.jsonl",
        )  # fmt: skip
        summary["seconds"] = time.perf_counter() - start
        summaries[name] = summary
        assert len(records) == 4 and all(len(r.samples) == 1 for r in records)
        assert all(0 < length <= 64 for r in records for length in r.lengths)
        assert 0.0 <= summary["avg_at_k"] <= 1.0
    print("\n" + markdown_table(summaries, paper_averages(summaries)))
    print({name: round(s["seconds"], 1) for name, s in summaries.items()})
