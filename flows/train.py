"""The `train` flow: ReLIFT (and its baselines) as the paper writes the algorithm.

    for each iteration (relift_core.iteration.run_iteration, each phase a Prefect task):
        questions  <- the next prompts_per_step training questions
        rollouts   <- n samples per question from the current policy
        grades     <- math-verify reward per sample
        levels     <- difficulty per question (hardest: 0 of n solved)
        buffer     += demonstrations of the hardest questions (ReLIFT; SFT: every question)
        RL update  on the group advantages                    (unless the strategy is SFT)
        SFT update on the newest sft_buffer_threshold once the buffer holds that many
        every k iterations: evaluate; every iteration: checkpoint (atomic)

Re-running with the same run name resumes from the last checkpoint: weights, optimizer, buffer,
difficulty ledger, data position and RNG are restored together.
"""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.context import get_run_context

from flows.base_model import build_base_model, needs_base_model
from flows.prepare_data import prepare_data
from relift_core.config import ConfigError, ExperimentConfig, load_config
from relift_core.data.preflight import settings_against_data
from relift_core.iteration import run_iteration
from relift_core.runtime.checkpoint import latest_checkpoint
from relift_core.runtime.memory_plan import check_fits
from relift_core.runtime.models import export_dtype
from relift_core.runtime.session import build_session
from tasks import progress as terminal
from tasks.eval_tasks import evaluate_policy
from tasks.tracking import MlflowTracker, mlflow_run
from tasks.train_tasks import PREFECT_PHASES, quiet_completed_phases

MLFLOW_RUN_ID_FILE = "mlflow_run_id"


def _train_run_name() -> str:
    """`train-<run.name>`: the run's name as the overrides set it (the preset's otherwise)."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    names = [o.split("=", 1)[1] for o in params.get("overrides") or [] if o.startswith("run.name=")]
    if names:
        return f"train-{names[-1]}"
    try:
        return f"train-{load_config(params.get('preset', 'toy'), []).run.name}"
    except (ConfigError, OSError):  # a bad preset fails in the flow itself, with its message
        return "train"


@flow(name="train", log_prints=True, flow_run_name=_train_run_name)
def train(
    preset: str = "toy", overrides: list[str] | None = None, parent_mlflow_run_id: str | None = None
) -> dict[str, Any]:
    """Train one run: ReLIFT or a baseline, from a preset with overrides.

    Args:
        preset: a config preset in configs/ (toy, smollm2-135m, qwen2.5-math-1.5b,
            qwen2.5-math-7b) or a YAML file.
        overrides: dotted `key=value` config overrides, e.g. `algorithm.name=rl`,
            `run.name=rl-s0`, `run.seed=1`, `rl.lr=1e-6`. `relift config` shows every key.
        parent_mlflow_run_id: set by `sweep` and `demo` to nest this run under theirs; leave
            empty for a run of its own.
    """
    cfg = load_config(preset, overrides or [])
    check_fits(cfg)  # a GPU config that cannot fit fails here, before anything is allocated
    if needs_base_model(cfg):
        # The toy preset trains from the world's pretrained base model, not from random weights.
        base_dir = build_base_model(cfg.model_dump(mode="json"))
        cfg = load_config(preset, [*(overrides or []), f"model.init_from={base_dir}"])
    return run_training(cfg, parent_mlflow_run_id=parent_mlflow_run_id)


def run_training(
    cfg: ExperimentConfig, *, parent_mlflow_run_id: str | None = None
) -> dict[str, Any]:
    logger = get_run_logger()
    data = prepare_data.with_options(flow_run_name=f"prepare-data-{cfg.run.name}")(
        cfg.model_dump(mode="json")
    )
    examples = data.train_examples()
    # Checked again here (the CLI checks before any server starts): a deployment's run has no
    # CLI in front of it.
    for warning in settings_against_data(cfg, examples, data.train_path):
        logger.warning(warning)
    # The session first: it locks the run directory and refuses to resume another experiment's
    # checkpoints before anything is written to MLflow.
    session = build_session(cfg, examples)
    try:
        # The run directory remembers its MLflow run, so a moved or copied run store resumes
        # into the same MLflow run (its absolute path, the run key, has changed).
        id_file = cfg.run_dir() / MLFLOW_RUN_ID_FILE
        known = id_file.read_text().strip() if id_file.exists() else None
        with mlflow_run(
            cfg,
            run_key=str(cfg.run_dir().resolve()),
            run_name=cfg.run.name,
            parent_run_id=parent_mlflow_run_id,
            tags={
                "relift.algorithm": cfg.algorithm.name,
                "relift.preset_fingerprint": cfg.fingerprint(),
            },
            known_run_id=known,
            data_fingerprint=session.data_fingerprint,
            start_over=session.started_over is not None,
        ) as tracker:
            id_file.write_text(tracker.run_id)
            tracker.start_system_metrics(cfg.tracking.system_metrics_interval_s)
            link_prefect_and_mlflow(tracker, cfg.run.name)
            log_config_and_data(tracker, cfg, data)
            if session.resumed_from:
                terminal.log_and_say(
                    logger,
                    f"resumed from {session.resumed_from} at iteration {session.state.iteration}",
                )
                # A resumed run redoes the iterations after its checkpoint; what the lost attempt
                # logged for them is not logged a second time (see skip_logged_steps_from).
                tracker.skip_logged_steps_from(session.state.iteration)
            for path, why in session.skipped_checkpoints:
                terminal.log_and_say(logger, f"skipped checkpoint {path}: {why}", warn=True)
            if session.skipped_checkpoints:
                tracker.set_tags(
                    {"relift.skipped_checkpoints": json.dumps(session.skipped_checkpoints)[:5000]}
                )
            if session.started_over is not None:
                terminal.log_and_say(
                    logger,
                    f"run.resume=never: started over; the earlier checkpoints are in "
                    f"{session.started_over}",
                    warn=True,
                )
                tracker.set_tags({"relift.started_over": str(session.started_over)})
            if session.resumed_with_changes:
                changes = {
                    k: f"{a!r} -> {b!r}" for k, (a, b) in session.resumed_with_changes.items()
                }
                terminal.log_and_say(
                    logger,
                    f"resumed with a changed config (run.resume=force): {changes}",
                    warn=True,
                )
                tracker.set_tags({"relift.resumed_with_changes": json.dumps(changes)[:5000]})
            progress_id = create_progress_artifact(
                progress=100.0 * session.state.iteration / max(cfg.run.iterations, 1),
                description=f"{cfg.run.name}: iterations done of {cfg.run.iterations}",
            )
            progress_shown = time.monotonic()
            bar = terminal.start(
                f"{cfg.run.name} ({cfg.algorithm.name})",
                cfg.run.iterations,
                completed=session.state.iteration,
            )
            if cfg.eval.at_start and session.state.iteration == 0 and cfg.run.iterations > 0:
                evaluate_policy(session, tracker, 0, data)  # the starting point of every curve
            with quiet_completed_phases():
                for i in range(session.state.iteration, cfg.run.iterations):
                    metrics = run_iteration(
                        session,
                        i,
                        phases=PREFECT_PHASES,
                        tracker=tracker,
                        evaluate=lambda step: evaluate_policy(session, tracker, step, data),
                    )
                    terminal.log_and_say(logger, f"{cfg.run.name} {_summary_line(i, metrics)}")
                    terminal.advance(
                        bar,
                        f"acc {metrics['rollout_accuracy']:.2f} demos {metrics['demos_used']:.0f}",
                    )
                    progress_shown = _show_progress(
                        progress_id, i + 1, cfg.run.iterations, progress_shown
                    )
            final = evaluate_policy(session, tracker, cfg.run.iterations, data, final=True)
            tracker.log_text(
                "\n".join(json.dumps(x) for x in session.state.sft_log), "sft_demonstrations.jsonl"
            )
            log_final_policy(tracker, session)
    finally:
        session.close()
    return {
        "run_name": cfg.run.name,
        "mlflow_run_id": tracker.run_id,
        "mlflow_url": tracker.url(),
        "prefect_url": prefect_flow_run_url(str(get_run_context().flow_run.id)),
        "demos_used": session.state.demos_used,
        "demonstration_counts": session.demonstration_source.counts(),
        "eval": final,
    }


PROGRESS_ARTIFACT_EVERY_S = 5.0


def _show_progress(progress_id, done: int, total: int, last_shown: float) -> float:
    """Update the Prefect UI's progress artifact at most every few seconds, and at the end: each
    update is an API round trip (`scripts/bench_orchestration.py --parts` times one)."""
    now = time.monotonic()
    if done < total and now - last_shown < PROGRESS_ARTIFACT_EVERY_S:
        return last_shown
    update_progress_artifact(progress_id, 100.0 * done / max(total, 1))
    return now


def log_final_policy(tracker: MlflowTracker, session) -> None:
    """The trained policy as an MLflow model (transformers flavour; registrable), or, with
    tracking.log_final_model off (multi-GB models), only the final checkpoint's path as a tag."""
    final = latest_checkpoint(session.checkpoint_dir)
    if final is not None:
        tracker.set_tags({"relift.final_checkpoint": str(final.resolve())})
    if session.cfg.tracking.log_final_model:
        # The exported model is in the compute dtype (the float32 masters stay in the
        # checkpoint); this is the session's last use of its weights.
        model = session.model.to(export_dtype(session.cfg.model))
        uri = tracker.log_policy(model, session.tokenizer, session.state.iteration)
        tracker.set_tags({"relift.policy_model_uri": uri})


def link_prefect_and_mlflow(tracker: MlflowTracker, run_name: str) -> None:
    """Tags on the MLflow run name the Prefect flow run; a Prefect artifact links back (the
    runs of `train`, and the parent runs of `sweep`)."""
    flow_run = get_run_context().flow_run
    prefect_url = prefect_flow_run_url(str(flow_run.id))
    tracker.set_tags(
        {
            "prefect.flow_run_id": str(flow_run.id),
            "prefect.flow_run_name": flow_run.name,
            "prefect.flow_run_url": prefect_url,
            # The run's description in the MLflow UI (markdown): a link that clicks back.
            "mlflow.note.content": f"Prefect flow run [{flow_run.name}]({prefect_url})",
        }
    )
    create_link_artifact(
        key="mlflow-run",
        link=tracker.url(),
        link_text=f"MLflow run {run_name} ({tracker.run_id})",
        description="This flow run's MLflow run: metrics, artifacts, records",
    )


def prefect_flow_run_url(flow_run_id: str) -> str:
    """The flow run's page in the Prefect UI of the server this run reports to."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    ui = PREFECT_UI_URL.value() or (PREFECT_API_URL.value() or "").removesuffix("/api")
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}"


def log_config_and_data(tracker: MlflowTracker, cfg: ExperimentConfig, data) -> None:
    tracker.log_params(
        {**cfg.flat_params(), "data.dropped_over_long": getattr(data, "dropped_over_long", 0)}
    )
    tracker.log_text(cfg.to_yaml(), "config.yaml")
    for name, (df, source, digest) in data.mlflow_datasets().items():
        tracker.log_dataset(
            df,
            name=name,
            source=source,
            digest=digest,
            context="training" if name == "train" else "evaluation",
        )


def _summary_line(i: int, m: dict[str, float]) -> str:
    return (
        f"iter {i}: acc {m['rollout_accuracy']:.3f} reward {m['reward_mean']:.3f} "
        f"hardest {m['frac_hardest']:.2f} buffer {m['buffer_size']:.0f} "
        f"demos {m['demos_used']:.0f} ({m['time/iteration']:.1f}s)"
    )
