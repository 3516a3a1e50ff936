"""The `sweep` flow: algorithms x seeds x parameter values as child `train` flow runs, under one
MLflow parent run with a nested child run each.

Run names are `<name>[-<date>]-<config hash>-<point>`. The hash covers everything the points
share, so a sweep re-run with the same settings resumes (and so reuses) its own finished runs,
and one with other settings never resumes them. `dated=True` (the weekly deployment) adds the
flow run's scheduled date: each week trains afresh instead of reusing last week's runs."""

from __future__ import annotations

import itertools
import time
from typing import Any

from prefect import flow, get_run_logger

from flows.train import train
from relift_core.config import ExperimentConfig, experiment_hash, load_config
from tasks.tracking import close_run, open_run


def sweep_points(algorithms: list[str], seeds: list[int],
                 grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, as override dicts (the cartesian product, in a stable order)."""
    keys = sorted(grid)
    points = []
    for algo, seed, values in itertools.product(algorithms, seeds,
                                                itertools.product(*(grid[k] for k in keys))):
        points.append({"algorithm.name": algo, "run.seed": seed, **dict(zip(keys, values))})
    return points


def point_name(prefix: str, point: dict[str, Any]) -> str:
    parts = [str(point["algorithm.name"]), f"s{point['run.seed']}"]
    parts += [f"{k.split('.')[-1]}{v}" for k, v in point.items()
              if k not in ("algorithm.name", "run.seed")]
    return f"{prefix}-" + "-".join(parts)


def sweep_prefix(name: str, base: ExperimentConfig, grid_keys: list[str],
                 date: str | None = None) -> str:
    """`name[-date]-hash`: the hash of what every point shares (the points' own keys aside)."""
    tag = experiment_hash(base, ignore=("run.seed", "run.name", "algorithm.name", *grid_keys))
    return "-".join(p for p in (name, date, tag) if p)


def _scheduled_date() -> str:
    from prefect.runtime import flow_run

    start = flow_run.scheduled_start_time
    return start.strftime("%Y%m%d") if start is not None else time.strftime("%Y%m%d")


def _sweep_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    date = f"-{_scheduled_date()}" if params.get("dated") else ""
    return f"sweep-{params.get('name', 'sweep')}{date}"


@flow(name="sweep", log_prints=True, flow_run_name=_sweep_run_name)
def sweep(preset: str = "toy", algorithms: list[str] | None = None, seeds: list[int] | None = None,
          grid: dict[str, list[Any]] | None = None, overrides: list[str] | None = None,
          name: str = "sweep", dated: bool = False) -> dict[str, Any]:
    """Runs `train` once per point of algorithms x seeds x grid (e.g. grid =
    {"algorithm.sft_buffer_threshold": [4, 8]}) as child flow runs.

    Args:
        preset: config preset every point starts from (see `relift presets`).
        algorithms: rl, sft, relift, sft_then_rl.
        seeds: run seeds.
        grid: dotted config key -> values to sweep.
        overrides: dotted `key=value` overrides for every point.
        name: the sweep's name, first part of every run name.
        dated: add the scheduled date to the run names (scheduled sweeps: train anew each time).
    """
    algorithms = algorithms or ["rl", "sft", "relift"]
    seeds = seeds or [0]
    base = load_config(preset, overrides or [])
    prefix = sweep_prefix(name, base, sorted(grid or {}), _scheduled_date() if dated else None)
    parent = open_run(base, run_key=f"sweep:{base.run.workdir}:{prefix}", run_name=prefix,
                      tags={"relift.kind": "sweep"})
    parent.log_params({"preset": preset, "algorithms": ",".join(algorithms),
                       "seeds": ",".join(map(str, seeds)), "grid": str(grid or {})})
    results = {}
    try:
        for point in sweep_points(algorithms, seeds, grid or {}):
            run_name = point_name(prefix, point)
            child_overrides = list(overrides or []) + [f"{k}={v}" for k, v in point.items()]
            child_overrides.append(f"run.name={run_name}")
            get_run_logger().info(f"sweep point {run_name}")
            results[run_name] = train.with_options(flow_run_name=f"train-{run_name}")(
                preset=preset, overrides=child_overrides, parent_mlflow_run_id=parent.run_id)
        close_run(parent)
    except BaseException:
        close_run(parent, "FAILED")
        raise
    return {"mlflow_run_id": parent.run_id, "runs": results}
