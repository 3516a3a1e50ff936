"""Lineage across attempts (issue 22): an MLflow run is continued only by the same experiment
(config and training data), each step's metrics are logged once however often a run resumes,
first runs started together in one work directory both get their store, and a checkpoint that
cannot be written (a full disk) is one line naming the path and the cause. The embedded SQLite
store, no server."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from relift_core.config import load_config
from relift_core.runtime.session import ResumeRefused
from tasks.tracking import open_run

REPO = Path(__file__).resolve().parent.parent


def _cfg(workdir: Path, *overrides: str):
    return load_config("toy", [f"run.workdir={workdir}", "run.name=lineage", *overrides])


def _open(cfg, data="data-a", **kw):
    return open_run(
        cfg,
        run_key=str(cfg.run_dir().resolve()),
        run_name=cfg.run.name,
        data_fingerprint=data,
        **kw,
    )


def test_an_mlflow_run_is_continued_only_by_the_same_experiment(tmp_path):
    cfg = _cfg(tmp_path)
    first = _open(cfg)
    first.log_params(cfg.flat_params())
    assert _open(cfg).run_id == first.run_id  # the same experiment continues its run
    # No checkpoint is involved: the MLflow run itself says which experiment made it.
    other = _cfg(tmp_path, "algorithm.name=rl", "rl.lr=0.001")
    with pytest.raises(ResumeRefused) as err:
        _open(other)
    message = str(err.value)
    assert "algorithm.name: 'relift' -> 'rl'" in message and "rl.lr: '0.0003' -> '0.001'" in message
    with pytest.raises(ResumeRefused, match=r"\(training data\): 'data-a' -> 'data-b'"):
        _open(cfg, data="data-b")  # rewritten questions or golds, same row count
    forced = _open(_cfg(tmp_path, "rl.lr=0.001", "run.resume=force"))
    assert forced.run_id == first.run_id
    tags = forced.client.get_run(forced.run_id).data.tags
    assert "rl.lr" in tags["relift.resumed_with_changes"]
    fresh = _open(cfg, start_over=True)  # run.resume=never
    assert fresh.run_id != first.run_id


def test_a_redone_step_is_logged_once(tmp_path):
    cfg = _cfg(tmp_path)
    tracker = _open(cfg)
    for step in range(3):
        tracker.log_metrics({"accuracy": step / 10, "loss": 1.0 - step / 10}, step=step)
    # The attempt died after logging step 2 but before its checkpoint: it resumes at step 2.
    again = _open(cfg)
    again.skip_logged_steps_from(2)
    for step in range(2, 5):
        again.log_metrics({"accuracy": step / 10, "loss": 1.0 - step / 10}, step=step)
    for key in ("accuracy", "loss"):
        steps = [m.step for m in again.client.get_metric_history(again.run_id, key)]
        assert sorted(steps) == [0, 1, 2, 3, 4], (key, steps)  # was 0,1,2,2,3,4


def test_first_runs_started_together_in_one_workdir_all_get_the_store(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from relift_core.config import load_config
        from tasks.tracking import experiment_id, get_client
        cfg = load_config("toy", ["run.workdir={tmp_path}"])
        client = get_client(cfg)
        client.create_run(experiment_id(client, cfg))
        print("ok")
    """)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    # Before the lock: one "ok", the others `OperationalError: table runs already exists`
    # (or `duplicate column name: step`, a migration run twice).
    assert [out.strip() for out, _ in results] == ["ok"] * 3, [err[-300:] for _, err in results]


def test_a_full_disk_during_a_checkpoint_is_one_line_naming_path_and_cause(tmp_path):
    """The file size limit makes the kernel refuse writes past 64 KiB, as a full disk does;
    torch reported it as `inline_container.cc:672 ... unexpected pos` and it was retried."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM
        from relift_core.runtime.checkpoint import (
            CheckpointError,
            latest_checkpoint,
            save_checkpoint,
        )
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1,
                                             intermediate_size=32))
        big = {{"exp_avg": torch.zeros(200_000)}}  # 800 kB of optimizer state
        save_checkpoint({str(tmp_path)!r}, model=model, trainer_state={{}}, step=1)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        try:
            save_checkpoint({str(tmp_path)!r}, model=model, trainer_state=big, step=2)
        except CheckpointError as e:
            print("ERROR", type(e).__name__, str(e))
        print("LATEST", latest_checkpoint({str(tmp_path)!r}).name)
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    lines = done.stdout.splitlines()
    [error] = [line for line in lines if line.startswith("ERROR")]
    assert error.startswith(
        f"ERROR CheckpointWriteError cannot write checkpoint "
        f"{tmp_path / 'step_000002'}: File too large"
    ), done.stderr[-2000:]
    assert "LATEST step_000001" in lines  # the kept checkpoint is intact and still the latest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # no partial copy

    from relift_core.runtime.checkpoint import CheckpointWriteError
    from tasks.retry import is_permanent_error

    assert is_permanent_error(CheckpointWriteError("x"))  # not retried


def test_the_preparation_cache_keys_on_content_not_mtime(tmp_path):
    import os

    from relift_core.config import DataConfig
    from relift_core.data.prepared import data_key

    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "1+1?", "reward_model": {"ground_truth": "2"}}\n')
    data = DataConfig(train_path=str(path))
    before = data_key(data, seed=0)
    stat = path.stat()
    path.write_text('{"prompt": "1+1?", "reward_model": {"ground_truth": "3"}}\n')  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the mtime put back
    assert data_key(data, seed=0) != before  # was a cache hit on the old golds
    path.write_text('{"prompt": "1+1?", "reward_model": {"ground_truth": "2"}}\n')
    assert data_key(data, seed=0) == before  # the same content is the same key


def test_checkpoint_files_are_readable_like_the_rest_of_the_run_directory(tmp_path, tokenizer):
    import stat

    from relift_core.config import TinyModelConfig
    from relift_core.runtime.checkpoint import save_checkpoint
    from relift_core.runtime.models import build_tiny_model

    model = build_tiny_model(TinyModelConfig(), tokenizer)
    step = save_checkpoint(tmp_path, model=model, trainer_state={}, step=1)
    ordinary = tmp_path / "ordinary.txt"
    ordinary.write_text("x")
    modes = {
        p.relative_to(step).as_posix(): stat.S_IMODE(p.stat().st_mode)
        for p in step.rglob("*")
        if p.is_file()
    }
    # The weights were 0600.
    assert set(modes.values()) == {stat.S_IMODE(ordinary.stat().st_mode)}, modes
