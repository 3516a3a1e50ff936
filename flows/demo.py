"""`relift demo`: the proof-world comparison of RL, SFT and ReLIFT (and LUFFY, DAPO with
`--algorithms`) on a CPU, as Prefect flows.

    base model   <- pretrain a tiny transformer on part of the generated world (cached by world)
    levels       <- each question's difficulty under the base model (n rollouts, as training
                    sees it)
    runs         <- for every seed: the base model evaluated as is, and rl, sft, relift (or the
                    `algorithms` asked for) trained from it with the same budget; `jobs`
                    trainings at a time, each a `train` flow run in its own process
    comparison   <- held-out accuracy per method with paired bootstrap 95% CIs over questions
                    and seeds, the paper's claims as paired differences
                    (relift_core.proofworld.statistics), per level and family; results.json,
                    a markdown report and a figure, in MLflow and Prefect

Run names carry a hash of the demo's config: the same demo re-run resumes (and so reuses) its own
finished runs, while any changed override starts fresh runs instead of reusing old ones.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ProcessPoolTaskRunner

from analysis.compare import write_report
from flows.base_model import build_base_model
from flows.prepare_data import prepare_data
from relift_core.algorithm.difficulty import LEVELS
from relift_core.config import ExperimentConfig, experiment_hash, load_config
from relift_core.data.examples import load_examples
from relift_core.grading.levels import policy_levels
from relift_core.proofworld.report import (
    BASE_METHOD,
    TEACHER_METHOD,
    TEACHER_WORLD,
    method_overrides,
    plot,
    render_markdown,
)
from relift_core.proofworld.statistics import summarize
from tasks import progress as terminal
from tasks.retry import retry_unless_permanent
from tasks.tracking import mlflow_run, tracking_uri

DEMO_ALGORITHMS = ("rl", "sft", "relift")


@task(name="measure-difficulty", cache_policy=NO_CACHE)
def base_levels(cfg: ExperimentConfig, model_dir: str, examples_path: str) -> dict[str, str]:
    """Each question's level under the base model, from cfg.rollout.n samples."""
    levels = policy_levels(cfg, load_examples(examples_path), model_dir)
    return {uid: lv.value for uid, lv in levels.items()}


@task(name="build-teacher", cache_policy=NO_CACHE)
def build_teacher(preset: str, overrides: list[str]) -> str:
    """The teacher's base model (a `build_base_model` flow run in a worker process, cached)."""
    import torch

    torch.set_num_threads(1)
    cfg = load_config(preset, [*overrides, *TEACHER_WORLD])
    return build_base_model.with_options(flow_run_name="build-teacher-model")(
        cfg.model_dump(mode="json")
    )


class TrainingFailed(RuntimeError):
    """A demo training's error whose own exception could not travel back from the worker."""


@task(
    name="train-method",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=15,  # a server that answered 503 under load gets time to recover
    retry_condition_fn=retry_unless_permanent,
)
def train_method(
    preset: str, overrides: list[str], run_name: str, parent_mlflow_run_id: str
) -> dict[str, Any]:
    """One `train` flow run (in a worker process of the demo's task runner). A retry (a server
    that answered 503, say) resumes the run from its last checkpoint."""
    import torch

    from flows.train import train

    torch.set_num_threads(1)  # `jobs` trainings share the cores
    try:
        return train.with_options(flow_run_name=f"train-{run_name}")(
            preset=preset, overrides=overrides, parent_mlflow_run_id=parent_mlflow_run_id
        )
    except Exception as exc:
        # The result goes back to the demo's process pickled, and some errors do not unpickle
        # (httpx's HTTPStatusError needs keyword arguments): the demo then failed with a
        # TypeError that named neither the training nor its error.
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:
            raise TrainingFailed(f"training {run_name}: {type(exc).__name__}: {exc}") from None
        raise


def demo_config_hash(preset: str, overrides: list[str]) -> str:
    """Identifies the demo's experiment: the resolved config minus the run seed and name."""
    return experiment_hash(
        load_config(preset, overrides), ignore=("run.seed", "run.name", "algorithm.name")
    )


def held_out_accuracy(cfg: ExperimentConfig, run_name: str, step: int) -> dict[str, float]:
    path = Path(cfg.run.workdir) / run_name / "eval" / f"step_{step:06d}" / "world.records.parquet"
    df = pd.read_parquet(path, columns=["uid", "accuracy"])
    return dict(zip(df["uid"], df["accuracy"].astype(float), strict=True))


@flow(
    name="demo",
    flow_run_name="demo-{name}",
    log_prints=True,
    task_runner=ProcessPoolTaskRunner(max_workers=2),
)
def demo(
    preset: str = "toy",
    overrides: list[str] | None = None,
    algorithms: list[str] | None = None,
    seeds: list[int] | None = None,
    name: str = "demo",
) -> dict[str, Any]:
    """RL vs SFT vs ReLIFT from one base model, over `seeds` (default: the config's run.seed)."""
    start = time.perf_counter()
    overrides = list(overrides or [])
    # The base model is always evaluated (the claims need it); naming it changes nothing.
    algorithms = [a for a in (algorithms or DEMO_ALGORITHMS) if a != BASE_METHOD]
    cfg = load_config(preset, overrides)
    seeds = list(seeds) if seeds else [cfg.run.seed]
    with _workers_report_here():
        return _compare(preset, overrides, algorithms, seeds, name, cfg, start)


@contextmanager
def _workers_report_here() -> Iterator[None]:
    """Worker processes report their flow runs to this flow's Prefect server (the temporary one
    by default) rather than each starting its own: they inherit PREFECT_API_URL when they start.
    Set only for the flow's life, so a later flow in this process never reaches for a temporary
    server that has stopped."""
    from prefect.client.orchestration import get_client

    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    os.environ["PREFECT_API_URL"] = str(get_client().api_url)
    try:
        yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def _compare(
    preset: str,
    overrides: list[str],
    algorithms: list[str],
    seeds: list[int],
    name: str,
    cfg: ExperimentConfig,
    start: float,
) -> dict[str, Any]:
    logger = get_run_logger()
    # The teacher pretrains in a worker process while the base model pretrains here.
    teacher = build_teacher.submit(preset, overrides) if TEACHER_METHOD in algorithms else None
    base_dir = build_base_model(cfg.model_dump(mode="json"))
    data = prepare_data(cfg.model_dump(mode="json"))
    base_overrides = [*overrides, f"model.init_from={base_dir}"]
    base_cfg = load_config(preset, base_overrides)
    held_levels = base_levels(base_cfg, base_dir, data.eval_paths["world"])
    train_levels = base_levels(base_cfg, base_dir, data.train_path)
    tag = demo_config_hash(preset, base_overrides)

    run_key = f"demo:{Path(cfg.run.workdir).resolve()}:{name}:{tag}:{seeds}"
    with mlflow_run(cfg, kind="demo", run_key=run_key, run_name=f"{name}-{tag}") as parent:
        parent.log_params(
            {
                **cfg.flat_params(),
                "demo.seeds": ",".join(map(str, seeds)),
                "demo.algorithms": ",".join(algorithms),
                "demo.config_hash": tag,
            }
        )
        counts = pd.Series(train_levels).value_counts().to_dict()
        terminal.say(
            "training questions by level under the base model: "
            + ", ".join(f"{lv} {counts.get(lv, 0)}" for lv in LEVELS)
        )
        parent.log_metrics(
            {f"base/train_frac_{lv}": counts.get(lv, 0) / len(train_levels) for lv in LEVELS}
        )
        runs: list[tuple[str, int, str, list[str]]] = []
        for seed in seeds:
            for algo in [BASE_METHOD, *algorithms]:
                extra = method_overrides(
                    algo, teacher.result() if algo == TEACHER_METHOD and teacher else None
                )
                run_name = f"{algo}-s{seed}-{name}-{tag}"  # method and seed lead
                runs.append(
                    (
                        algo,
                        seed,
                        run_name,
                        [*base_overrides, *extra, f"run.seed={seed}", f"run.name={run_name}"],
                    )
                )
        futures = [
            train_method.submit(preset, ovr, run_name, parent.run_id)
            for _, _, run_name, ovr in runs
        ]
        results = []
        for (algo, seed, run_name, ovr), future in zip(runs, futures, strict=True):
            out = future.result()
            run_cfg = load_config(preset, ovr)
            accuracy = held_out_accuracy(run_cfg, run_name, run_cfg.run.iterations)
            results.append(
                {
                    "algo": algo,
                    "seed": seed,
                    "run_name": run_name,
                    "demos_used": out["demos_used"],
                    "demonstration_counts": out.get("demonstration_counts") or {},
                    "mlflow_run_id": out["mlflow_run_id"],
                    "accuracy": accuracy,
                }
            )
            terminal.say(
                f"{algo} seed {seed} trained ({len(results)} of {len(runs)}): held-out "
                f"{sum(accuracy.values()) / max(len(accuracy), 1):.3f}, "
                f"demonstrations used {out['demos_used']}"
            )
        families = {
            uid: src.split("/")[1] for uid, src in _sources(data.eval_paths["world"]).items()
        }
        summary = summarize(results, held_levels, families)
        summary["seconds"] = round(time.perf_counter() - start, 1)
        summary["train_levels"] = {lv: int(counts.get(lv, 0)) for lv in LEVELS}
        summary["config_hash"] = tag
        summary["mlflow_runs"] = {f"{r['algo']}-s{r['seed']}": r["mlflow_run_id"] for r in results}
        teacher_runs = [r["demonstration_counts"] for r in results if r["algo"] == TEACHER_METHOD]
        if teacher_runs:
            summary["teacher"] = {
                k: int(sum(c.get(k, 0) for c in teacher_runs))
                for k in ("teacher_verified", "teacher_rejected")
            }

        out_dir = Path(cfg.run.workdir) / name
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(summary, indent=1))
        figure = plot(summary, out_dir / "comparison.png")
        text = render_markdown(summary)
        (out_dir / "comparison.md").write_text(text)
        parent.log_artifact(out_dir / "results.json")
        parent.log_artifact(figure)
        parent.log_text(text, "comparison.md")
        parent.log_metrics(
            {f"{m}/heldout_accuracy": r["accuracy"] for m, r in summary["runs"].items()}
            | {f"{m}/demos_used": r["demos_used"] for m, r in summary["runs"].items()}
            | {
                f"diff/{_metric_name(k)}": d["mean"]
                for k, d in summary["differences"].items()
                if d["mean"] is not None
            }
        )
        create_markdown_artifact(
            markdown=text,
            key="demo-comparison",
            description="RL vs SFT vs ReLIFT on the proof-world",
        )
        # Training curves with seed bands and per-level shares, from the children in MLflow.
        report = write_report(
            tracking_uri(cfg),
            out_dir / "report",
            cfg.tracking.experiment,
            parent_run_id=parent.run_id,
        )
        parent.log_artifact(out_dir / "report", "report")
        create_markdown_artifact(
            markdown=report["report"].read_text(),
            key="demo-report",
            description="Training curves and levels (figures in MLflow)",
        )
    logger.info("\n" + text)
    return {
        "summary": summary,
        "markdown": text,
        "figure": str(figure),
        "results_path": str(out_dir / "results.json"),
        "mlflow_run_id": parent.run_id,
        "train_levels": counts,
        "runs": {r["run_name"]: r["mlflow_run_id"] for r in results},
    }


def _metric_name(claim: str) -> str:
    """A claim key as an MLflow metric name, which may not hold '@':
    `rl-base@non_hardest` -> `rl-base_at_non_hardest` (results.json keeps the claim keys)."""
    return claim.replace("@", "_at_")


def _sources(path: str) -> dict[str, str]:
    return {ex.uid: ex.data_source for ex in load_examples(path)}
