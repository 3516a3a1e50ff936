"""Bad input is refused at the edge with one clear message (issue 13, item 3): unsafe run names,
empty or unreadable data files, over-long prompts, no retries of errors retrying cannot fix, and
a CLI that prints one line (a traceback only with --debug) and validates the config before any
flow runs. Seconds, no Prefect server."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

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
    return {
        "data_source": "toy",
        "prompt": [SYSTEM, {"role": "user", "content": question}],
        "reward_model": {"ground_truth": answer, "style": "rule"},
        "extra_info": {"index": i},
    }


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------------- run names


@pytest.mark.parametrize(
    "name",
    ["../escaped_run", "it's", "", "a/b", ".hidden", "-x", "a b", "x" * 101, "run\n", "naïve"],
)
def test_unsafe_run_names_are_refused(name):
    with pytest.raises(ConfigError) as e:
        load_config("toy", {"run.name": name})
    assert "'run.name'" in str(e.value)


@pytest.mark.parametrize(
    "name",
    ["toy", "rl-s0", "sweep-relift-s1-sft_buffer_threshold4", "qwen2.5-math-7b", "x" * 100, "0"],
)
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


@pytest.mark.parametrize(
    "content", [b"", b"PAR1garbage-that-is-no-parquet-footerPAR1", b"\x00\x01 not parquet at all"]
)
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
    kept, dropped = filter_long_prompts(
        examples, count_tokens=count, max_tokens=128, origin="d.jsonl"
    )
    assert [e.uid for e in kept] == ["toy-0", "toy-2"]
    assert [(d.row, d.uid) for d in dropped] == [(1, "toy-1"), (3, "toy-3")]
    with pytest.raises(DataError, match=r"d\.jsonl: row 1 \(uid 'toy-1'\).*max_prompt_tokens=128"):
        filter_long_prompts(
            examples, count_tokens=count, max_tokens=128, origin="d.jsonl", policy="error"
        )
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
    assert any(
        "dropped 1 of 3 rows" in r.getMessage() and "row 1 (toy-1)" in r.getMessage()
        for r in caplog.records
    )
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


def _user_error_classes() -> list[type]:
    """Every error class relift_core defines, found by walking its modules (a new one is
    covered without editing this test)."""
    import importlib
    import inspect
    import pkgutil

    import relift_core

    classes = set()
    for info in pkgutil.walk_packages(relift_core.__path__, "relift_core."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Exception) and cls.__module__.startswith("relift_core."):
                classes.add(cls)
    return sorted(classes, key=lambda c: c.__qualname__)


def test_one_family_decides_the_exit_code_and_no_retry():
    """The CLI's one-line report (exit 1, or 2 for a config) and the tasks' "do not retry" are
    the same decision: UserError. Every public error of relift_core is one, from the config to
    a locked run; a private one (a grader's internal signal) is not."""
    from relift_core.errors import UserError, user_error_exit_code
    from tasks.retry import is_permanent_error

    public = [c for c in _user_error_classes() if not c.__name__.startswith("_")]
    names = {c.__name__ for c in public}
    assert {"ConfigError", "PlanError", "DataError", "ResumeRefused", "RunLockedError"} <= names
    for cls in public:
        assert issubclass(cls, UserError), f"{cls.__qualname__} is not a UserError"
        exc = cls("x")
        assert is_permanent_error(exc) and user_error_exit_code(exc) in (1, 2), cls
    assert {c.__name__ for c in public if c("x").exit_code == 2} == {"ConfigError", "PlanError"}
    for bug in (ValueError("x"), RuntimeError("x"), OSError("disk"), KeyError("k")):
        assert user_error_exit_code(bug) is None and not is_permanent_error(bug)


# ------------------------------------------------------------------------------------------ CLI


def _stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture
def flow_calls(monkeypatch):
    """flows.train.train replaced: records whether a flow (and so a Prefect server) started."""
    import flows.train

    calls = []
    monkeypatch.setattr(
        flows.train,
        "train",
        lambda **kw: calls.append(kw) or {"mlflow_run_id": "x", "demos_used": 0},
    )
    return calls


@pytest.mark.parametrize(
    "override", ["rl.lr=inf", "run.name=../escaped_run", "rl.lr=1e30", "rl.no_such_key=1"]
)
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

    exc = {
        "data": DataError("train.jsonl: line 3: invalid UTF-8 at byte offset 81"),
        "divergence": DivergenceError("training diverged: 3 optimizer steps in a row"),
        "checkpoint": NonFiniteWeightsError("step_000001: weights hold NaN or inf"),
    }[error]

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
        return logging.LogRecord(
            "prefect.flow_runs",
            logging.ERROR,
            __file__,
            1,
            "Encountered exception during execution",
            None,
            info,
        )

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
    assert quiet.filter(
        record("prefect.task_runs", "Finished in state Failed('boom')", logging.ERROR)
    )
    assert quiet.filter(
        record("prefect.task_runs", "Task run failed with exception ... - Retry 1/1")
    )
    assert quiet.filter(record("prefect.flow_runs", "Finished in state Completed()"))
    assert quiet.filter(record("prefect.flow_runs", "iter 3: acc 0.500"))


# ------------------------------------------------- issue 22: bad input found before any server


def test_a_preset_with_a_duplicate_key_is_refused_naming_key_and_file(tmp_path):
    preset = tmp_path / "dup.yaml"
    preset.write_text(
        "run: {name: a}\nrl: {lr: 1.0e-3}\nmodel: {source: tiny}\nrl: {prompts_per_step: 4}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(str(preset))
    assert str(e.value) == f"{preset}: key 'rl' appears twice (again on line 4)"
    nested = tmp_path / "nested.yaml"
    nested.write_text("rl:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"key 'lr' appears twice \(again on line 3\)"):
        load_config(str(nested))


@pytest.mark.parametrize("override", ["run.seed=-1", f"run.seed={2**32}", "data.world.seed=-1"])
def test_seeds_numpy_cannot_take_are_refused(override):
    with pytest.raises(ConfigError) as e:
        load_config("toy", [override])
    assert override.split("=")[0] in str(e.value)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["rollout.n=1"], "rollout.n=1 with algorithm.name=relift"),
        (["rollout.n=1", "algorithm.name=rl"], "always 0 for a group of one"),
        (["rollout.temperature=0"], "rollout.temperature=0 with rollout.n=8"),
    ],
)
def test_settings_under_which_rl_never_updates_are_refused_with_the_reason(overrides, reason):
    with pytest.raises(ConfigError) as e:
        load_config("toy", overrides)
    assert reason in str(e.value) and "{" not in str(e.value)  # the reason, not the whole input
    # Without RL the same settings are fine.
    load_config("toy", [*overrides, "algorithm.name=sft"])


def test_settings_the_data_refutes_are_refused_or_warned(tmp_path):
    from relift_core.data.preflight import settings_against_data
    from relift_core.data.prepared import load_training_source

    rows = [row(i, question=f"{i}+1?", answer=str(i + 1)) for i in range(5)]
    for r in rows[:3]:
        r["target"] = "<think>add</think> \\boxed{x}"
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = load_config(
        "toy",
        {
            "data.world": None,
            "data.train_path": path,
            "rl.prompts_per_step": 8,
            "algorithm.sft_buffer_threshold": 4,
        },
    )
    examples, source = load_training_source(cfg.data)
    with pytest.raises(ConfigError) as e:
        settings_against_data(cfg, examples, source)
    assert str(e.value).startswith(f"algorithm.sft_buffer_threshold=4 but {path} has only 3 ")
    ok = cfg.model_copy(
        update={"algorithm": cfg.algorithm.model_copy(update={"sft_buffer_threshold": 3})}
    )
    [warning] = settings_against_data(ok, examples, source)
    assert warning.startswith("rl.prompts_per_step=8 is more than the 5 training questions")


def test_a_numeric_question_under_a_choice_data_source_is_graded_as_maths(tmp_path, caplog):
    from flows.prepare_data import prepare_examples
    from relift_core.data.examples import Example
    from relift_core.grading.extraction import answer_type_for
    from relift_core.grading.grader import BatchGrader
    from relift_core.iteration import Rollouts, grade

    assert answer_type_for("gpqa_diamond", "147") == "math"
    assert (
        answer_type_for("gpqa_diamond", "C") == answer_type_for("gpqa_diamond", "(b)") == "choice"
    )
    assert answer_type_for("gpqa_diamond") == "choice"  # the name alone, as before
    question = Example(
        uid="q",
        data_source="gpqa_diamond",
        prompt=({"role": "user", "content": "7*21?"},),
        ground_truth="147",
    )

    class Sample:
        text = "<think>7*21</think> \\boxed{147}"

    with BatchGrader(workers=1) as grader:
        graded = grade(Rollouts([question], [[Sample()]]), grader, require_think=True)
    assert graded.grades[0][0].correct  # was wrong every time: letter grading of "147"

    records = [row(0, answer="147"), row(1, answer="B")]
    for r in records:
        r["data_source"] = "gpqa_diamond"
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    with caplog.at_level(logging.WARNING):
        prepare_examples(DataConfig(train_path=path), tmp_path / "out")
    [warning] = [r.getMessage() for r in caplog.records if "multiple-choice" in r.getMessage()]
    assert "1 rows" in warning and "row 0" in warning and "'147'" in warning


def test_an_absolute_benchmark_path_is_named_by_its_stem(tmp_path, monkeypatch):
    """MLflow refused `heldout//tmp/.../set.parquet/avg_at_k` at the step-0 evaluation."""
    from mlflow.utils.validation import _validate_metric_name

    from relift_core.tracker import InMemoryTracker
    from tasks import eval_tasks

    path = tmp_path / "my set.d" / "held_out.jsonl"
    path.parent.mkdir()
    write_jsonl(path, [row(0, answer="2"), row(1, question="2+2?", answer="4")])
    cfg = load_config("toy", {"eval.benchmarks": [str(path)]})
    summary = {"avg_at_k": 0.5, "k": 1, "questions": 2}
    seen = []
    monkeypatch.setattr(
        eval_tasks,
        "evaluate_one",
        lambda *a, **kw: seen.append(a[3].unwrap().name) or ([], summary),
    )
    for artifact in ("create_markdown_artifact", "create_table_artifact"):
        monkeypatch.setattr(eval_tasks, artifact, lambda **kw: None)
    tracker = InMemoryTracker()
    summaries = eval_tasks.evaluate_all(
        None,
        None,
        None,
        names=cfg.eval.benchmarks,
        eval_cfg=cfg.eval,
        out_dir=tmp_path / "eval",
        tracker=tracker,
        step=0,
        require_think=True,
        seed=0,
        label="t",
    )
    assert seen == ["held_out"] and list(summaries) == ["held_out"]
    keys = [key for _, metrics in tracker.metrics for key in metrics]
    assert "heldout/held_out/avg_at_k" in keys
    for key in keys:
        _validate_metric_name(key)  # raises for what MLflow would refuse


def _cli(*args: str):
    import os
    import subprocess
    import time

    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)  # so that a server would be started, were one needed
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=str(REPO),
        check=False,
    )
    return done, time.monotonic() - start


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["run.seed=-1"], 2, "'run.seed'"),
        (["rollout.n=1"], 2, "rollout.n=1"),
        (["algorithm.sft_buffer_threshold=100000"], 2, "would never fill"),
        (["eval.benchmarks=[/no/such/set.parquet]"], 1, "/no/such/set.parquet: no such file"),
        (["data.world=null", "data.train_path=BAD", "eval.benchmarks=[]"], 1, "row 1"),
        (["evaluate --model toy --benchmarks world,nope"], 1, "unknown benchmark 'nope'"),
    ],
)
def test_cli_refuses_config_and_data_in_one_line_before_a_server_starts(tmp_path, args, code, says):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(row(0)) + "\n" + json.dumps({"prompt": "q"}) + "\n")
    args = [a.replace("BAD", str(bad)) for a in args]
    command = args[0].split() if args[0].startswith("evaluate") else ["train", "-p", "toy"]
    args = args[1:] if args[0].startswith("evaluate") else args
    done, seconds = _cli(*command, f"run.workdir={tmp_path}", *args)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == code, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    # A Prefect server takes 20-110 s to start here; the checks take about one.
    assert seconds < 15, seconds
    assert "server" not in done.stdout.lower() + done.stderr.lower()
    assert not (tmp_path / "mlflow.db").exists()
