"""The orchestration layer end to end: real Prefect server (one test harness for the session),
real MLflow SQLite store, the tiny model on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

TINY = [
    "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
    "data.world.train_per_cell=2", "data.world.eval_per_cell=1", "data.world.pretrain_examples=0",
    "rollout.n=4", "rollout.max_new_tokens=24", "rl.prompts_per_step=6", "rl.mini_batch_size=6",
    "sft.mini_batch_size=4", "sft.max_target_tokens=48", "algorithm.sft_buffer_threshold=3",
    "algorithm.require_think=false", "eval.every=2", "eval.max_new_tokens=24", "eval.limit=6",
    "run.iterations=3", "run.grader_workers=1",
]


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _overrides(tmp: Path, algo: str) -> list[str]:
    return TINY + [f"algorithm.name={algo}", f"run.name={algo}", f"run.workdir={tmp}"]


@pytest.mark.parametrize("algo", ["relift", "rl", "sft", "sft_then_rl"])
def test_train_each_algorithm_three_iterations(prefect_server, tmp_path_factory, algo):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.train import train

    tmp = tmp_path_factory.mktemp(algo)
    state = train(preset="toy", overrides=_overrides(tmp, algo), return_state=True)
    assert state.is_completed(), state
    result = state.result()

    # MLflow: params, per-step metrics, config artifact, dataset inputs, final status.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["algorithm.name"] == algo
    assert run.data.tags["relift.algorithm"] == algo
    history = client.get_metric_history(run.info.run_id, "accuracy")
    assert [h.step for h in history] == [0, 1, 2]
    for key in ("reward_mean", "solve_none", "solve_all", "frac_hardest", "frac_easy",
                "buffer_size", "demos_used", "response_length_mean", "time/rollout"):
        assert key in run.data.metrics, key
    if algo in ("rl", "relift"):
        assert "rl/policy_loss" in run.data.metrics or "rl/rl_skipped" in run.data.metrics
    if algo in ("sft", "sft_then_rl"):
        assert "sft/sft_loss" in run.data.metrics
    if algo == "rl":
        assert run.data.metrics["demos_used"] == 0
    assert any(k.startswith("eval/world/") for k in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    inputs = run.inputs.dataset_inputs
    assert {d.dataset.name for d in inputs} >= {"train", "world"}

    # Prefect: the flow run points at MLflow, and every phase ran as a task run.
    import asyncio

    async def task_names():
        async with get_client() as pc:
            flow_run_id = run.data.tags["prefect.flow_run_id"]
            runs = await pc.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return {r.name.rsplit("-", 1)[0] for r in runs if r.state.is_completed()}

    names = asyncio.run(task_names())
    assert {"rollout", "grade", "classify-difficulty", "collect-demonstrations", "checkpoint"} <= names
    assert ("rl-update" in names) == (algo != "sft")
