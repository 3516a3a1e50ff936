"""A reduced `relift demo` (the README's main job): real pretraining of the proof-world's base
model, then RL, SFT and ReLIFT for a few iterations each over two seeds, two trainings at a time
in worker processes, on Prefect and MLflow; results.json with confidence intervals."""

from __future__ import annotations

import json
import os

import pytest
from mlflow import MlflowClient

from relift_core.runtime.checkpoint import latest_checkpoint
from tests.conftest import REDUCED_DEMO

pytestmark = pytest.mark.slow


def test_reduced_demo_two_seeds(prefect_server, tmp_path):
    from flows.demo import demo

    api_url_before = os.environ.get("PREFECT_API_URL")
    result = demo(
        preset="toy",
        overrides=REDUCED_DEMO + [f"run.workdir={tmp_path}"],
        name="demo",
        seeds=[0, 1],
    )
    summary = result["summary"]
    # The workers were pointed at this flow's server for its life only.
    assert os.environ.get("PREFECT_API_URL") == api_url_before

    # results.json: the documented shape, one entry per method, the paper's four claims.
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["seconds"] > 0
    assert set(saved["runs"]) == {"base", "rl", "sft", "relift"}
    for run in saved["runs"].values():
        lo, hi = run["ci"]
        assert lo <= run["accuracy"] <= hi
        assert set(run["by_level"]) == {"hardest", "hard", "medium", "easy"}
    assert set(saved["differences"]) == {
        "rl-base@non_hardest",
        "sft-rl@hardest",
        "relift-rl",
        "relift-sft",
    }
    assert saved == json.loads(json.dumps(summary))

    # Eight trainings (4 methods x 2 seeds) under one MLflow parent, all finished.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    children = client.search_runs(
        [client.get_experiment_by_name("relift").experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result['mlflow_run_id']}'",
    )
    assert len(children) == 8 and all(c.info.status == "FINISHED" for c in children)
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.params["demo.seeds"] == "0,1"
    for method, run in saved["runs"].items():
        assert parent.data.metrics[f"{method}/heldout_accuracy"] == pytest.approx(run["accuracy"])
    # Claim keys hold '@', which MLflow metric names may not: logged with '_at_' instead.
    for claim, diff in saved["differences"].items():
        if diff["mean"] is not None:
            key = "diff/" + claim.replace("@", "_at_")
            assert parent.data.metrics[key] == pytest.approx(diff["mean"])

    # ReLIFT fine-tuned only on questions that were hardest when they entered the buffer; RL
    # never fine-tunes; SFT fine-tunes on questions of every level.
    tag = saved["config_hash"]
    state = json.loads(
        (
            latest_checkpoint(tmp_path / f"relift-s0-demo-{tag}" / "checkpoints") / "state.json"
        ).read_text()
    )["extra_state"]
    assert len(state["sft_log"]) == state["demos_used"]
    assert {e["level_when_added"] for e in state["sft_log"]} <= {"hardest"}
    assert summary["runs"]["rl"]["demos_used"] == 0
    assert summary["runs"]["sft"]["demos_used"] == 3 * 12
    assert (tmp_path / "demo" / "comparison.png").stat().st_size > 0
    # The report (tables with CIs, training curves, level shares) is on the parent run too.
    logged = {a.path for a in client.list_artifacts(result["mlflow_run_id"], "report")}
    assert {"report/report.md", "report/training_curves.png", "report/level_shares.png"} <= logged
    report = (tmp_path / "demo" / "report" / "report.md").read_text()
    assert "95% t-interval" in report and "| sft " in report

    # A changed override never reuses these runs: it gets another config hash, fresh run names.
    again = demo(
        preset="toy",
        overrides=REDUCED_DEMO + [f"run.workdir={tmp_path}", "rl.lr=1e-5"],
        name="demo",
        seeds=[0],
        algorithms=["rl"],
    )
    assert again["summary"]["config_hash"] != tag
    assert (tmp_path / f"rl-s0-demo-{again['summary']['config_hash']}").is_dir()


def test_demo_runs_relift_with_teacher_demonstrations(prefect_server, tmp_path):
    """The teacher option end to end in the proof-world: a teacher model (pretrained without
    the world's gaps) writes demonstrations for the hardest questions; only those the grader
    verifies are used, and the demo's report says how many."""
    from flows.demo import TEACHER_METHOD, demo

    result = demo(
        preset="toy",
        overrides=REDUCED_DEMO + [f"run.workdir={tmp_path}"],
        name="demo",
        seeds=[0],
        algorithms=["relift", TEACHER_METHOD],
    )
    summary = result["summary"]
    assert set(summary["runs"]) == {"base", "relift", TEACHER_METHOD}
    teacher = summary["teacher"]
    assert teacher["teacher_verified"] + teacher["teacher_rejected"] > 0
    assert summary["runs"][TEACHER_METHOD]["demos_used"] <= teacher["teacher_verified"]
    assert (
        f"{TEACHER_METHOD}: ReLIFT with demonstrations from a teacher model" in result["markdown"]
    )
    assert f"{teacher['teacher_verified']} verified and used" in result["markdown"]
    # Two base models: the students' and the teacher's (another world: no gaps), both cached.
    assert len(list((tmp_path / "base_models").iterdir())) == 2
