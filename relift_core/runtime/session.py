"""Assembles a training session from the config: policy, rollout engine, trainer, grader, and
the run state (buffer, ledger, data position, `RunState`), resumed from the run's last
checkpoint if any."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from relift_core.algorithm.demonstration_buffer import DemoBuffer
from relift_core.algorithm.demonstrations import (
    DatasetDemonstrations,
    DemonstrationSource,
    TeacherDemonstrations,
)
from relift_core.algorithm.difficulty import DifficultyLedger
from relift_core.algorithm.strategies import Strategy, strategy_from_config
from relift_core.config import ExperimentConfig, config_differences
from relift_core.data.examples import Example, fingerprint_examples
from relift_core.data.question_stream import QuestionStream
from relift_core.errors import UserError
from relift_core.grading.grader import BatchGrader
from relift_core.runtime.assembly import build_engine, seed_everything, trainer_options
from relift_core.runtime.checkpoint import (
    STATE_JSON,
    CheckpointError,
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from relift_core.runtime.models import compute_autocast, load_policy, resolve_device
from relift_core.runtime.rollout import HFRolloutEngine, RolloutEngine
from relift_core.runtime.run_lock import RunLock
from relift_core.runtime.trainer import TorchTrainer

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """Everything a run carries between iterations; all of it is checkpointed together."""

    iteration: int
    buffer: DemoBuffer
    ledger: DifficultyLedger
    stream: QuestionStream
    demos_used: int = 0
    sft_steps: int = 0
    # Every demonstration fine-tuned on: (iteration used, uid, iteration added, level when added).
    sft_log: list[dict[str, Any]] = field(default_factory=list)

    def extra_state(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "buffer": self.buffer.state_dict(),
            "ledger": self.ledger.state_dict(),
            "stream": self.stream.state_dict(),
            "demos_used": self.demos_used,
            "sft_steps": self.sft_steps,
            "sft_log": self.sft_log,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self.buffer.load_state_dict(state["buffer"])
        self.ledger.load_state_dict(state["ledger"])
        self.stream.load_state_dict(state["stream"])
        self.demos_used = int(state["demos_used"])
        self.sft_steps = int(state["sft_steps"])
        self.sft_log = list(state.get("sft_log", []))


@dataclass
class TrainSession:
    cfg: ExperimentConfig
    model: torch.nn.Module
    tokenizer: Any  # a transformers tokenizer (untyped here: mypy skips transformers)
    engine: RolloutEngine
    trainer: TorchTrainer
    grader: BatchGrader
    demonstration_source: DemonstrationSource
    strategy: Strategy
    state: RunState
    dataset: list[Example]
    resumed_from: Path | None = None
    # Experiment keys that differ from the resumed checkpoint's (only with run.resume=force).
    resumed_with_changes: dict[str, tuple] = field(default_factory=dict)
    lock: RunLock | None = None
    # Checkpoints passed over on resume, newest first: (directory, why); each was removed.
    skipped_checkpoints: list[tuple[str, str]] = field(default_factory=list)
    # run.resume=never with checkpoints on disk: where they were moved before starting over.
    started_over: Path | None = None
    data_fingerprint: str = ""

    @property
    def checkpoint_dir(self) -> Path:
        return self.cfg.run_dir() / "checkpoints"

    def save(self) -> Path:
        self.trainer.gather_weights()  # ranks elsewhere (cluster.backend=ray) hold the weights
        extra = {
            **self.state.extra_state(),
            "config": self.cfg.experiment_params(),
            "data_fingerprint": self.data_fingerprint,
        }
        return save_checkpoint(
            self.checkpoint_dir,
            model=self.model,
            tokenizer=self.tokenizer,
            trainer_state=self.trainer.state_dict(),
            step=self.state.iteration,
            extra_state=extra,
            # Sharded engines' ranks write their own optimizer shards.
            write_shards=getattr(self.trainer, "save_sharded", None),
        )

    def close(self) -> None:
        self.trainer.close()
        self.grader.close()
        if self.lock is not None:
            self.lock.release()


def build_demonstration_source(
    cfg: ExperimentConfig, grader: BatchGrader, device
) -> DemonstrationSource:
    if cfg.algorithm.demonstrations == "dataset":
        return DatasetDemonstrations()
    teacher_cfg = cfg.model.model_copy(update={"init_from": cfg.algorithm.teacher_model})
    teacher, tokenizer = load_policy(teacher_cfg, device=str(device), seed=cfg.run.seed)
    engine = HFRolloutEngine(
        teacher,
        tokenizer,
        batch_size=cfg.rollout.batch_size,
        device=device,
        bf16_autocast=compute_autocast(cfg.model),
    )
    return TeacherDemonstrations(
        engine,
        tokenizer,
        grader,
        attempts=cfg.algorithm.teacher_attempts,
        temperature=cfg.eval.temperature,
        max_new_tokens=cfg.rollout.max_new_tokens,
        require_think=cfg.algorithm.require_think,
    )


def _trainer_and_engine(cfg: ExperimentConfig, model, tokenizer, device):
    """This process's trainer and engine, or (cluster.backend=ray) handles on the Ray ranks."""
    if cfg.cluster.backend == "ray":
        from relift_core.runtime.ray_cluster import RayRanks, RayRolloutEngine, RayTrainer

        ranks = RayRanks(cfg, model)
        return (
            RayTrainer(ranks, model, cfg.cluster.trainer_strategy),
            RayRolloutEngine(ranks, tokenizer),
        )
    trainer = TorchTrainer(model, **trainer_options(cfg, device))
    return trainer, build_engine(cfg, model, tokenizer, device)


class ResumeRefused(UserError, RuntimeError):
    """The run name's checkpoints (or MLflow run) belong to another experiment, or none of its
    checkpoints is usable."""


DATA_KEY = "(training data)"  # the key under which a changed data fingerprint is reported


def check_resumable(
    cfg: ExperimentConfig, checkpoint: Path, data_fingerprint: str | None = None
) -> dict[str, tuple]:
    """The experiment keys that differ between `checkpoint` and `cfg` (and the training data's
    fingerprint, when both know it); raises ResumeRefused unless they are empty or
    run.resume=force. Read before any weight is loaded."""
    try:
        saved = json.loads((checkpoint / STATE_JSON).read_text()).get("extra_state") or {}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{checkpoint / STATE_JSON}: unreadable: {e}") from e
    if "config" not in saved:
        diffs = {"(config)": ("not recorded", "current")}
    else:
        diffs = config_differences(saved["config"], cfg.experiment_params())
    saved_data = saved.get("data_fingerprint")
    if saved_data and data_fingerprint and saved_data != data_fingerprint:
        diffs[DATA_KEY] = (saved_data, data_fingerprint)
    if diffs and cfg.run.resume != "force":
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diffs.items())[:8])
        more = f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else ""
        raise ResumeRefused(
            f"run '{cfg.run.name}' in {checkpoint.parent.parent} was made with another config "
            f"({shown}{more}); choose another run.name, or pass run.resume=force to resume it "
            "anyway"
        )
    return diffs


def build_session(
    cfg: ExperimentConfig, dataset: list[Example], *, resume: bool = True, lock: bool = True
) -> TrainSession:
    """The run's session; resumes its last checkpoint when `resume` and the config allows it.

    With `lock`, the run directory is locked for the session's life (released by close())."""
    run_lock = RunLock(cfg.run_dir()).acquire() if lock else None
    try:
        return _build_session(cfg, dataset, resume=resume, run_lock=run_lock)
    except BaseException:
        if run_lock is not None:
            run_lock.release()
        raise


def set_aside(checkpoints: Path) -> Path:
    """run.resume=never: the run's checkpoints moved (never deleted) to
    `<run dir>/superseded/<UTC time>/`, so the run starts over from step 0."""
    import time

    target = checkpoints.parent / "superseded" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target.mkdir(parents=True, exist_ok=True)
    moved = target / checkpoints.name
    checkpoints.rename(moved)
    log.warning(f"run.resume=never: {checkpoints} moved to {moved}; starting over from step 0")
    return moved


def _refuse_without_a_checkpoint(
    cfg: ExperimentConfig, skipped: list[tuple[Path, str]]
) -> NoReturn:
    shown = "; ".join(f"{path.name}: {why}" for path, why in skipped[:3])
    raise ResumeRefused(
        f"run '{cfg.run.name}' has no usable checkpoint in {skipped[0][0].parent} ({shown}): "
        "refusing to start over silently; pass run.resume=never to start over (the checkpoints "
        "are moved aside), or choose another run.name"
    )


def _build_session(
    cfg: ExperimentConfig, dataset: list[Example], *, resume: bool, run_lock: RunLock | None
) -> TrainSession:
    checkpoints = cfg.run_dir() / "checkpoints"
    started_over = None
    if resume and cfg.run.resume == "never" and checkpoint_dirs(checkpoints):
        started_over = set_aside(checkpoints)
    skipped: list[tuple[Path, str]] = []
    resumed_from = latest_checkpoint(checkpoints, skipped=skipped) if resume else None
    if resume and resumed_from is None and skipped:
        _refuse_without_a_checkpoint(cfg, skipped)
    data_fingerprint = fingerprint_examples(dataset)
    changes = (
        check_resumable(cfg, resumed_from, data_fingerprint) if resumed_from is not None else {}
    )
    seed_everything(cfg.run.seed)
    # With Ray the ranks train; the driver's copy of the weights (checkpoints) stays on the CPU.
    device = resolve_device("cpu" if cfg.cluster.backend == "ray" else cfg.run.device)
    model, tokenizer = load_policy(cfg.model, device=str(device), seed=cfg.run.seed)
    trainer, engine = _trainer_and_engine(cfg, model, tokenizer, device)
    state = RunState(
        iteration=0,
        buffer=DemoBuffer(cfg.algorithm.sft_buffer_order),
        ledger=DifficultyLedger(),
        stream=QuestionStream(len(dataset), seed=cfg.run.seed, shuffle=cfg.data.shuffle),
    )
    try:
        grader = BatchGrader(workers=cfg.run.grader_workers, timeout_s=cfg.run.grader_timeout_s)
    except BaseException:
        trainer.close()
        raise
    try:
        # Before the checkpoint: loading a teacher must not disturb the RNG states it restores.
        source = build_demonstration_source(cfg, grader, device)
        while resumed_from is not None:
            try:
                restored = load_checkpoint(resumed_from, model=model, trainer=trainer)
            except CheckpointError as e:
                # A hash mismatch (bytes flipped, same size) falls back like a truncation:
                # nothing was loaded, so the next older checkpoint is tried.
                log.warning(
                    f"skipping checkpoint {resumed_from}: {e}; falling back to the one before it"
                )
                skipped.append((resumed_from, str(e)))
                step = int(resumed_from.name.removeprefix("step_"))
                resumed_from = latest_checkpoint(checkpoints, before=step, skipped=skipped)
                if resumed_from is None:
                    _refuse_without_a_checkpoint(cfg, skipped)
                changes = check_resumable(cfg, resumed_from, data_fingerprint)
                continue
            state.load_extra_state(restored["extra_state"])
            break
        for path, _ in skipped:  # all newer than the one resumed: their steps are redone
            log.warning(f"removing unusable checkpoint {path}")
            shutil.rmtree(path, ignore_errors=True)
    except BaseException:
        grader.close()
        trainer.close()
        raise
    return TrainSession(
        cfg=cfg,
        model=model,
        tokenizer=tokenizer,
        engine=engine,
        trainer=trainer,
        grader=grader,
        demonstration_source=source,
        strategy=strategy_from_config(cfg.algorithm),
        state=state,
        dataset=dataset,
        resumed_from=resumed_from,
        resumed_with_changes=changes,
        lock=run_lock,
        skipped_checkpoints=[(str(p), why) for p, why in skipped],
        started_over=started_over,
        data_fingerprint=data_fingerprint,
    )
