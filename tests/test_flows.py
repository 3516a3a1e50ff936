"""The orchestration layer end to end: real Prefect server (one test harness for the session),
real MLflow SQLite store, the tiny model on CPU."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.commands import RELIFT, own_prefect_env, run_command

pytestmark = pytest.mark.slow


def flow_run_name_of(flow_run_id: str) -> str:
    import asyncio

    from prefect import get_client

    async def read():
        async with get_client() as pc:
            return (await pc.read_flow_run(flow_run_id)).name

    return asyncio.run(read())


def _table_artifact(flow_run_id: str, key: str) -> list[dict]:
    """The rows of the table artifact `key` of a flow run, as the Prefect API serves them."""
    import asyncio
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    async def read():
        async with get_client() as pc:
            return await pc.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])),
            )

    (artifact,) = asyncio.run(read())
    data = artifact.data
    return json.loads(data) if isinstance(data, str) else data


def _overrides(tiny: list[str], tmp: Path, algo: str) -> list[str]:
    return tiny + [
        f"algorithm.name={algo}",
        f"run.name={algo}",
        f"run.workdir={tmp}",
        "tracking.system_metrics_interval_s=0.2",
    ]  # a sample even in a short run


@pytest.mark.parametrize("algo", ["relift", "rl", "sft", "sft_then_rl", "luffy", "dapo"])
def test_train_each_algorithm_three_iterations(
    tiny_overrides, prefect_server, tmp_path_factory, algo
):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.train import train

    tmp = tmp_path_factory.mktemp(algo)
    state = train(preset="toy", overrides=_overrides(tiny_overrides, tmp, algo), return_state=True)
    assert state.is_completed(), state
    result = state.result()
    # Logging the policy through MLflow's fluent API left no global store behind.
    assert "MLFLOW_TRACKING_URI" not in os.environ

    # MLflow: params, per-step metrics, config artifact, dataset inputs, final status.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["algorithm.name"] == algo
    assert run.data.tags["relift.algorithm"] == algo
    history = client.get_metric_history(run.info.run_id, "rollout_accuracy")
    assert [h.step for h in history] == [0, 1, 2]
    for key in (
        "reward_mean",
        "solve_none",
        "solve_all",
        "frac_hardest",
        "frac_easy",
        "buffer_size",
        "demos_used",
        "response_length_mean",
        "time/rollout",
    ):
        assert key in run.data.metrics, key
    if algo in ("rl", "relift", "dapo"):
        assert "rl/policy_loss" in run.data.metrics or "rl/rl_skipped" in run.data.metrics
    if algo == "luffy":  # every group has the demonstration's signal: the RL step always runs
        assert "rl/off_policy_prob" in run.data.metrics and run.data.metrics["demos_used"] > 0
    if algo == "dapo":
        draws = client.get_metric_history(run.info.run_id, "dynamic_sampling/draws")
        assert [h.step for h in draws] == [0, 1, 2] and all(h.value >= 1 for h in draws)
    if algo in ("sft", "sft_then_rl"):
        assert "sft/sft_loss" in run.data.metrics
    if algo == "rl":
        assert run.data.metrics["demos_used"] == 0
    assert any(k.startswith("heldout/world/") for k in run.data.metrics)
    # Evaluated at the start too (every curve starts at the starting policy), every 2 iterations
    # and at the end; per-question records as tables the MLflow UI previews.
    eval_steps = [
        h.step for h in client.get_metric_history(run.info.run_id, "heldout/world/avg_at_k")
    ]
    assert eval_steps[0] == 0 and 3 in eval_steps
    table = json.loads(
        Path(
            client.download_artifacts(
                run.info.run_id, "eval/step_000000/world.records.json", str(tmp)
            )
        ).read_text()
    )
    assert {"uid", "accuracy", "ground_truth", "first_response"} <= set(table["columns"])
    assert len(table["data"]) > 0
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "sft_demonstrations.jsonl"} <= artifacts
    # The policy as an MLflow model (transformers flavour): listed with the run, registrable.
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
    )
    assert [m.name for m in models] == [algo]  # named after its run
    assert run.data.tags["relift.policy_model_uri"] == f"models:/{models[0].model_id}"
    if algo == "relift":
        import mlflow

        client.create_registered_model("relift-policy")
        version = client.create_model_version(
            "relift-policy", models[0].artifact_location, run_id=run.info.run_id
        )
        assert int(version.version) == 1 and version.status == "READY"
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        with _use_tracking_uri(client.tracking_uri):
            pipeline = mlflow.transformers.load_model(f"models:/{models[0].model_id}")
        assert type(pipeline).__name__ == "TextGenerationPipeline"
    assert run.data.tags["relift.final_checkpoint"].endswith("step_000003")
    inputs = run.inputs.dataset_inputs
    assert {d.dataset.name for d in inputs} >= {"train", "world"}

    # Prefect: the flow run points at MLflow, and every phase ran as a task run.
    import asyncio

    async def task_names():
        async with get_client() as pc:
            flow_run_id = run.data.tags["prefect.flow_run_id"]
            by_flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            runs = await pc.read_task_runs(flow_run_filter=by_flow_run)
            return {r.name.rsplit("-", 1)[0] for r in runs if r.state.is_completed()}

    names = asyncio.run(task_names())
    # Links both ways: the MLflow run's description clicks to the flow run; the flow run has a
    # link artifact opening the MLflow run in its training (machine-learning) view.
    flow_run_id = run.data.tags["prefect.flow_run_id"]
    assert f"/runs/flow-run/{flow_run_id})" in run.data.tags["mlflow.note.content"]
    assert result["prefect_url"].endswith(f"/runs/flow-run/{flow_run_id}")

    async def link_artifacts():
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        async with get_client() as pc:
            return await pc.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
                )
            )

    # (Prefect stores a link artifact as markdown `[text](link)`.)
    links = [a for a in asyncio.run(link_artifacts()) if a.key == "mlflow-run"]
    assert any(
        result["mlflow_run_id"] in a.data and "workflowType=machine_learning" in a.data
        for a in links
    ), [a.data for a in links]
    # The progress artifact (updated at most every few seconds) ends at 100%.
    progress = [a for a in asyncio.run(link_artifacts()) if a.type == "progress"]
    assert [a.data for a in progress] == [100.0], [(a.type, a.data) for a in progress]
    assert flow_run_name_of(flow_run_id) == f"train-{algo}"
    assert {
        "rollout",
        "grade",
        "classify-difficulty",
        "collect-demonstrations",
        "checkpoint",
    } <= names
    assert ("rl-update" in names) == (algo != "sft")
    assert ("mix-demonstrations" in names) == (algo == "luffy")


def test_sweep_nests_child_runs_and_compare_reads_them(tiny_overrides, prefect_server, tmp_path):
    from analysis.compare import runs_table
    from flows.sweep import sweep

    # Evaluated on the world: compare reads it.
    overrides = tiny_overrides + [f"run.workdir={tmp_path}", "run.iterations=1"]
    result = sweep(
        preset="toy",
        algorithms=["rl", "relift"],
        seeds=[0],
        grid={"algorithm.sft_buffer_threshold": [2, 4]},
        overrides=overrides,
        name="abl",
    )
    assert len(result["runs"]) == 4
    # Each point says how it ended, as a fanned-out sweep's points do (test_sweep_fanout).
    for r in result["runs"].values():
        assert r["state"] == "COMPLETED" and r["message"] is None and r["flow_run_id"]
        assert r["mlflow_run_id"] and r["run_name"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    children = client.search_runs(
        [client.get_experiment_by_name("relift").experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result['mlflow_run_id']}'",
    )
    assert len(children) == 4
    assert {c.data.params["algorithm.sft_buffer_threshold"] for c in children} == {"2", "4"}
    table = runs_table(uri, parent_run_id=result["mlflow_run_id"])
    assert sorted(table["algorithm"]) == ["relift", "relift", "rl", "rl"]
    assert (table.loc[table["algorithm"] == "rl", "demos_used"] == 0).all()
    assert "world" in table.columns and not any("world/world" in c for c in table.columns)
    # Run names: the point first (method, seed, setting), then the sweep's name and hash.
    assert all(
        n.split("-")[0] in ("rl", "relift") and n.split("-")[1] == "s0" and "-abl-" in n
        for n in result["runs"]
    )

    # The parent run answers which method is best: metrics, description, report, figures.
    parent = client.get_run(result["mlflow_run_id"])
    metrics = parent.data.metrics
    for variant in ("rl sft_buffer_threshold_2", "relift sft_buffer_threshold_4"):
        assert 0.0 <= metrics[f"{variant}/heldout_world_mean"] <= 1.0, sorted(metrics)
        assert metrics[f"{variant}/heldout_world_seeds"] == 1
        assert f"{variant}/demos_used" in metrics
    assert metrics["rl sft_buffer_threshold_2/demos_used"] == 0
    child = table.set_index("variant").loc["relift sft_buffer_threshold=4"]
    assert metrics["relift sft_buffer_threshold_4/heldout_world_mean"] == pytest.approx(
        child["world"]
    )
    note = parent.data.tags["mlflow.note.content"]
    assert "Which method is best" in note and "relift sft_buffer_threshold=4" in note
    assert "- (1 seed)" in note  # no interval from one seed, and it says so
    assert f"/runs/flow-run/{parent.data.tags['prefect.flow_run_id']}" in note
    files = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/training_curves.png", "report/level_shares.png"} <= files
    report_md = client.download_artifacts(parent.info.run_id, "report/report.md", str(tmp_path))
    assert "95% t-interval" in Path(report_md).read_text()
    assert result["comparison"].startswith("| method")
    # The same table on the sweep's Prefect flow run, values rounded for display.
    rows = _table_artifact(parent.data.tags["prefect.flow_run_id"], "sweep-comparison")
    assert {r["method"] for r in rows} == set(table["variant"])
    assert all(r["mean"] == round(r["mean"], 3) for r in rows)

    # `relift compare` as a user runs it, in a 100-column terminal: readable, and a report.
    out = run_command(
        [
            RELIFT,
            "compare",
            "-p",
            "toy",
            "--parent",
            result["mlflow_run_id"],
            f"run.workdir={tmp_path}",
        ],
        env=own_prefect_env(COLUMNS="100"),
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "…" not in out.stdout and max(map(len, out.stdout.splitlines())) <= 100, out.stdout
    assert "relift" in out.stdout and "held-out world" in out.stdout
    report = (tmp_path / "compare" / "report.md").read_text()
    assert "95% t-interval" in report and "![training curves](training_curves.png)" in report
    assert (tmp_path / "compare" / "training_curves.png").stat().st_size > 0
    assert (tmp_path / "compare" / "level_shares.png").stat().st_size > 0


def test_evaluate_flow_on_real_benchmark_questions(
    tiny_overrides, prefect_server, tmp_path, shared_benchmarks
):
    from flows.evaluate import evaluate

    result = evaluate(
        preset="toy",
        benchmarks=["math500", "gpqa_diamond", "world"],
        limit=3,
        overrides=tiny_overrides
        + [f"run.workdir={tmp_path}", f"eval.benchmarks_dir={shared_benchmarks}"],
    )
    assert set(result["summaries"]) == {"math500", "gpqa_diamond", "world"}
    assert result["summaries"]["math500"]["questions"] == 3
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert "heldout/math500/avg_at_k" in run.data.metrics
    assert "heldout/gpqa_diamond/format_failure_rate" in run.data.metrics
    records = list((tmp_path / "evaluations").glob("*/math500.records.parquet"))
    assert records, "per-question records are written"


def _task_states(flow_run_id) -> dict[str, str]:
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as pc:
            runs = await pc.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}

    return asyncio.run(read())


def test_prepare_data_is_cached_by_input_hash(tiny_overrides, prefect_server, tmp_path):
    from flows.prepare_data import prepare_data
    from relift_core.config import load_config

    cfg = load_config("toy", tiny_overrides + [f"run.workdir={tmp_path}"]).model_dump(mode="json")
    started = time.time() - 1
    first = prepare_data(cfg, return_state=True)
    second = prepare_data(cfg, return_state=True)
    assert _task_states(first.state_details.flow_run_id)["prepare-training-set"] == "Completed"
    assert _task_states(second.state_details.flow_run_id)["prepare-training-set"] == "Cached"
    assert first.result().train_fingerprint == second.result().train_fingerprint
    changed = load_config("toy", tiny_overrides + [f"run.workdir={tmp_path}", "data.world.seed=7"])
    third = prepare_data(changed.model_dump(mode="json"), return_state=True)
    assert _task_states(third.state_details.flow_run_id)["prepare-training-set"] == "Completed"
    assert third.result().train_fingerprint != first.result().train_fingerprint
    # What a cache hit reads back is JSON data, never a pickle.
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    storage = Path(PREFECT_LOCAL_STORAGE_PATH.value()).expanduser()
    records = [
        f
        for f in storage.iterdir()
        if f.name.startswith("prepare-") and f.stat().st_mtime >= started
    ]
    assert records
    for record in records:
        stored = json.loads(record.read_text())
        assert stored["metadata"]["serializer"]["type"] == "json", stored["metadata"]
        assert json.loads(stored["result"])["train_fingerprint"]


def test_difficulty_dynamics_transition_table(tiny_overrides, prefect_server, tmp_path):
    from flows.difficulty_dynamics import difficulty_dynamics
    from flows.train import train
    from relift_core.runtime.checkpoint import latest_checkpoint

    overrides = tiny_overrides + [
        f"run.workdir={tmp_path}",
        "run.iterations=1",
        "eval.benchmarks=[]",
        "run.name=dyn",
    ]
    train(preset="toy", overrides=overrides)
    ckpt = latest_checkpoint(tmp_path / "dyn" / "checkpoints") / "model"
    result = difficulty_dynamics(preset="toy", checkpoint=str(ckpt), overrides=overrides)
    import pandas as pd

    table = pd.DataFrame(result["table"])
    assert list(table.index) == list(table.columns) == ["hardest", "hard", "medium", "easy"]
    from relift_core.config import load_config

    world = load_config("toy", overrides).data.world
    n_train = len(world.families) * len(world.sizes) * world.train_per_cell
    assert int(table.to_numpy().sum()) == n_train


def test_engine_task_retries_then_a_persistent_failure_fails_the_flow(
    tiny_overrides, prefect_server, tmp_path, monkeypatch
):
    from flows.train import train
    from relift_core import iteration

    real_rollout = iteration.rollout
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("engine hiccup")
        return real_rollout(*args, **kwargs)

    overrides = tiny_overrides + [
        f"run.workdir={tmp_path}",
        "run.iterations=1",
        "eval.benchmarks=[]",
    ]
    monkeypatch.setattr(iteration, "rollout", flaky)
    state = train(preset="toy", overrides=overrides + ["run.name=flaky"], return_state=True)
    assert state.is_completed() and calls["n"] == 2

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(iteration, "rollout", broken)
    state = train(preset="toy", overrides=overrides + ["run.name=broken"], return_state=True)
    assert state.is_failed()
    assert "CUDA out of memory (simulated)" in str(state.message) or "CUDA out of memory" in repr(
        state.result(raise_on_failure=False)
    )
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("relift").experiment_id],
        filter_string="attributes.run_name = 'broken'",
    )
    assert runs[0].info.status == "FAILED"


def test_a_moved_run_store_reads_and_writes_its_own_artifacts(
    tiny_overrides, prefect_server, tmp_path
):
    """Copy runs/ elsewhere and resume there: the same MLflow run continues, and what it reads
    and writes is under the new directory, never the old one."""
    import shutil

    from flows.train import train

    old, new = tmp_path / "old", tmp_path / "new"
    overrides = tiny_overrides + ["run.name=moving", "run.iterations=1", "eval.benchmarks=[]"]
    first = train(preset="toy", overrides=overrides + [f"run.workdir={old}"])
    shutil.copytree(old, new)
    before = sorted(p.relative_to(old) for p in old.rglob("*"))
    second = train(
        preset="toy",
        overrides=[*overrides[:-2], "run.iterations=2", "eval.benchmarks=[]", f"run.workdir={new}"],
    )
    assert second["mlflow_run_id"] == first["mlflow_run_id"]  # resumed into the same run
    assert sorted(p.relative_to(old) for p in old.rglob("*")) == before  # old store untouched
    client = MlflowClient(tracking_uri=f"sqlite:///{new / 'mlflow.db'}")
    run = client.get_run(second["mlflow_run_id"])
    assert run.info.artifact_uri.startswith((new / "mlartifacts").as_uri())
    history = client.get_metric_history(run.info.run_id, "rollout_accuracy")
    assert [h.step for h in history] == [0, 1]
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
