"""Bad input is refused at the edge with one clear message (issue 13, item 3): unsafe run names,
empty or unreadable data files, over-long prompts, no retries of errors retrying cannot fix, and
a CLI that prints one line (a traceback only with --debug) and validates the config before any
flow runs. Seconds, no Prefect server."""

from __future__ import annotations

import json
import logging
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# Imported before any test so Prefect's logging set-up (on import) does not replace caplog's.
import flows.cli
import flows.prepare_data  # noqa: F401
from relift_core.config import ConfigError, DataConfig, ModelConfig, RunConfig, load_config
from relift_core.data.examples import (
    DataError,
    filter_long_prompts,
    load_examples,
    prompt_token_counter,
)

SYSTEM = {"role": "system", "content": "Answer in \\boxed{}."}


def row(i: int, question: str = "1+1?", answer: str = "2") -> dict:
    return {"data_source": "toy", "prompt": [SYSTEM, {"role": "user", "content": question}],
            "reward_model": {"ground_truth": answer, "style": "rule"},
            "extra_info": {"index": i}}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------------- run names


@pytest.mark.parametrize("name", ["../escaped_run", "it's", "", "a/b", ".hidden", "-x", "a b",
                                  "x" * 101, "run\n", "naïve"])
def test_unsafe_run_names_are_refused(name):
    with pytest.raises(ConfigError) as e:
        load_config("toy", {"run.name": name})
    assert "'run.name'" in str(e.value)


@pytest.mark.parametrize("name", ["toy", "rl-s0", "sweep-relift-s1-sft_buffer_threshold4",
                                  "qwen2.5-math-7b", "x" * 100, "0"])
def test_safe_run_names_are_kept(name):
    assert RunConfig(name=name).name == name


# ---------------------------------------------------------------------------------- data files


def test_empty_jsonl_is_refused_naming_the_file(tmp_path):
    for content in ("", "\n\n   \n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(content)
        with pytest.raises(DataError, match=r"empty\.jsonl: the dataset is empty"):
            load_examples(path)


def test_zero_row_parquet_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "none.parquet"
    pq.write_table(pa.Table.from_pylist([row(0)]).slice(0, 0), path)
    with pytest.raises(DataError, match=r"none\.parquet: the dataset is empty"):
        load_examples(path)
    assert load_examples(path, allow_empty=True) == []


@pytest.mark.parametrize("content", [b"", b"PAR1garbage-that-is-no-parquet-footerPAR1",
                                     b"\x00\x01 not parquet at all"])
def test_empty_or_corrupt_parquet_is_a_data_error_naming_the_file(tmp_path, content):
    path = tmp_path / "broken.parquet"
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_examples(path)
    assert str(e.value).startswith(f"{path}: not a readable parquet file")
    assert type(e.value) is DataError  # not a raw pyarrow ArrowInvalid / OSError
    if not content:
        assert "empty file" in str(e.value)


def test_invalid_utf8_names_file_line_and_byte_offset(tmp_path):
    good = (json.dumps(row(0)) + "\n").encode()
    second = (json.dumps(row(1)) + "\n").encode()
    bad = b'{"prompt": "caf\xe9 au lait"}\n'  # latin-1, not UTF-8
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + second + bad)
    with pytest.raises(DataError) as e:
        load_examples(path)
    offset = len(good) + len(second) + bad.index(b"\xe9")
    message = str(e.value)
    assert message.startswith(f"{path}: line 3: invalid UTF-8 at byte offset {offset}")
    # a UTF-8 byte-order mark is not an error
    path.write_bytes(b"\xef\xbb\xbf" + good)
    assert [e.uid for e in load_examples(path)] == ["toy-0"]


# ------------------------------------------------------------------------------- prompt length


class _NoLongTokenizing:
    """Wraps a tokenizer; fails the test if asked to tokenize a huge text."""

    def __init__(self, tokenizer):
        self.inner = tokenizer

    def __call__(self, text, **kwargs):
        assert len(text) < 100_000, "a 1 MB prompt was tokenized"
        return self.inner(text, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        return self.inner.apply_chat_template(*args, **kwargs)


def test_over_long_prompts_are_dropped_and_counted_or_refused(tmp_path):
    from relift_core.runtime.char_tokenizer import build_char_tokenizer

    huge = "9" * (1 << 20)  # a 1 MB prompt
    rows = [row(0), row(1, huge), row(2, "2+2?", "4"), row(3, "x" * 300)]
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    count = prompt_token_counter(_NoLongTokenizing(build_char_tokenizer()))
    # the chat template counts: a 5-character question is more than 5 tokens
    assert count(examples[0], 128) > len("1+1?") + len(SYSTEM["content"])
    kept, dropped = filter_long_prompts(examples, count_tokens=count, max_tokens=128,
                                        origin="d.jsonl")
    assert [e.uid for e in kept] == ["toy-0", "toy-2"]
    assert [(d.row, d.uid) for d in dropped] == [(1, "toy-1"), (3, "toy-3")]
    with pytest.raises(DataError, match=r"d\.jsonl: row 1 \(uid 'toy-1'\).*max_prompt_tokens=128"):
        filter_long_prompts(examples, count_tokens=count, max_tokens=128, origin="d.jsonl",
                            policy="error")
    with pytest.raises(DataError, match=r"d\.jsonl: all 2 rows were dropped"):
        filter_long_prompts(examples[1::2], count_tokens=count, max_tokens=128, origin="d.jsonl")


def test_prepare_drops_over_long_prompts_before_any_rollout(tmp_path, caplog):
    from flows.prepare_data import prepare_examples

    rows = [row(0), row(1, "9" * (1 << 20)), row(2, "2+2?", "4")]
    source = write_jsonl(tmp_path / "train.jsonl", rows)
    data = DataConfig(train_path=source, max_prompt_tokens=256)
    with caplog.at_level(logging.WARNING):
        prepared = prepare_examples(data, tmp_path / "out", ModelConfig())
    assert prepared.dropped_over_long == 1
    kept = prepared.train_examples()
    assert [e.uid for e in kept] == ["toy-0", "toy-2"]
    assert max(len(m["content"]) for e in kept for m in e.prompt) < 100
    assert any("dropped 1 of 3 rows" in r.getMessage() and "row 1 (toy-1)" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(DataError, match=r"train\.jsonl: row 1"):
        prepare_examples(data, tmp_path / "out2", ModelConfig(), over_long="error")


def test_prepare_refuses_empty_and_all_dropped_datasets_naming_the_file(tmp_path):
    from flows.prepare_data import prepare_examples

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: the dataset is empty"):
        prepare_examples(DataConfig(train_path=str(empty)), tmp_path / "out")
    long_only = write_jsonl(tmp_path / "long.jsonl", [row(0, "x" * 5000)])
    with pytest.raises(DataError, match=r"long\.jsonl: all 1 rows were dropped"):
        prepare_examples(DataConfig(train_path=long_only, max_prompt_tokens=64), tmp_path / "o")
    assert not (tmp_path / "o" / "prepared_train.parquet").exists()


def test_data_and_config_errors_are_not_retried():
    from prefect.states import Failed

    from flows.prepare_data import prepare_training_set, retry_unless_permanent

    assert prepare_training_set.retries >= 1  # transient failures still are
    assert prepare_training_set.retry_condition_fn is retry_unless_permanent

    def retried(exc: BaseException) -> bool:
        # the state Prefect's task engine builds from a raised exception
        return retry_unless_permanent(prepare_training_set, None, Failed(data=exc))

    assert not retried(DataError("train.jsonl: line 3: invalid UTF-8"))
    assert not retried(ConfigError("invalid config"))
    with pytest.raises(Exception) as validation:
        DataConfig.model_validate({"limit": -1})
    assert not retried(validation.value)
    assert retried(OSError("NFS hiccup")) and retried(TimeoutError("hub timeout"))


# ------------------------------------------------------------------------------------------ CLI


def _stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture
def flow_calls(monkeypatch):
    """flows.train.train replaced: records whether a flow (and so a Prefect server) started."""
    import flows.train

    calls = []
    monkeypatch.setattr(flows.train, "train", lambda **kw: calls.append(kw) or {
        "mlflow_run_id": "x", "demos_used": 0})
    return calls


@pytest.mark.parametrize("override", ["rl.lr=inf", "run.name=../escaped_run", "rl.lr=1e30",
                                      "rl.no_such_key=1"])
def test_cli_bad_config_one_line_before_any_flow(override, flow_calls, capsys):
    from flows.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "-p", "toy", override])
    assert e.value.code == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("error: invalid config")
    assert override.split("=")[0] in lines[0] and "Traceback" not in lines[0]
    assert flow_calls == []


@pytest.mark.parametrize("error", ["data", "divergence", "checkpoint"])
def test_cli_data_and_divergence_errors_one_line_traceback_with_debug(monkeypatch, capsys, error):
    import flows.train
    from flows.cli import main
    from relift_core.runtime.checkpoint import NonFiniteWeightsError
    from relift_core.runtime.trainer import DivergenceError

    exc = {"data": DataError("train.jsonl: line 3: invalid UTF-8 at byte offset 81"),
           "divergence": DivergenceError("training diverged: 3 optimizer steps in a row"),
           "checkpoint": NonFiniteWeightsError("step_000001: weights hold NaN or inf")}[error]

    def failing(**kwargs):
        raise exc

    monkeypatch.setattr(flows.train, "train", failing)
    with pytest.raises(SystemExit) as e:
        main(["train", "-p", "toy", "run.name=ok"])
    assert e.value.code == 1
    assert _stderr_lines(capsys) == [f"error: {exc}"]
    # --debug, before or after the command: the exception itself, with its traceback
    for argv in (["--debug", "train", "-p", "toy"], ["train", "-p", "toy", "--debug"]):
        with pytest.raises(type(exc)):
            main(argv)


def test_cli_bugs_keep_their_traceback(monkeypatch):
    import flows.train
    from flows.cli import main

    def buggy(**kwargs):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(flows.train, "train", buggy)
    with pytest.raises(KeyError):
        main(["train", "-p", "toy"])


def test_cli_config_command_reports_one_line(capsys):
    from flows.cli import main

    with pytest.raises(SystemExit) as e:
        main(["config", "-p", "toy", "sft.lr=nan"])
    assert e.value.code == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and "'sft.lr'" in lines[0] and "toy.yaml" in lines[0]


def test_prefect_console_tracebacks_of_user_errors_are_hidden():
    from flows.cli import _HideUserErrorTracebacks

    def record(exc):
        try:
            raise exc
        except type(exc):
            info = sys.exc_info()
        return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1,
                                 "Encountered exception during execution", None, info)

    hide = _HideUserErrorTracebacks()
    assert not hide.filter(record(DataError("bad row")))
    assert hide.filter(record(KeyError("a bug")))
    assert hide.filter(logging.LogRecord("prefect", logging.INFO, __file__, 1, "hi", None, None))


def test_routine_task_completions_are_quiet_on_the_console_but_failures_are_not():
    from tasks.progress import HideRoutineTaskStates

    def record(name, message, level=logging.INFO):
        return logging.LogRecord(name, level, __file__, 1, message, None, None)

    quiet = HideRoutineTaskStates()
    assert not quiet.filter(record("prefect.task_runs", "Finished in state Completed()"))
    assert quiet.filter(record("prefect.task_runs", "Finished in state Failed('boom')",
                               logging.ERROR))
    assert quiet.filter(record("prefect.task_runs", "Task run failed with exception ... - Retry 1/1"))
    assert quiet.filter(record("prefect.flow_runs", "Finished in state Completed()"))
    assert quiet.filter(record("prefect.flow_runs", "iter 3: acc 0.500"))
