"""No flow leaves its MLflow run RUNNING when it fails: each flow is made to fail the way it can
in use (a phase raising, a worker's training crashing, a bad sweep value) after its MLflow run
was opened, and that run must then read FAILED. `tasks.tracking.mlflow_run` is what every flow
opens its run with; it is checked on its own first, for Ctrl-C and SIGTERM too."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

from relift_core.config import load_config
from tasks.tracking import mlflow_run


def _runs(workdir, kind: str | None = None) -> list:
    """Every MLflow run of the work directory's embedded store (of `kind`, a relift.kind tag)."""
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("relift")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return [r for r in runs if kind is None or r.data.tags.get("relift.kind") == kind]


def _only_run(workdir, kind: str | None = None):
    runs = _runs(workdir, kind)
    assert len(runs) == 1, [(r.info.run_name, r.info.status) for r in runs]
    return runs[0]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(143)])
def test_mlflow_run_ends_failed_on_any_exception_and_reraises_it(tmp_path, error):
    cfg = load_config("toy", [f"run.workdir={tmp_path}"])
    with pytest.raises(type(error)), mlflow_run(cfg, run_key="k", run_name="failing"):
        raise error
    assert _only_run(tmp_path).info.status == "FAILED"


def test_mlflow_run_ends_finished_when_the_block_completes(tmp_path):
    cfg = load_config("toy", [f"run.workdir={tmp_path}"])
    with mlflow_run(cfg, run_key="k", run_name="fine") as tracker:
        assert _only_run(tmp_path).info.status == "RUNNING"
        tracker.log_metrics({"x": 1.0})
    assert _only_run(tmp_path).info.status == "FINISHED"


def _base(tiny_overrides, tmp_path) -> list[str]:
    return [*tiny_overrides, f"run.workdir={tmp_path}"]


def test_a_failed_train_flow_leaves_its_run_failed(
    tiny_overrides, prefect_server, tmp_path, monkeypatch
):
    import flows.train

    def evaluation_lost(*args, **kwargs):
        raise RuntimeError("benchmark records unreadable (simulated)")

    monkeypatch.setattr(flows.train, "evaluate_policy", evaluation_lost)
    with pytest.raises(RuntimeError, match="simulated"):
        flows.train.train(
            preset="toy",
            overrides=_base(tiny_overrides, tmp_path) + ["run.iterations=0", "run.name=t"],
        )
    run = _only_run(tmp_path)
    assert run.info.run_name == "t" and run.info.status == "FAILED"


def test_a_failed_evaluate_flow_leaves_its_run_failed(
    tiny_overrides, prefect_server, tmp_path, monkeypatch
):
    import flows.evaluate

    def engine_lost(*args, **kwargs):
        raise RuntimeError("CUDA error: device lost (simulated)")

    monkeypatch.setattr(flows.evaluate, "evaluate_all", engine_lost)
    with pytest.raises(RuntimeError, match="simulated"):
        flows.evaluate.evaluate(
            preset="toy", overrides=_base(tiny_overrides, tmp_path), benchmarks=["world"], limit=2
        )
    assert _only_run(tmp_path, "evaluate").info.status == "FAILED"


def test_a_failed_sweep_leaves_its_parent_run_failed(tiny_overrides, prefect_server, tmp_path):
    from flows.sweep import sweep

    # The value passes the sweep's own checks but no training accepts it: every point fails.
    with pytest.raises(RuntimeError, match="1 of 1 sweep runs failed"):
        sweep(
            preset="toy",
            algorithms=["rl"],
            seeds=[0],
            grid={"rl.lr": [2.0]},
            overrides=_base(tiny_overrides, tmp_path),
            name="bad",
        )
    assert _only_run(tmp_path, "sweep").info.status == "FAILED"


def test_a_failed_base_model_flow_leaves_its_run_failed(
    tiny_overrides, prefect_server, tmp_path, monkeypatch
):
    import flows.base_model

    def pretraining_crashed(*args, **kwargs):
        raise RuntimeError("pretraining loss is nan (simulated)")

    monkeypatch.setattr(flows.base_model, "pretrain_base_model", pretraining_crashed)
    cfg = load_config("toy", _base(tiny_overrides, tmp_path) + ["data.world.pretrain_examples=50"])
    with pytest.raises(RuntimeError, match="simulated"):
        flows.base_model.build_base_model(cfg.model_dump(mode="json"))
    assert _only_run(tmp_path, "base_model").info.status == "FAILED"


def test_a_failed_difficulty_dynamics_flow_leaves_its_run_failed(
    tiny_overrides, prefect_server, tmp_path, monkeypatch
):
    import flows.difficulty_dynamics

    def checkpoint_unreadable(*args, **kwargs):
        raise RuntimeError("checkpoint weights truncated (simulated)")

    monkeypatch.setattr(flows.difficulty_dynamics, "policy_levels", checkpoint_unreadable)
    with pytest.raises(RuntimeError, match="simulated"):
        flows.difficulty_dynamics.difficulty_dynamics(
            preset="toy",
            checkpoint=str(tmp_path / "step_000001" / "model"),
            overrides=_base(tiny_overrides, tmp_path),
        )
    assert _only_run(tmp_path, "difficulty_dynamics").info.status == "FAILED"


@task(name="train-method", cache_policy=NO_CACHE)
def crashed_training(
    preset: str, overrides: list[str], run_name: str, parent_mlflow_run_id: str
) -> dict:
    """The demo's training task, crashing in its worker process as a diverged run would."""
    raise RuntimeError(f"{run_name}: training diverged (simulated)")


def test_a_failed_demo_leaves_its_parent_run_failed(
    tiny_overrides, prefect_server, tmp_path, monkeypatch
):
    import flows.demo

    monkeypatch.setattr(flows.demo, "train_method", crashed_training)
    overrides = _base(tiny_overrides, tmp_path) + [
        "data.world.pretrain_examples=200",
        "data.world.pretrain_steps=2",
    ]
    with pytest.raises(RuntimeError, match="simulated"):
        flows.demo.demo(preset="toy", overrides=overrides, algorithms=["rl"], seeds=[0])
    assert _only_run(tmp_path, "demo").info.status == "FAILED"
    assert _only_run(tmp_path, "base_model").info.status == "FINISHED"
