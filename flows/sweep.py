"""The `sweep` flow: algorithms x seeds x parameter values as child `train` flow runs, under one
MLflow parent run with a nested child run each.

Run names are `<point>-<name>[-<date>]-<config hash>` (the point first: `relift-s1-...`, what a
truncated name in a runs table still shows). The hash covers everything the points share, so a
sweep re-run with the same settings resumes (and so reuses) its own finished runs, and one with
other settings never resumes them. `dated=True` (the weekly deployment) adds the flow run's
scheduled date: each week trains afresh instead of reusing last week's runs.

When the points are done, the parent run answers "which method is best": per method (and swept
setting) the held-out mean, 95% t-interval and seed count, and the demonstrations used, as its
metrics and its description, the report and figures as its artifacts, and the same table as a
Prefect artifact on the sweep's flow run."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from analysis.compare import (
    method_summary,
    runs_table,
    summary_metrics,
    summary_rows,
    summary_table_markdown,
    write_report,
)
from flows.train import link_prefect_and_mlflow, train
from relift_core.config import ConfigError, ExperimentConfig, experiment_hash, load_config
from tasks import progress as terminal
from tasks.tracking import MlflowTracker, mlflow_run, runs_view_url, tracking_uri

FAN_OUT_POLL_S = 2.0


def sweep_points(
    algorithms: list[str], seeds: list[int], grid: dict[str, list[Any]]
) -> list[dict[str, Any]]:
    """Every combination, as override dicts (the cartesian product, in a stable order)."""
    keys = sorted(grid)
    points = []
    for algo, seed, values in itertools.product(
        algorithms, seeds, itertools.product(*(grid[k] for k in keys))
    ):
        points.append(
            {"algorithm.name": algo, "run.seed": seed, **dict(zip(keys, values, strict=True))}
        )
    return points


def point_name(prefix: str, point: dict[str, Any]) -> str:
    """`<method>-s<seed>[-<setting><value>...]-<prefix>`: method and seed lead."""
    parts = [str(point["algorithm.name"]), f"s{point['run.seed']}"]
    parts += [
        f"{k.split('.')[-1]}{v}"
        for k, v in point.items()
        if k not in ("algorithm.name", "run.seed")
    ]
    return "-".join(parts) + f"-{prefix}"


def sweep_prefix(
    name: str, base: ExperimentConfig, grid_keys: list[str], date: str | None = None
) -> str:
    """`name[-date]-hash`: the hash of what every point shares (the points' own keys aside)."""
    tag = experiment_hash(base, ignore=("run.seed", "run.name", "algorithm.name", *grid_keys))
    return "-".join(p for p in (name, date, tag) if p)


def _scheduled_date() -> str:
    from prefect.runtime import flow_run

    start = flow_run.scheduled_start_time
    return start.strftime("%Y%m%d") if start is not None else time.strftime("%Y%m%d")


def _sweep_run_name() -> str:
    """The sweep's flow run is named as its MLflow parent run: `<name>[-<date>]-<hash>`."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    date = _scheduled_date() if params.get("dated") else None
    try:
        base = load_config(params.get("preset", "toy"), params.get("overrides") or [])
    except (ConfigError, OSError):  # a bad preset fails in the flow itself, with its message
        return "-".join(p for p in (params.get("name", "sweep"), date) if p)
    return sweep_prefix(params.get("name", "sweep"), base, sorted(params.get("grid") or {}), date)


@flow(name="sweep", log_prints=True, flow_run_name=_sweep_run_name)
def sweep(
    preset: str = "toy",
    algorithms: list[str] | None = None,
    seeds: list[int] | None = None,
    grid: dict[str, list[Any]] | None = None,
    overrides: list[str] | None = None,
    name: str = "sweep",
    dated: bool = False,
    train_deployment: str | None = None,
) -> dict[str, Any]:
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
        train_deployment: a deployment of the `train` flow (e.g. "train/train"): every point
            becomes its own flow run of it, picked up by that work pool's workers, all at once.
            Empty: the points run here, one after another.
    """
    algorithms = algorithms or ["rl", "sft", "relift"]
    seeds = seeds or [0]
    base = load_config(preset, overrides or [])
    prefix = sweep_prefix(name, base, sorted(grid or {}), _scheduled_date() if dated else None)
    children = {}
    for point in sweep_points(algorithms, seeds, grid or {}):
        run_name = point_name(prefix, point)
        children[run_name] = [
            *(overrides or []),
            *(f"{k}={v}" for k, v in point.items()),
            f"run.name={run_name}",
        ]
    with mlflow_run(
        base,
        run_key=f"sweep:{base.run.workdir}:{prefix}",
        run_name=prefix,
        kind="sweep",
        tags={
            "relift.sweep": prefix,
            "relift.config_hash": prefix.rsplit("-", 1)[-1],
        },
    ) as parent:
        parent.log_params(
            {
                "preset": preset,
                "algorithms": ",".join(algorithms),
                "seeds": ",".join(map(str, seeds)),
                "grid": str(grid or {}),
            }
        )
        link_prefect_and_mlflow(parent, prefix)
        if train_deployment:
            results = _fan_out(train_deployment, preset, children, parent)
        else:
            results = {}
            for run_name, child_overrides in children.items():
                get_run_logger().info(f"sweep point {run_name}")
                state = train.with_options(flow_run_name=f"train-{run_name}")(
                    preset=preset,
                    overrides=child_overrides,
                    parent_mlflow_run_id=parent.run_id,
                    return_state=True,
                )
                # The same keys as a fanned-out child's (state, message, flow_run_id), plus
                # the training's own result when it completed.
                outcome = {
                    "state": state.type.value,
                    "message": state.message,
                    "flow_run_id": str(state.state_details.flow_run_id or ""),
                }
                results[run_name] = (
                    {**state.result(), **outcome, "message": None}
                    if state.is_completed()
                    else outcome
                )
                terminal.say(
                    f"sweep point {run_name}: {state.type.value} "
                    f"({len(results)} of {len(children)})"
                )
        failed = {k: r for k, r in results.items() if r["state"] != "COMPLETED"}
        _report(results)
        comparison = publish_comparison(parent, base, prefix)
        if failed:
            # Every other child's result is in MLflow and in the artifact; the parent run ends
            # FAILED and so does the flow run.
            raise RuntimeError(
                f"{len(failed)} of {len(results)} sweep runs failed: "
                + "; ".join(f"{k}: {r.get('message') or r['state']}" for k, r in failed.items())
            )
    return {
        "mlflow_run_id": parent.run_id,
        "mlflow_url": parent.url(),
        "runs": results,
        "comparison": comparison,
        "runs_view_url": runs_view_url(parent.client, table_experiment_id(parent)),
    }


def _fan_out(deployment: str, preset: str, children: dict[str, list[str]], parent) -> dict:
    """Every child a flow run of `deployment` (the work pool's workers take them in parallel);
    waits for all of them. A child whose MLflow run already finished under this parent (the same
    run name: the same config) is not run again."""
    from prefect.client.orchestration import get_client as prefect_client
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    finished = finished_children(parent)
    results: dict[str, dict] = {}
    submitted = {}
    for run_name, child_overrides in children.items():
        if run_name in finished:
            logger.info(f"sweep point {run_name}: finished earlier, not run again")
            results[run_name] = {
                "state": "COMPLETED",
                "skipped": True,
                "mlflow_run_id": finished[run_name],
            }
            continue
        flow_run = run_deployment(
            name=deployment,
            timeout=0,
            flow_run_name=f"train-{run_name}",
            parameters={
                "preset": preset,
                "overrides": child_overrides,
                "parent_mlflow_run_id": parent.run_id,
            },
        )
        logger.info(f"sweep point {run_name}: flow run {flow_run.id} of {deployment}")
        submitted[run_name] = flow_run.id
    with prefect_client(sync_client=True) as client:
        while submitted:
            for run_name, flow_run_id in list(submitted.items()):
                state = client.read_flow_run(flow_run_id).state
                if state is not None and state.is_final():
                    results[run_name] = {
                        "state": state.type.value,
                        "message": state.message,
                        "flow_run_id": str(flow_run_id),
                    }
                    terminal.log_and_say(logger, f"sweep point {run_name}: {state.type.value}")
                    del submitted[run_name]
            if submitted:
                time.sleep(FAN_OUT_POLL_S)
    for run_name, run_id in finished_children(parent).items():
        results.get(run_name, {}).setdefault("mlflow_run_id", run_id)
    return results


def table_experiment_id(parent: MlflowTracker) -> str:
    return parent.client.get_run(parent.run_id).info.experiment_id


def finished_children(parent) -> dict[str, str]:
    """Run name -> MLflow run id of this sweep's children that finished."""
    runs = parent.client.search_runs(
        [parent.client.get_run(parent.run_id).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}' and "
        "attributes.status = 'FINISHED'",
    )
    return {r.info.run_name: r.info.run_id for r in runs}


def _report(results: dict[str, dict]) -> None:
    """The children's outcomes as a Prefect table artifact (the sweep's page in the UI)."""
    from prefect.artifacts import create_table_artifact

    rows = [
        {
            "run": k,
            "state": r["state"],
            "mlflow_run_id": r.get("mlflow_run_id", ""),
            "note": "finished earlier" if r.get("skipped") else (r.get("message") or ""),
        }
        for k, r in results.items()
    ]
    create_table_artifact(rows, key="sweep-runs", description="Each sweep point's outcome")


def publish_comparison(parent: MlflowTracker, base: ExperimentConfig, prefix: str) -> str:
    """The parent run answers "which method is best": `analysis.compare.method_summary` of its
    children as metrics, as its description (with the Prefect link), the report and figures as
    artifacts (`report/`), the same table (rounded) as a Prefect artifact. Returns the table in
    markdown (what `relift sweep` prints)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    uri = tracking_uri(base)
    table = runs_table(uri, base.tracking.experiment, parent_run_id=parent.run_id)
    if table.empty:
        return "No finished training runs under this sweep."
    summary = method_summary(table)
    parent.log_metrics(summary_metrics(summary))
    text = summary_table_markdown(summary)
    flow_run = parent.client.get_run(parent.run_id).data.tags.get("prefect.flow_run_url", "")
    parent.set_tags(
        {
            "mlflow.note.content": "\n".join(
                [
                    f"## Which method is best: sweep `{prefix}`",
                    "",
                    text,
                    "",
                    (
                        f"{len(table)} training runs (the child runs below); training curves "
                        "and per-level "
                        "shares: artifacts `report/report.md`, `report/*.png`."
                    ),
                    "",
                    (
                        f"Prefect flow run: [{prefix}]({flow_run}) · "
                        "[all runs by method]"
                        f"({runs_view_url(parent.client, table_experiment_id(parent))})"
                    ),
                ]
            )
        }
    )
    report = write_report(
        uri,
        Path(base.run.workdir) / "compare" / prefix,
        base.tracking.experiment,
        parent_run_id=parent.run_id,
    )
    parent.log_artifact(report["report"].parent, "report")
    create_table_artifact(
        summary_rows(summary),
        key="sweep-comparison",
        description="Held-out accuracy per method: mean, 95% t-interval over seeds, demos used",
    )
    create_markdown_artifact(
        markdown=f"{text}\n\n[MLflow parent run]({parent.url()})",
        key="sweep-comparison-md",
        description="Which method is best (the MLflow parent run's table)",
    )
    return text
