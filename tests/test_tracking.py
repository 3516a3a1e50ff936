"""The MLflow side of a run, on a real SQLite store: the experiment opens in MLflow's
model-training view with a saved runs-table view, and every run has system metrics from its
start and its end however short it is."""

from __future__ import annotations

import json

from relift_core.config import load_config
from tasks.tracking import (
    RUNS_VIEW_KEY,
    close_run,
    get_client,
    open_run,
    runs_view_url,
    runs_views_in_store,
)


def _cfg(tmp_path, *extra):
    return load_config(
        "toy", [f"run.workdir={tmp_path}", "eval.benchmarks=[world,/d/aime.parquet]", *extra]
    )


def test_the_experiment_is_a_training_experiment_with_the_methods_view(tmp_path):
    cfg = _cfg(tmp_path)
    tracker = open_run(cfg, run_key="k", run_name="rl-s0")
    close_run(tracker)
    client = get_client(cfg)
    exp = client.get_experiment_by_name("relift")
    # What MLflow 3's UI reads to open the training view rather than its GenAI view.
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # A named view, as MLflow's "Views" menu lists them: the table's state inside an envelope.
    envelope = json.loads(exp.tags[f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"])
    assert envelope["name"] == "Runs by method"
    assert envelope["createdAt"] == envelope["updatedAt"] > 0
    view = json.loads(envelope["state"])
    assert view["selectedColumns"] == [
        "tags.`relift.algorithm`",
        "params.`run.seed`",
        "metrics.`heldout/world/avg_at_k`",
        "metrics.`heldout/aime/avg_at_k`",
        "metrics.`demos_used`",
    ]
    # Method and seed first: MLflow would put metrics first and render only the columns in view.
    assert view["columnOrder"] == view["selectedColumns"]
    assert view["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "relift.algorithm"}]
    assert runs_view_url(client, exp.experiment_id).endswith(
        f"/#/experiments/{exp.experiment_id}/runs?viewStateShareKey={RUNS_VIEW_KEY}"
        "&workflowType=machine_learning"
    )
    # `relift ui` lists the view of each experiment of its store.
    assert runs_views_in_store(tmp_path / "mlflow.db", "http://127.0.0.1:5001") == [
        (
            "relift",
            f"http://127.0.0.1:5001/#/experiments/{exp.experiment_id}/runs"
            f"?viewStateShareKey={RUNS_VIEW_KEY}&workflowType=machine_learning",
        )
    ]
    assert runs_views_in_store(tmp_path / "none.db", "http://127.0.0.1:5001") == []
    # The next run leaves the view as it is; an experiment made before (no kind) is marked.
    close_run(open_run(cfg, run_key="k1", run_name="rl-s2"))
    assert client.get_experiment(exp.experiment_id).tags == exp.tags
    client.delete_experiment_tag(exp.experiment_id, "mlflow.experimentKind")
    close_run(open_run(cfg, run_key="k2", run_name="rl-s1"))
    assert client.get_experiment(exp.experiment_id).tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )


def test_a_run_shorter_than_the_sampling_interval_has_system_metrics_at_start_and_end(tmp_path):
    cfg = _cfg(tmp_path)
    tracker = open_run(cfg, run_key="short", run_name="short")
    tracker.start_system_metrics(60.0)  # no sample of the monitor's own loop in this run
    close_run(tracker)
    client = get_client(cfg)
    history = client.get_metric_history(tracker.run_id, "system/cpu_utilization_percentage")
    assert [h.step for h in history] == [0, 1], history
