"""A reduced `relift demo` (the README's main job): real pretraining of the proof-world's base
model, then RL, SFT and ReLIFT for a few iterations each, on Prefect and MLflow."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from relift_core.checkpoint import latest_checkpoint
from tests.test_flows import prefect_server  # noqa: F401  (shared server fixture)

pytestmark = pytest.mark.slow

REDUCED = ["run.iterations=3", "data.world.train_per_cell=24", "data.world.eval_per_cell=4",
           "eval.samples=2", "rl.prompts_per_step=12", "rl.mini_batch_size=12",
           "run.grader_workers=1"]


def test_reduced_demo_mechanics(prefect_server, tmp_path):  # noqa: F811
    from flows.demo import demo

    result = demo(preset="toy", overrides=REDUCED + [f"run.workdir={tmp_path}"], name="demo")

    # Every difficulty level is populated at the start (the base model on the training set).
    levels = result["train_levels"]
    assert all(levels.get(lv, 0) > 0 for lv in ("hardest", "hard", "medium", "easy")), levels

    # All three runs completed, in one MLflow parent run.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    children = client.search_runs(
        [client.get_experiment_by_name("relift").experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result['mlflow_run_id']}'")
    # rl, sft, relift, and the base model evaluated as a 0-iteration run (tagged rl).
    assert sorted(c.data.tags["relift.algorithm"] for c in children) == ["relift", "rl", "rl", "sft"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert set(result["tables"]["summary"]["accuracy"]) == {"base", "rl", "sft", "relift"}

    # ReLIFT fine-tuned only on questions that were hardest when they entered the buffer.
    state = json.loads((latest_checkpoint(tmp_path / "demo-relift" / "checkpoints")
                        / "state.json").read_text())["extra_state"]
    assert state["demos_used"] > 0 and len(state["sft_log"]) == state["demos_used"]
    assert {e["level_when_added"] for e in state["sft_log"]} == {"hardest"}
    # RL never fine-tunes; SFT fine-tunes on questions of every level.
    assert result["tables"]["summary"]["demos_used"]["rl"] == 0
    sft_state = json.loads((latest_checkpoint(tmp_path / "demo-sft" / "checkpoints")
                            / "state.json").read_text())["extra_state"]
    assert len({e["level_when_added"] for e in sft_state["sft_log"]}) > 1
    assert (tmp_path / "demo" / "comparison.png").stat().st_size > 0
