"""A run name is one experiment, held by one process: resume refuses another config (naming the
keys), run.resume=force resumes anyway and says so, a second process is refused at once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from relift_core.config import load_config
from relift_core.data.examples import examples_from_records
from relift_core.proofworld.problems import build_world, problem_to_record
from relift_core.runtime.run_lock import RunLock, RunLockedError
from relift_core.runtime.session import ResumeRefused, build_session
from tests.conftest import TINY_SESSION, world_session

TINY = [*TINY_SESSION, "run.name=ref", "algorithm.name=relift"]


def session_for(tmp_path, *extra: str):
    return world_session(load_config("toy", [*TINY, f"run.workdir={tmp_path}", *extra]))


@pytest.fixture
def finished_run(tmp_path):
    session = session_for(tmp_path)
    session.state.iteration = 1
    session.save()
    session.close()
    return tmp_path


def test_same_config_resumes(finished_run):
    # Neither is an experiment key.
    session = session_for(finished_run, "run.iterations=50", "eval.samples=3")
    try:
        assert session.resumed_from is not None and session.state.iteration == 1
        assert session.resumed_with_changes == {}
    finally:
        session.close()


def test_changed_config_is_refused_naming_the_keys(finished_run):
    with pytest.raises(ResumeRefused) as err:
        session_for(finished_run, "rl.lr=0.01", "algorithm.name=rl")
    message = str(err.value)
    assert "rl.lr: 0.0003 -> 0.01" in message and "algorithm.name: 'relift' -> 'rl'" in message
    assert "run.resume=force" in message
    # A seed change is named as what it is, not as "the training set changed".
    with pytest.raises(ResumeRefused, match="run.seed: 0 -> 1"):
        session_for(finished_run, "run.seed=1")
    # Nothing was locked or written by the refused attempts.
    assert not RunLock(finished_run / "ref").acquire().release()


def test_force_resumes_and_records_the_changes(finished_run):
    session = session_for(finished_run, "rl.lr=0.01", "run.resume=force")
    try:
        assert session.state.iteration == 1
        assert session.resumed_with_changes == {"rl.lr": (0.0003, 0.01)}
    finally:
        session.close()


def test_never_starts_over_and_keeps_the_old_checkpoints_aside(finished_run):
    session = session_for(finished_run, "run.resume=never", "rl.lr=0.01")  # any config
    try:
        assert session.resumed_from is None and session.state.iteration == 0
        assert session.started_over is not None
        assert (session.started_over / "step_000001" / "manifest.json").is_file()
        assert not (finished_run / "ref" / "checkpoints").exists()
    finally:
        session.close()


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
    session = session_for(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            session_for(tmp_path)
    finally:
        session.close()
    session_for(tmp_path).close()  # released on close


def test_the_lock_dies_with_its_holder(tmp_path):
    run_dir = tmp_path / "held"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        from relift_core.runtime.run_lock import RunLock
        RunLock({str(run_dir)!r}).acquire()
        print("locked", flush=True)
        time.sleep(60)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {child.pid}"):
            RunLock(run_dir).acquire()
        child.kill()  # SIGKILL: no cleanup code runs
        child.wait()
        RunLock(run_dir).acquire().release()
    finally:
        child.kill()


def test_sweep_run_names_carry_the_shared_config_and_the_scheduled_date():
    from flows.sweep import point_name, sweep_prefix

    base = load_config("toy", [])
    prefix = sweep_prefix("weekly", base, ["algorithm.sft_buffer_threshold"])
    assert prefix.startswith("weekly-") and len(prefix) == len("weekly-") + 8
    # The swept key and the point's own keys are in the point name, not the hash.
    other_point = load_config("toy", ["algorithm.sft_buffer_threshold=4", "run.seed=3"])
    assert sweep_prefix("weekly", other_point, ["algorithm.sft_buffer_threshold"]) == prefix
    # Any other shared setting gives other run names: never a resume of another experiment.
    changed = load_config("toy", ["rl.lr=1e-4"])
    assert sweep_prefix("weekly", changed, ["algorithm.sft_buffer_threshold"]) != prefix
    dated = sweep_prefix("weekly", base, ["algorithm.sft_buffer_threshold"], "20261123")
    assert dated.startswith("weekly-20261123-") and dated != prefix
    name = point_name(
        dated, {"algorithm.name": "rl", "run.seed": 0, "algorithm.sft_buffer_threshold": 8}
    )
    # Method and seed first: what a runs table's truncated name column still shows.
    assert name == f"rl-s0-sft_buffer_threshold8-{dated}"
    load_config("toy", [f"run.name={name}"])  # a valid run name


@pytest.mark.parametrize("enabled", [False, True])
def test_model_gradient_checkpointing_does_what_the_config_says(tmp_path, enabled):
    session = session_for(tmp_path, f"model.gradient_checkpointing={str(enabled).lower()}")
    try:
        assert session.trainer.model.is_gradient_checkpointing is enabled
    finally:
        session.close()


# --- issue 22: corruption of any kind falls back the same way, never a silent restart ---------


@pytest.fixture
def two_checkpoints(tmp_path):
    session = session_for(tmp_path)
    for step in (1, 2):
        session.state.iteration = step
        session.save()
    session.close()
    return tmp_path, tmp_path / "ref" / "checkpoints"


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))  # same size: only the hash can tell


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


def _remove_manifest(step_dir):
    (step_dir / "manifest.json").unlink()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: _flip_a_byte(d / "trainer_state.pt"), "sha256"),
        (lambda d: _truncate(d / "model" / "model.safetensors"), "bytes"),
        (lambda d: (d / "rng_state.pt").unlink(), "missing"),
        (_remove_manifest, "manifest.json is missing"),  # a half-written step directory
    ],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_and_says_so(
    two_checkpoints, damage, reason, caplog
):
    workdir, checkpoints = two_checkpoints
    damage(checkpoints / "step_000002")
    with caplog.at_level("WARNING"):
        session = session_for(workdir)
    try:
        assert session.resumed_from == checkpoints / "step_000001"
        assert session.state.iteration == 1
        [(path, why)] = session.skipped_checkpoints
        assert path.endswith("step_000002") and reason in why
        assert not (checkpoints / "step_000002").exists()  # the unusable one is removed
    finally:
        session.close()
    assert any(
        "skipping checkpoint" in r.getMessage() and "step_000002" in r.getMessage()
        for r in caplog.records
    )


def test_no_usable_checkpoint_is_refused_never_a_silent_restart(two_checkpoints):
    workdir, checkpoints = two_checkpoints
    for step in ("step_000001", "step_000002"):
        _truncate(checkpoints / step / "model" / "model.safetensors")
    with pytest.raises(ResumeRefused) as err:
        session_for(workdir)
    message = str(err.value)
    assert "no usable checkpoint" in message and "run.resume=never" in message
    assert "step_000002" in message and "\n" not in message
    assert len(list(checkpoints.iterdir())) == 2  # nothing overwritten, nothing removed
    session = session_for(workdir, "run.resume=never")  # the explicit start-over
    try:
        assert session.state.iteration == 0 and session.started_over is not None
    finally:
        session.close()


def test_a_copy_of_an_old_step_under_a_newer_name_is_not_trusted(two_checkpoints):
    import shutil

    from relift_core.runtime.checkpoint import latest_checkpoint

    workdir, checkpoints = two_checkpoints
    shutil.copytree(checkpoints / "step_000001", checkpoints / "step_000009")
    assert latest_checkpoint(checkpoints) == checkpoints / "step_000002"
    session = session_for(workdir)
    try:
        assert session.state.iteration == 2
        assert "manifest of step 1" in session.skipped_checkpoints[0][1]
        session.state.iteration = 3
        session.save()  # pruning keeps the two newest real steps
    finally:
        session.close()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000002", "step_000003"]


def test_resuming_on_rewritten_training_data_is_refused(finished_run):
    cfg = load_config("toy", [*TINY, f"run.workdir={finished_run}"])
    problems = build_world(cfg.data.world)["train"]
    records = [problem_to_record(p, index=i) for i, p in enumerate(problems)]
    records[0]["reward_model"]["ground_truth"] = "12345"  # same row count, another gold
    dataset = examples_from_records(records, origin="world")
    with pytest.raises(ResumeRefused, match=r"\(training data\)"):
        build_session(cfg, dataset)
