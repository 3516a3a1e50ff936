import json
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from relift_core.data.examples import (
    DataError,
    Example,
    examples_from_records,
    fingerprint_examples,
    load_examples,
    render_prompt,
    write_examples,
)

SYSTEM = {"role": "system", "content": "Think in <think></think>, answer in \\boxed{}."}


def verl_row(i: int, question: str = "1+1?", answer: str = "2", **more) -> dict:
    return {
        "data_source": "toy",
        "prompt": [SYSTEM, {"role": "user", "content": question}],
        "ability": "math",
        "reward_model": {"ground_truth": answer, "style": "rule"},
        "extra_info": {"index": i, "split": "train"},
        **more,
    }


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_parquet_verl_layout(tmp_path):
    rows = [
        verl_row(0, target=[{"role": "assistant", "content": "<think>1+1</think> \\boxed{2}"}]),
        verl_row(1, "2+2?", "4", target=None),
    ]
    examples = load_examples(write_parquet(tmp_path / "d.parquet", rows))
    first = examples[0]
    assert first.uid == "toy-0" and first.data_source == "toy" and first.ground_truth == "2"
    assert first.prompt == (SYSTEM, {"role": "user", "content": "1+1?"})
    assert first.target == "<think>1+1</think> \\boxed{2}"  # LUFFY message-list target
    assert examples[1].target is None
    assert first.extra == {
        "ability": "math",
        "reward_model": {"style": "rule"},
        "extra_info": {"index": 0, "split": "train"},
    }


def test_string_target_and_empty_target(tmp_path):
    rows = [verl_row(0, target="<think>1+1</think> \\boxed{2}"), verl_row(1, target="")]
    examples = load_examples(write_parquet(tmp_path / "d.parquet", rows))
    assert [e.target for e in examples] == ["<think>1+1</think> \\boxed{2}", None]


def test_jsonl_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [verl_row(i, f"{i}+0?", str(i)) for i in range(5)])
    assert [e.ground_truth for e in load_examples(path)] == ["0", "1", "2", "3", "4"]
    assert [e.uid for e in load_examples(path, limit=2)] == ["toy-0", "toy-1"]


def test_repeated_rows_are_kept_with_unique_stable_uids(tmp_path):
    rows = [verl_row(0), verl_row(0), verl_row(1), verl_row(0)]  # avg@k benchmarks repeat rows
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [e.uid for e in examples] == ["toy-0", "toy-0#1", "toy-1", "toy-0#3"]
    # a limit takes a prefix and does not rename what it keeps
    assert [e.uid for e in load_examples(tmp_path / "d.jsonl", limit=2)] == ["toy-0", "toy-0#1"]


def test_uid_falls_back_to_row_index_without_extra_info():
    examples = examples_from_records(
        [{"prompt": "q", "reward_model": {"ground_truth": "a"}}] * 2, origin="/x/mine.jsonl"
    )
    assert [(e.uid, e.data_source) for e in examples] == [("mine-0", "mine"), ("mine-1", "mine")]


def test_field_map_for_a_flat_dataset():
    records = [
        {"problem": "What is 2+3?", "answer": 5, "solution": "2+3=5", "id": "q7", "src": "gsm"},
    ]
    field_map = {
        "prompt": "problem",
        "ground_truth": "answer",
        "target": "solution",
        "uid": "id",
        "data_source": "src",
    }
    (ex,) = examples_from_records(records, origin="hf", field_map=field_map)
    assert ex == Example(
        uid="q7",
        data_source="gsm",
        prompt=({"role": "user", "content": "What is 2+3?"},),
        ground_truth="5",
        target="2+3=5",
        extra={},
    )


def test_unknown_field_map_key():
    with pytest.raises(ValueError, match="answer"):
        examples_from_records([], origin="x", field_map={"answer": "a"})


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"prompt": "q"}, "ground_truth", "missing"),
        ({"prompt": "q", "reward_model": {"ground_truth": ""}}, "ground_truth", "empty"),
        ({"prompt": "q", "reward_model": {"ground_truth": ["2"]}}, "ground_truth", "list"),
        ({"prompt": [], "reward_model": {"ground_truth": "2"}}, "prompt", "empty"),
        ({"prompt": "  ", "reward_model": {"ground_truth": "2"}}, "prompt", "empty"),
        ({"prompt": 3, "reward_model": {"ground_truth": "2"}}, "prompt", "int"),
        (
            {"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "2"}},
            "prompt",
            "content",
        ),
        ({"prompt": "q", "reward_model": {"ground_truth": "2"}, "target": 7}, "target", "int"),
        (
            {
                "prompt": "q",
                "reward_model": {"ground_truth": "2"},
                "target": [{"role": "user", "content": "x"}],
            },
            "target",
            "assistant",
        ),
        (
            {"prompt": "q", "reward_model": {"ground_truth": "2"}, "data_source": 1},
            "data_source",
            "1",
        ),
    ],
)
def test_malformed_row_names_file_row_and_field(tmp_path, row, field, problem):
    good = {"prompt": "q", "reward_model": {"ground_truth": "2"}}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, row])
    with pytest.raises(DataError) as e:
        load_examples(path)
    message = str(e.value)
    assert str(path) in message and "row 2" in message and repr(field) in message
    assert problem in message


def test_missing_explicitly_mapped_column_is_an_error():
    with pytest.raises(DataError, match="row 0: field 'target'.*missing"):
        examples_from_records(
            [{"prompt": "q", "reward_model": {"ground_truth": "2"}}],
            origin="x",
            field_map={"target": "solution"},
        )


def test_missing_local_file_and_bad_suffix(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "absent.parquet")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported"):
        load_examples(tmp_path / "d.csv")


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(verl_row(0)) + "\n{oops\n")
    with pytest.raises(DataError, match=r"d\.jsonl: line 2"):
        load_examples(path)


def test_hugging_face_id_goes_through_datasets(monkeypatch):
    calls = []

    class FakeDataset(list):
        def select(self, indices):
            return FakeDataset(self[i] for i in indices)

    def load_dataset(name, split):
        calls.append((name, split))
        return FakeDataset({"question": f"q{i}", "answer": str(i)} for i in range(4))

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    examples = load_examples(
        "org/some-math",
        split="test",
        limit=3,
        field_map={"prompt": "question", "ground_truth": "answer"},
    )
    assert calls == [("org/some-math", "test")]
    assert [(e.uid, e.ground_truth) for e in examples] == [
        ("some-math-0", "0"),
        ("some-math-1", "1"),
        ("some-math-2", "2"),
    ]


def test_write_then_load_round_trips(tmp_path):
    rows = [
        verl_row(0, target=[{"role": "assistant", "content": "demo"}]),
        verl_row(0),  # a repeat: its uid "toy-0#1" must survive the trip
        verl_row(1, target=None),
    ]
    examples = load_examples(write_parquet(tmp_path / "in.parquet", rows))
    out = tmp_path / "sub" / "out.parquet"
    write_examples(examples, out)
    again = load_examples(out)
    assert again == examples
    assert fingerprint_examples(again) == fingerprint_examples(examples)
    written = pq.read_table(out).to_pylist()[0]
    assert written["reward_model"] == {"style": "rule", "ground_truth": "2"}
    assert written["target"] == [{"role": "assistant", "content": "demo"}]
    assert list(tmp_path.joinpath("sub").iterdir()) == [out]  # no temp file left behind


def test_failed_write_leaves_existing_file_intact(tmp_path):
    out = tmp_path / "out.parquet"
    good = examples_from_records([verl_row(0)], origin="x")
    write_examples(good, out)
    before = out.read_bytes()
    unserialisable = [
        Example("u", "toy", ({"role": "user", "content": "q"},), "2", extra={"blob": object()})
    ]
    with pytest.raises(pa.ArrowException):
        write_examples(unserialisable, out)
    assert out.read_bytes() == before
    assert list(tmp_path.iterdir()) == [out]


def test_failed_replace_onto_a_directory_leaves_no_temp_file(tmp_path):
    target_dir = tmp_path / "is_a_dir"
    target_dir.mkdir()
    with pytest.raises(OSError):
        write_examples(examples_from_records([verl_row(0)], origin="x"), target_dir)
    assert list(tmp_path.iterdir()) == [target_dir] and not any(target_dir.iterdir())


def test_fingerprint_is_stable_and_content_sensitive():
    examples = examples_from_records([verl_row(0), verl_row(1)], origin="x")
    fp = fingerprint_examples(examples)
    assert fp == fingerprint_examples(examples_from_records([verl_row(0), verl_row(1)], origin="x"))
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp != fingerprint_examples(examples[::-1])
    changed = examples_from_records([verl_row(0), verl_row(1, answer="3")], origin="x")
    assert fp != fingerprint_examples(changed)


def test_render_prompt_asks_for_a_generation_prompt():
    class RecordingTokenizer:
        def apply_chat_template(self, messages, **kwargs):
            self.seen = (messages, kwargs)
            return "rendered"

    tok = RecordingTokenizer()
    messages = (SYSTEM, {"role": "user", "content": "1+1?"})
    assert render_prompt(tok, messages) == "rendered"
    assert tok.seen == (list(messages), {"tokenize": False, "add_generation_prompt": True})


@pytest.mark.shared
def test_loads_the_shared_benchmarks(shared_benchmarks):
    math = load_examples(shared_benchmarks / "math_valid.parquet")
    assert len(math) == 6023 and len({e.uid for e in math}) == 6023
    by_source = {}
    for e in math:
        by_source.setdefault(e.data_source, set()).add(e.extra["extra_info"]["index"])
    assert {s: len(ix) for s, ix in by_source.items()} == {
        "aime": 30,
        "aime25": 30,
        "amc": 83,
        "math": 500,
        "minerva": 272,
        "olympiad_bench": 675,
    }
    assert all(e.prompt[-1]["role"] == "user" and e.ground_truth for e in math)
    assert "__index_level_0__" not in math[0].extra

    gpqa = load_examples(shared_benchmarks / "gpqa_diamond.parquet")
    assert len(gpqa) == 198 and {e.data_source for e in gpqa} == {"gpqa"}
    assert {e.ground_truth for e in gpqa} <= set("ABCD")


def test_a_gold_longer_than_the_grader_reads_is_refused_naming_file_and_row(tmp_path):
    """A 50 MB ground truth kept the grader busy for 10 min; preparation refuses it instead."""
    from relift_core.grading.answer_checks import MAX_GOLD_CHARS

    rows = [
        verl_row(0),
        verl_row(1, answer="1" * MAX_GOLD_CHARS),
        verl_row(2, answer="7" * 5_000_000),
    ]
    path = write_parquet(tmp_path / "train.parquet", rows)
    with pytest.raises(DataError) as e:
        load_examples(path)
    message = str(e.value)
    assert message.count("\n") == 0
    assert str(path) in message and "row 2" in message and "'ground_truth'" in message
    assert "5,000,000 characters" in message
    assert len(load_examples(path, limit=2)) == 2  # a gold at the bound is fine
