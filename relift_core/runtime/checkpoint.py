"""Atomic, verified checkpoints of everything a run needs to resume.

Layout of one checkpoint, `<directory>/step_000042/`:

    model/              save_pretrained: config.json, *.safetensors (+ tokenizer files), so the
                        directory also loads with `from_pretrained` (evaluation, vLLM)
    trainer_state.pt    optimizer states and step counters (TorchTrainer.state_dict)
    trainer_shards/     multi-rank runs only: every rank's optimizer shard, written by the
                        ranks themselves (FSDP2: torch.distributed.checkpoint; ZeRO-3: one
                        partition file per rank), hashed in the manifest like the rest
    rng_state.pt        python, numpy, torch CPU (and CUDA) generator states
    state.json          {"step": ..., "extra_state": ...}: buffer, ledger, data position (JSON)
    manifest.json       sha256 and size of every file above; written last

Crash safety: everything is written into a temporary directory beside the final one, fsynced,
then moved into place with one `os.replace`. A directory named `step_*` therefore appears only
complete; a crash leaves at most a `.tmp-*` directory, which readers ignore. The manifest is
the proof of completeness: loading checks every hash before it touches the model, so a
truncated or edited file is refused and the model stays as it was. One writer per directory.

Diverged weights are never checkpointed: `save_checkpoint` refuses a model with a NaN or inf
weight (NonFiniteWeightsError) and marks what it writes `"weights_finite": true` in the
manifest. `latest_checkpoint` passes over a checkpoint whose weights are not finite (one written
before that check, or edited), with a warning naming it, and `load_checkpoint` refuses one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from relift_core.atomic import TMP_PREFIX, atomic_dir
from relift_core.errors import UserError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
MODEL_DIR = "model"
TRAINER_STATE = "trainer_state.pt"
TRAINER_SHARDS = "trainer_shards"
RNG_STATE = "rng_state.pt"
STATE_JSON = "state.json"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
WEIGHTS_FINITE = "weights_finite"  # manifest key: the writer checked every weight is finite

log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is incomplete, corrupt, or does not fit the model."""


class NonFiniteWeightsError(CheckpointError):
    """Model weights with NaN or inf: a diverged model, which is never checkpointed or loaded."""


def non_finite_weights(tensors: Any) -> list[str]:
    """Names of the floating-point tensors in `tensors` (name -> tensor pairs, e.g. a state
    dict's items()) that hold a NaN or inf."""
    bad = []
    for name, tensor in tensors:
        if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
    return bad


# ------------------------------------------------------------------------------------ RNG state


def capture_rng_state() -> dict[str, Any]:
    """Every generator a run draws from, as plain tensors/tuples (loadable with weights_only)."""
    # legacy=True (the default) always returns the tuple; numpy's stub types the dict form too.
    legacy = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    kind, keys, pos, has_gauss, cached_gaussian = legacy
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------- file helpers


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _step_of(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def checkpoint_dirs(directory: Path) -> list[Path]:
    """`step_*` directories under `directory`, oldest step first (complete or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=lambda p: _step_of(p) or 0)


# ------------------------------------------------------------------------------------------ save


def save_checkpoint(
    directory: Path,
    *,
    model: torch.nn.Module,
    tokenizer: Any = None,
    trainer_state: dict,
    step: int,
    extra_state: dict | None = None,
    keep: int = 2,
    write_shards: Callable[[Path], None] | None = None,
) -> Path:
    """Write `<directory>/step_<step:06d>/` atomically (see the module docstring); afterwards keep
    only the newest `keep` complete checkpoints. Returns the checkpoint's path.
    `write_shards(dir)` writes a sharded trainer's files into the checkpoint before it is
    hashed and moved into place."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    bad = non_finite_weights(model.state_dict().items())
    if bad:
        raise NonFiniteWeightsError(
            f"refusing to write checkpoint step {step} in {directory}: model weights "
            f"{bad[:5]}{' and more' if len(bad) > 5 else ''} hold NaN or inf (training diverged); "
            "the previous checkpoints are kept"
        )
    try:
        state_json = json.dumps({"step": step, "extra_state": extra_state}, indent=1)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"extra_state for step {step} is not JSON-serialisable: {e}") from e
    directory = Path(directory)
    final = directory / f"step_{step:06d}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_checkpoint(final, model, tokenizer, trainer_state, state_json, step, write_shards)
        _fsync(directory)
    except (OSError, RuntimeError) as e:
        # A full disk or any other I/O error, as one line naming the path and the cause (torch
        # reports a full disk as `inline_container.cc:672 ... unexpected pos`); nothing a retry
        # fixes. atomic_dir has removed the partial copy; the kept checkpoints are untouched.
        raise CheckpointWriteError(
            f"cannot write checkpoint {final}: {_io_cause(e, directory)}; the earlier "
            "checkpoints are kept"
        ) from e
    _prune(directory, keep)
    return final


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, I/O error, permissions)."""


def _io_cause(e: BaseException, directory: Path) -> str:
    """What went wrong, in words: the OS error of `e` or of its causes, else how full the disk
    is (torch's own message for a full disk says neither)."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    try:
        usage = shutil.disk_usage(directory)
        if usage.free < 64 * 1024**2:
            return f"no space left on the device ({usage.free / 1024**2:.0f} MiB free)"
    except OSError:
        pass
    first = str(e).strip().splitlines()
    return first[0][:200] if first else type(e).__name__


def _torch_save(obj: Any, path: Path) -> None:
    # Through a Python file, so that a failed write keeps its OSError (errno, "No space left on
    # device") as the context of torch's own error, which says only "unexpected pos".
    with path.open("wb") as f:
        torch.save(obj, f)


def _write_checkpoint(
    final: Path,
    model: torch.nn.Module,
    tokenizer: Any,
    trainer_state: dict,
    state_json: str,
    step: int,
    write_shards: Callable[[Path], None] | None,
) -> None:
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp / MODEL_DIR)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / MODEL_DIR)
        _torch_save(trainer_state, tmp / TRAINER_STATE)
        if write_shards is not None:
            write_shards(tmp / TRAINER_SHARDS)
        _torch_save(capture_rng_state(), tmp / RNG_STATE)
        (tmp / STATE_JSON).write_text(state_json)
        files = _files_under(tmp)
        # Readable like the rest of the run directory: transformers writes the weights through
        # a temporary file of mode 0600; every file gets the mode an ordinary write gets here.
        mode = (tmp / STATE_JSON).stat().st_mode & 0o777
        for path in files:
            path.chmod(mode)
            _fsync(path)
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            WEIGHTS_FINITE: True,
            "files": {
                p.relative_to(tmp).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size}
                for p in files
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / MANIFEST)
        for sub in {p.parent for p in files} | {tmp}:
            _fsync(sub)


def _prune(directory: Path, keep: int) -> None:
    complete = [p for p in checkpoint_dirs(directory) if _manifest_problem(p, hashes=False) is None]
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    # Debris of crashed writes (single writer per directory, so none is in progress).
    for debris in directory.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(debris, ignore_errors=True)


# ----------------------------------------------------------------------------------- verify/load


def _manifest_problem(path: Path, *, hashes: bool) -> str | None:
    """Why `path` is not a complete checkpoint, or None. Sizes always, sha256 when `hashes`."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"{manifest_path} is missing: the checkpoint is incomplete"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT_VERSION or not isinstance(files, dict):
            return f"{manifest_path}: unknown manifest format {manifest.get('format')!r}"
    except (ValueError, KeyError, TypeError) as e:
        return f"{manifest_path} is not a valid manifest: {e}"
    for required in (TRAINER_STATE, RNG_STATE, STATE_JSON):
        if required not in files:
            return f"{manifest_path} does not list {required}"
    # A copy of an older step under a newer step's name would otherwise pass as the newest
    # (and pruning would then delete the real newer step).
    if manifest.get("step") != _step_of(path):
        return (
            f"{manifest_path} is the manifest of step {manifest.get('step')!r}, not of {path.name}"
        )
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is listed in the manifest but missing"
        if file.stat().st_size != entry["bytes"]:
            return (
                f"{file} has {file.stat().st_size} bytes, the manifest says {entry['bytes']} "
                "(truncated or modified)"
            )
        if hashes and _sha256(file) != entry["sha256"]:
            return f"{file} does not match its sha256 in the manifest (corrupt or modified)"
    return None


def verify_checkpoint(path: Path, *, hashes: bool = True) -> None:
    """Raise CheckpointError naming the first bad file; return quietly if complete and intact."""
    problem = _manifest_problem(Path(path), hashes=hashes)
    if problem is not None:
        raise CheckpointError(problem)


def latest_checkpoint(
    directory: Path,
    *,
    hashes: bool = False,
    before: int | None = None,
    skipped: list[tuple[Path, str]] | None = None,
) -> Path | None:
    """The newest checkpoint whose manifest names its step, whose files all exist at the listed
    sizes (and, with `hashes`, match their sha256: what resuming uses, so that every kind of
    corruption falls back the same way) and whose weights are finite. Each checkpoint passed
    over is named in a warning, and appended with its reason to `skipped`. Temp dirs are never
    considered; with `before`, only steps below it (the fallback from a step that failed to
    load)."""
    for path in reversed(checkpoint_dirs(Path(directory))):
        if before is not None and (_step_of(path) or 0) >= before:
            continue
        problem = _manifest_problem(path, hashes=hashes)
        if problem is None:
            bad = _non_finite_saved_weights(path)
            if not bad:
                return path
            problem = f"its weights {bad[:5]} hold NaN or inf (a diverged model)"
        log.warning(f"skipping checkpoint {path}: {problem}; falling back to the one before it")
        if skipped is not None:
            skipped.append((path, problem))
    return None


def _non_finite_saved_weights(path: Path) -> list[str]:
    """Saved weight names holding NaN/inf; none read when the manifest says the writer checked
    (every checkpoint this module writes). Reads one tensor at a time."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return []  # _manifest_problem reports it
    if manifest.get(WEIGHTS_FINITE) is True:
        return []
    bad = []
    for file in sorted((path / MODEL_DIR).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                bad += non_finite_weights((k, f.get_tensor(k)) for k in f.keys())  # noqa: SIM118
        except Exception as e:  # noqa: BLE001 (unreadable: load_checkpoint names the problem)
            log.debug(f"{file}: not checked for non-finite weights: {e}")
    return bad


def _read_model_weights(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The saved tensors, checked against the model's names and shapes before any copy.

    save_pretrained writes a tied weight once (e.g. lm_head tied to embed_tokens); a model key
    may be absent from the files when it aliases a saved one.
    """
    files = sorted((path / MODEL_DIR).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path / MODEL_DIR} holds no *.safetensors weights")
    saved: dict[str, torch.Tensor] = {}
    for file in files:
        saved.update(load_file(file))
    expected = model.state_dict()
    unexpected = sorted(set(saved) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{path}: weights {unexpected[:5]} are not in the model (a different architecture?)"
        )
    saved_storage = {expected[k].data_ptr() for k in saved}
    missing = [
        k for k in expected if k not in saved and expected[k].data_ptr() not in saved_storage
    ]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks weights {missing[:5]}")
    for key, tensor in saved.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(tensor.shape)} in the checkpoint, "
                f"{tuple(expected[key].shape)} in the model"
            )
    bad = non_finite_weights(saved.items())
    if bad:
        raise NonFiniteWeightsError(
            f"{path}: weights {bad[:5]} hold NaN or inf (a diverged model); not loaded"
        )
    return saved


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    trainer: Any = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Verify every file's hash, then load weights (and trainer state, RNG states).

    Everything is read and checked before the model is touched: a bad checkpoint raises
    CheckpointError naming the file and leaves model and trainer as they were.
    Returns {"step", "extra_state", "path"}.
    """
    path = Path(path)
    verify_checkpoint(path, hashes=True)
    try:
        state = json.loads((path / STATE_JSON).read_text())
        trainer_state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
        rng_state = torch.load(path / RNG_STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # hashes matched, so this is a writer bug or a version change
        raise CheckpointError(f"{path}: cannot read its state files: {e}") from e
    weights = _read_model_weights(path, model)
    with torch.no_grad():
        # strict=False only for tied aliases, which _read_model_weights has already accounted for.
        model.load_state_dict(weights, strict=False)
    if trainer is not None:
        trainer.load_state_dict(trainer_state)
        if hasattr(trainer, "load_sharded"):  # a multi-rank trainer: its ranks read their shards
            if not (path / TRAINER_SHARDS).is_dir():
                raise CheckpointError(
                    f"{path} holds no {TRAINER_SHARDS}/: it was written by a "
                    "one-process run; resume it without cluster.backend=ray"
                )
            trainer.load_sharded(path / TRAINER_SHARDS)
    if restore_rng:
        restore_rng_state(rng_state)
    return {"step": int(state["step"]), "extra_state": state["extra_state"], "path": path}
