"""Prefect tasks for benchmark evaluation: run, record, log to MLflow, publish a markdown table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from relift_core.data.benchmarks import Benchmark, file_benchmark_spec, load_benchmark
from relift_core.grading.evaluation import (
    eval_settings,
    evaluate_benchmark,
    markdown_table,
    records_to_parquet,
)
from relift_core.grading.metrics import paper_averages, summarize_by
from relift_core.tracker import Tracker
from tasks import progress as terminal

# The MLflow metrics of evaluations on questions never trained on: `heldout/<benchmark>/<key>`,
# `heldout/<benchmark>/<group>/avg_at_k` per data source of a mixed set, `heldout/<average>`.
# (The training's own rollouts are `rollout_accuracy`, `reward_mean`, ...)
HELD_OUT = "heldout"
SCALAR_KEYS = (
    "avg_at_k",
    "pass_at_1",
    "pass_at_k",
    "maj_at_k",
    "format_failure_rate",
    "truncation_rate",
    "response_length_mean",
    "response_length_max",
    "reference_avg_at_k",
)


def resolve_benchmark(
    name: str, *, local_sets: dict[str, str], benchmarks_dir: str | None, limit: int | None
) -> Benchmark:
    """A set made with the training data (e.g. the proof-world's held-out split), else the
    registry."""
    if name in local_sets:
        bench = load_benchmark(local_sets[name], limit=limit)
        bench.name = name
        bench.spec = file_benchmark_spec(local_sets[name], name=name)
        return bench
    return load_benchmark(name, benchmarks_dir=benchmarks_dir, limit=limit)


@task(name="evaluate-benchmark", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def evaluate_one(
    engine,
    tokenizer,
    grader,
    bench: Benchmark,
    *,
    eval_cfg,
    out_dir: Path,
    require_think: bool,
    seed: int,
) -> tuple[list, dict[str, Any]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return evaluate_benchmark(
        engine,
        tokenizer,
        bench,
        grader,
        **eval_settings(eval_cfg),
        seed=seed,
        require_think=require_think,
        records_path=out_dir / f"{bench.name}.records.jsonl",
        progress=terminal.callback(f"evaluate {bench.name} (questions)"),
    )


def evaluate_all(
    engine,
    tokenizer,
    grader,
    *,
    names: list[str],
    eval_cfg,
    out_dir: Path,
    tracker: Tracker | None,
    step: int,
    local_sets: dict[str, str] | None = None,
    require_think: bool,
    seed: int,
    label: str,
) -> dict[str, dict[str, Any]]:
    """Evaluates every benchmark in `names`; logs metrics, records and tables. Returns summaries."""
    summaries: dict[str, dict[str, Any]] = {}
    for given in names:
        bench = resolve_benchmark(
            given,
            local_sets=local_sets or {},
            benchmarks_dir=eval_cfg.benchmarks_dir,
            limit=eval_cfg.limit,
        )
        # A benchmark given as a file path is named by its file's stem: metric keys and file
        # names hold no slashes (MLflow refused `heldout//abs/path.parquet/avg_at_k`).
        name = bench.name
        # quote(): keep Prefect from walking the model and every question (see flows/train.py).
        records, summary = evaluate_one(
            quote(engine),
            quote(tokenizer),
            quote(grader),
            quote(bench),
            eval_cfg=eval_cfg,
            out_dir=out_dir,
            require_think=require_think,
            seed=seed,
        )
        summaries[name] = summary
        parquet = out_dir / f"{name}.records.parquet"
        records_to_parquet(records, parquet)
        if tracker is not None:
            tracker.log_metrics(
                {
                    f"{HELD_OUT}/{name}/{k}": float(summary[k])
                    for k in SCALAR_KEYS
                    if isinstance(summary.get(k), (int, float))
                },
                step=step,
            )
            tracker.log_artifact(parquet, f"eval/step_{step:06d}")
            tracker.log_table(record_rows(records), f"eval/step_{step:06d}/{name}.records.json")
            by_source = summarize_by(records, "data_source")
            if len(by_source) > 1:  # a mixed set (the proof-world): one figure per family
                tracker.log_metrics(
                    {
                        f"{HELD_OUT}/{name}/{group_name(name, src)}/avg_at_k": float(
                            sub["avg_at_k"]
                        )
                        for src, sub in by_source.items()
                    },
                    step=step,
                )
    averages = paper_averages(summaries)
    if tracker is not None and averages:
        tracker.log_metrics({f"{HELD_OUT}/{k}": float(v) for k, v in averages.items()}, step=step)
    table = markdown_table(summaries)
    create_markdown_artifact(
        markdown=f"### Evaluation: {label}, step {step}\n\n{table}",
        key=_artifact_key(label),
        description=f"evaluation at step {step}",
    )
    create_table_artifact(
        table=[
            {"benchmark": n, **{k: s.get(k) for k in SCALAR_KEYS}} for n, s in summaries.items()
        ],
        key=_artifact_key(label) + "-table",
    )
    if tracker is not None:
        tracker.log_text(table, f"eval/step_{step:06d}/summary.md")
    return summaries


def group_name(benchmark: str, data_source: str) -> str:
    """A data source as a metric segment under its benchmark, without repeating it:
    `world` + `world/add/2` -> `add/2` (not `heldout/world/world/add/2`)."""
    return data_source.removeprefix(f"{benchmark}/")


# Characters of a response kept in the MLflow table (the parquet beside it has everything).
TABLE_TEXT_CHARS = 300


def record_rows(records) -> list[dict[str, Any]]:
    """Per-question records as rows the MLflow UI can preview: accuracy, gold, first answer."""
    return [
        {
            "uid": r.uid,
            "data_source": r.data_source,
            "ground_truth": r.ground_truth,
            "accuracy": r.accuracy,
            "samples": len(r.correct),
            "first_extracted": r.extracted[0] if r.extracted else None,
            "first_response": (r.samples[0][:TABLE_TEXT_CHARS] if r.samples else None),
        }
        for r in records
    ]


def _artifact_key(label: str) -> str:
    # Prefect artifact keys: lowercase letters, digits and dashes.
    return "eval-" + "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def evaluate_policy(session, tracker: Tracker, step: int, data, *, final: bool = False):
    """Evaluation from inside `train`: the session's engine and grader, the config's benchmarks."""
    cfg = session.cfg
    if not cfg.eval.benchmarks:
        return {}
    out_dir = cfg.run_dir() / "eval" / f"step_{step:06d}"
    summaries = evaluate_all(
        session.engine,
        session.tokenizer,
        session.grader,
        names=cfg.eval.benchmarks,
        eval_cfg=cfg.eval,
        out_dir=out_dir,
        tracker=tracker,
        step=step,
        local_sets=data.eval_paths,
        require_think=cfg.algorithm.require_think,
        seed=cfg.run.seed,
        label=f"{cfg.run.name}{'-final' if final else ''}",
    )
    if cfg.eval.keep_best:
        keep_best_policy(session, tracker, step, summaries)
    return summaries


def keep_best_policy(session, tracker: Tracker, step: int, summaries) -> None:
    """eval.keep_best: this evaluation's policy becomes <run>/best if it scores highest so far;
    MLflow labels it (tags relift.best_checkpoint/best_step/best_score, metric eval/best_score)."""
    from relift_core.runtime.best_policy import BEST_DIR, keep_if_best, selection_score

    score = selection_score(summaries)
    if score is None:
        return
    best_dir = session.cfg.run_dir() / BEST_DIR
    session.trainer.gather_weights()  # ranks elsewhere (cluster.backend=ray) hold the weights
    if keep_if_best(best_dir, step, score, session.model, session.tokenizer):
        tracker.log_metrics({"eval/best_score": score, "eval/best_step": float(step)}, step=step)
        if hasattr(tracker, "set_tags"):  # MLflow; the in-memory tracker has no tags
            tracker.set_tags(
                {
                    "relift.best_checkpoint": str(best_dir.resolve()),
                    "relift.best_step": str(step),
                    "relift.best_score": f"{score:.6f}",
                }
            )
