"""The `sweep` flow: algorithms x seeds x parameter values as child `train` flow runs, under one
MLflow parent run with a nested child run each."""

from __future__ import annotations

import itertools
from typing import Any

from prefect import flow, get_run_logger

from flows.train import train
from relift_core.config import load_config
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


def point_name(sweep_name: str, point: dict[str, Any]) -> str:
    parts = [str(point["algorithm.name"]), f"s{point['run.seed']}"]
    parts += [f"{k.split('.')[-1]}{v}" for k, v in point.items()
              if k not in ("algorithm.name", "run.seed")]
    return f"{sweep_name}-" + "-".join(parts)


@flow(name="sweep", log_prints=True)
def sweep(preset: str = "toy", algorithms: list[str] | None = None, seeds: list[int] | None = None,
          grid: dict[str, list[Any]] | None = None, overrides: list[str] | None = None,
          name: str = "sweep") -> dict[str, Any]:
    """Runs `train` once per point of algorithms x seeds x grid (e.g. grid =
    {"algorithm.sft_buffer_threshold": [4, 8]}) as child flow runs."""
    algorithms = algorithms or ["rl", "sft", "relift"]
    seeds = seeds or [0]
    base = load_config(preset, overrides or [])
    parent = open_run(base, run_key=f"sweep:{base.run.workdir}:{name}", run_name=name,
                      tags={"relift.kind": "sweep"})
    parent.log_params({"preset": preset, "algorithms": ",".join(algorithms),
                       "seeds": ",".join(map(str, seeds)), "grid": str(grid or {})})
    results = {}
    try:
        for point in sweep_points(algorithms, seeds, grid or {}):
            run_name = point_name(name, point)
            child_overrides = list(overrides or []) + [f"{k}={v}" for k, v in point.items()]
            child_overrides.append(f"run.name={run_name}")
            get_run_logger().info(f"sweep point {run_name}")
            results[run_name] = train.with_options(flow_run_name=run_name)(
                preset=preset, overrides=child_overrides, parent_mlflow_run_id=parent.run_id)
        close_run(parent)
    except BaseException:
        close_run(parent, "FAILED")
        raise
    return {"mlflow_run_id": parent.run_id, "runs": results}
