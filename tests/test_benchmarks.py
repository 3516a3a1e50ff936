"""The benchmark registry: every shared evaluation file loads through it, de-duplicated."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from relift_core.data.benchmarks import (
    BENCHMARKS_DIR_ENV,
    BUILTIN_BENCHMARKS,
    SYSTEM_PROMPT,
    BenchmarkError,
    BenchmarkSpec,
    benchmark_names,
    choice_record,
    get_spec,
    load_benchmark,
    register_benchmark,
    unregister_benchmark,
)
from relift_core.data.examples import examples_from_records

# name -> (data_source, unique questions, k): the shared README's counts and the paper's k.
EXPECTED = {
    "aime24": ("aime", 30, 32),
    "aime25": ("aime25", 30, 32),
    "amc23": ("amc", 83, 32),
    "math500": ("math", 500, 1),
    "minerva": ("minerva", 272, 1),
    "olympiadbench": ("olympiad_bench", 675, 1),
    "gpqa_diamond": ("gpqa", 198, 1),
    "arc_c": ("arc_c", 1172, 1),
}


def test_registry_holds_the_papers_benchmarks_with_their_settings():
    assert set(benchmark_names()) >= set(EXPECTED) | {"mmlu_pro"}
    for spec in BUILTIN_BENCHMARKS:
        assert spec.temperature == 0.6 and spec.max_new_tokens == 8192
        assert spec.answer_type == ("math" if spec.group == "math" else "choice")
    paper = {s.name for s in BUILTIN_BENCHMARKS if s.in_paper_average}
    assert paper == {"aime24", "amc23", "math500", "minerva", "olympiadbench", "gpqa_diamond"}
    mmlu = get_spec("mmlu_pro")
    assert not mmlu.is_local and mmlu.source == "TIGER-Lab/MMLU-Pro"


@pytest.mark.shared
@pytest.mark.parametrize("name", list(EXPECTED))
def test_shared_files_load_deduplicated(name, shared_benchmarks):
    data_source, unique, k = EXPECTED[name]
    bench = load_benchmark(name, shared_benchmarks)
    assert len(bench.questions) == unique
    assert bench.samples == k
    assert {q.data_source for q in bench.questions} == {data_source}
    assert len({q.uid for q in bench.questions}) == unique
    # AIME/AMC: the file repeats each question k times; the benchmark asks k samples of one.
    rows = pq.read_table(shared_benchmarks / get_spec(name).source, columns=["data_source"])
    assert rows.column("data_source").to_pylist().count(data_source) == unique * k


@pytest.mark.shared
def test_limit_and_env_dir(shared_benchmarks, monkeypatch):
    monkeypatch.setenv(BENCHMARKS_DIR_ENV, str(shared_benchmarks))
    full = load_benchmark("amc23")
    first = load_benchmark("amc23", limit=5)
    assert [q.uid for q in first.questions] == [q.uid for q in full.questions[:5]]
    assert first.samples == 32


@pytest.mark.shared
def test_system_prompt_matches_the_shared_files(shared_benchmarks):
    for name in ("math500", "gpqa_diamond", "arc_c"):
        q = load_benchmark(name, shared_benchmarks, limit=1).questions[0]
        assert q.prompt[0] == {"role": "system", "content": SYSTEM_PROMPT}


def test_missing_benchmarks_dir_says_how_to_point_at_copies(monkeypatch, tmp_path):
    monkeypatch.delenv(BENCHMARKS_DIR_ENV, raising=False)
    with pytest.raises(BenchmarkError, match=BENCHMARKS_DIR_ENV):
        load_benchmark("math500")
    with pytest.raises(BenchmarkError, match="not found"):
        load_benchmark("math500", tmp_path)
    with pytest.raises(BenchmarkError, match="unknown benchmark 'nope'"):
        load_benchmark("nope")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _row(source: str, question: str, gold: str) -> dict:
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": question}],
        "reward_model": {"ground_truth": gold, "style": "rule"},
    }


def test_local_file_by_path_infers_k_from_uniform_repeats(tmp_path):
    rows = [_row("add", "1+1", "2"), _row("mul", "2*3", "6")] * 4
    bench = load_benchmark(_write_jsonl(tmp_path / "mine.jsonl", rows))
    assert bench.name == "mine"
    assert [q.ground_truth for q in bench.questions] == ["2", "6"]
    assert bench.samples == 4
    assert bench.data_sources == ["add", "mul"]


def test_registered_benchmark_is_loadable_by_name(tmp_path):
    path = _write_jsonl(tmp_path / "world_eval.jsonl", [_row("add", "1+1", "2")])
    spec = BenchmarkSpec(
        name="world_test",
        source=str(path),
        data_source=None,
        answer_type="math",
        default_samples=2,
        group="custom",
        in_paper_average=False,
    )
    register_benchmark(spec)
    try:
        register_benchmark(spec)  # idempotent
        with pytest.raises(BenchmarkError, match="already registered"):
            register_benchmark(BenchmarkSpec(**{**spec.__dict__, "default_samples": 3}))
        bench = load_benchmark("world_test")
        assert bench.samples == 2 and len(bench.questions) == 1
        assert bench.answer_type_for(bench.questions[0]) == "math"
    finally:
        unregister_benchmark("world_test")


def test_mixed_set_answer_type_follows_data_source(tmp_path):
    rows = [_row("math", "1+1", "2"), _row("gpqa", "pick", "B")]
    bench = load_benchmark(_write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert [bench.answer_type_for(q) for q in bench.questions] == ["math", "choice"]


def test_mmlu_pro_rows_become_gpqa_style_prompts():
    # No download: one row shaped like TIGER-Lab/MMLU-Pro's test split.
    spec = get_spec("mmlu_pro")
    row = {
        "question_id": 70,
        "question": "Which is a prime?",
        "options": ["4", "6", "7"],
        "answer": "C",
        "answer_index": 2,
        "category": "math",
    }
    record = choice_record(spec, row)
    [ex] = examples_from_records([record], origin="mmlu", field_map=spec.field_map)
    assert (ex.uid, ex.data_source, ex.ground_truth) == ("70", "mmlu_pro", "C")
    assert ex.prompt[0]["content"] == SYSTEM_PROMPT
    user = ex.prompt[1]["content"]
    assert "LETTER is one of ABC." in user
    assert user.endswith("Which is a prime?\n\nA) 4\nB) 6\nC) 7")
    assert ex.extra["category"] == "math"
