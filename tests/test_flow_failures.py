"""No flow leaves its MLflow run RUNNING when it fails: each flow is made to fail the way it can
in use (a phase raising, a worker's training crashing, a bad sweep value) after its MLflow run
was opened, and that run must then read FAILED. `tasks.tracking.mlflow_run` is what every flow
opens its run with; it is checked on its own first, for Ctrl-C and SIGTERM too."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

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


# Each flow called as a user calls it, on the test's overrides and work directory.
def _train(flow: ModuleType, overrides: list[str], workdir: Path) -> None:
    flow.train(preset="toy", overrides=overrides + ["run.iterations=0", "run.name=t"])


def _evaluate(flow: ModuleType, overrides: list[str], workdir: Path) -> None:
    flow.evaluate(preset="toy", overrides=overrides, benchmarks=["world"], limit=2)


def _build_base_model(flow: ModuleType, overrides: list[str], workdir: Path) -> None:
    cfg = load_config("toy", overrides + ["data.world.pretrain_examples=50"])
    flow.build_base_model(cfg.model_dump(mode="json"))


def _difficulty_dynamics(flow: ModuleType, overrides: list[str], workdir: Path) -> None:
    checkpoint = str(workdir / "step_000001" / "model")
    flow.difficulty_dynamics(preset="toy", checkpoint=checkpoint, overrides=overrides)


@dataclass(frozen=True)
class StageFailure:
    """A flow made to fail in one of its stages, after the flow opened its MLflow run."""

    module: str  # the flow's module, where the flow looks the stage up
    stage: str  # the stage's name there, replaced by one that raises RuntimeError(error)
    error: str
    run: Callable[[ModuleType, list[str], Path], None]  # (module, overrides, workdir)
    kind: str | None  # the run's relift.kind tag; None: the work directory's only run
    run_name: str | None = None  # the run's name, where the flow is given one


STAGE_FAILURES = [
    StageFailure(
        "flows.train",
        "evaluate_policy",
        "benchmark records unreadable (simulated)",
        _train,
        None,
        "t",
    ),
    StageFailure(
        "flows.evaluate",
        "evaluate_all",
        "CUDA error: device lost (simulated)",
        _evaluate,
        "evaluate",
    ),
    StageFailure(
        "flows.base_model",
        "pretrain_base_model",
        "pretraining loss is nan (simulated)",
        _build_base_model,
        "base_model",
    ),
    StageFailure(
        "flows.difficulty_dynamics",
        "policy_levels",
        "checkpoint weights truncated (simulated)",
        _difficulty_dynamics,
        "difficulty_dynamics",
    ),
]


@pytest.mark.parametrize("case", STAGE_FAILURES, ids=lambda case: case.module.split(".")[-1])
def test_a_flow_whose_stage_fails_leaves_its_run_failed(
    case, tiny_overrides, prefect_server, tmp_path, monkeypatch
):
    flow = importlib.import_module(case.module)

    def stage_failed(*args, **kwargs):
        raise RuntimeError(case.error)

    monkeypatch.setattr(flow, case.stage, stage_failed)
    with pytest.raises(RuntimeError, match="simulated"):
        case.run(flow, _base(tiny_overrides, tmp_path), tmp_path)
    run = _only_run(tmp_path, case.kind)
    assert run.info.status == "FAILED"
    if case.run_name is not None:
        assert run.info.run_name == case.run_name


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
