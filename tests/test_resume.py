"""Kill a real training run with SIGKILL mid-iteration, re-run it with the same run name, and
check it finishes as if nothing happened: no iteration lost beyond the one in flight, no
demonstration dropped or duplicated (compared with an uninterrupted run of the same seed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from relift_core.runtime.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
ITERATIONS = 6


def _command(tiny_overrides: list[str], workdir: Path) -> list[str]:
    # Longer rollouts than tiny_overrides' so an iteration lasts long enough to be killed inside it.
    overrides = tiny_overrides + [
        "algorithm.name=relift",
        "run.name=resumable",
        f"run.workdir={workdir}",
        f"run.iterations={ITERATIONS}",
        "eval.benchmarks=[]",
        "rollout.n=8",
        "rollout.max_new_tokens=64",
    ]
    return [sys.executable, "-m", "flows.cli", "train", "--preset", "toy", *overrides]


def _env() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}


def _final_state(workdir: Path) -> dict:
    ckpt = latest_checkpoint(workdir / "resumable" / "checkpoints")
    assert ckpt is not None
    return json.loads((ckpt / "state.json").read_text())


def test_sigkill_then_resume_loses_nothing(tiny_overrides, prefect_server, tmp_path):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    env = _env()

    proc = subprocess.Popen(
        _command(tiny_overrides, killed),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpts = killed / "resumable" / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and not (ckpts / "step_000002").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.02)
    time.sleep(0.3)  # into iteration 2
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    before = latest_checkpoint(ckpts)
    # Killed mid-run: at least 2 iterations checkpointed, the last one not.
    assert before is not None and 2 <= int(before.name.split("_")[1]) < ITERATIONS, before

    # The killed run resumed to its end, then an uninterrupted one of the same seed to compare.
    for workdir in (killed, reference):
        subprocess.run(
            _command(tiny_overrides, workdir),
            cwd=REPO,
            env=env,
            check=True,
            timeout=900,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    resumed, ref = _final_state(killed), _final_state(reference)
    assert resumed["step"] == ref["step"] == ITERATIONS
    extra, ref_extra = resumed["extra_state"], ref["extra_state"]
    # The same demonstrations entered, waited and were used, in the same order.
    assert extra["buffer"] == ref_extra["buffer"]
    assert extra["demos_used"] == ref_extra["demos_used"]
    assert extra["ledger"] == ref_extra["ledger"]
    assert extra["stream"] == ref_extra["stream"]

    # One MLflow run across both attempts, with every iteration's metrics.
    client = MlflowClient(tracking_uri=f"sqlite:///{killed / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("relift").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = {h.step for h in client.get_metric_history(runs[0].info.run_id, "rollout_accuracy")}
    assert steps == set(range(ITERATIONS))
