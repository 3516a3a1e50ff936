"""What Prefect + MLflow cost per training iteration.

Runs the same iterations twice from the same seed: once as relift_core's loop in plain Python
(`relift_core.iteration.run_iteration`, no Prefect, no MLflow, in-memory tracker), once as the
`train` flow (`flows.train`: the same run_iteration with every phase a Prefect task) on a Prefect
server with MLflow's SQLite store. Iteration wall times in the flow come from the MLflow metric
timestamps (so they include task-run bookkeeping and metric logging). Prints both and the
orchestration share of an iteration.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_orchestration.py \
        [--iterations 6] [--toy] [--parts]

--parts also times each piece of the per-iteration bookkeeping on its own.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

# Every size the timing depends on is pinned here, not taken from configs/toy.yaml (which
# changes as the demo is tuned): both sides run exactly this experiment.
OVERRIDES = [
    "model.source=tiny",
    "model.tiny.architecture=qwen2",
    "model.tiny.hidden_size=64",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=4",
    "model.tiny.num_kv_heads=2",
    "model.tiny.intermediate_size=192",
    "model.tiny.max_position_embeddings=256",
    "data.world.families=[add,sub,mul,chain]",
    "data.world.sizes=[2,3]",
    "data.world.cells=null",
    "data.world.train_per_cell=16",
    "data.world.eval_per_cell=1",
    "data.world.pretrain_examples=0",
    "rollout.engine=hf",
    "rollout.n=8",
    "rollout.max_new_tokens=48",
    "rollout.batch_size=64",
    "rl.prompts_per_step=16",
    "rl.mini_batch_size=16",
    "rl.micro_batch_size=64",
    "sft.mini_batch_size=8",
    "sft.micro_batch_size=8",
    "sft.max_target_tokens=64",
    "algorithm.name=relift",
    "algorithm.sft_buffer_threshold=8",
    "algorithm.require_think=false",
    "eval.benchmarks=[]",
    "run.checkpoint_every=1",
    "run.device=cpu",
    "run.grader_workers=1",
]


PHASES = ("rollout", "grade", "rl_update", "sft_update")


def plain_loop(cfg, data) -> tuple[list[float], dict[str, list[float]]]:
    """The iterations as plain Python: relift_core's own loop (run_iteration with its direct
    phases), an in-memory tracker, no Prefect, no MLflow. Seconds per iteration, checkpoint
    included (as in the flow)."""
    from relift_core.iteration import run_iteration
    from relift_core.runtime.session import build_session
    from relift_core.tracker import InMemoryTracker

    session = build_session(cfg, data.train_examples(), resume=False)
    tracker = InMemoryTracker()
    times = []
    try:
        for i in range(cfg.run.iterations):
            start = time.perf_counter()
            run_iteration(session, i, tracker=tracker)
            times.append(time.perf_counter() - start)
    finally:
        session.close()
    return times, {k: tracker.history(f"time/{k}") for k in PHASES}


def toy_overrides() -> list[str]:
    """The toy preset as the demo trains it: its world, sizes and pretrained base model."""
    from relift_core.config import load_config
    from relift_core.proofworld.pretrain import base_model_key, pretrain_base_model

    cfg = load_config("toy", [])
    base_dir = Path(__file__).resolve().parent.parent / "runs" / "bench" / base_model_key(cfg)
    if not (base_dir / "config.json").exists():
        pretrain_base_model(cfg.data.world, cfg.model.tiny, base_dir)
    return [
        f"model.init_from={base_dir}",
        "algorithm.name=relift",
        "eval.benchmarks=[]",
        "run.checkpoint_every=1",
        "run.device=cpu",
        "run.grader_workers=1",
    ]


def orchestration_parts(n: int = 50) -> None:
    """What each piece of per-iteration bookkeeping costs, in a flow on the harness's server:
    a task run (with and without its "Finished in state Completed()" line, which the train flow
    drops inside its loop), a progress-artifact update, and one MLflow metric batch (45 metrics,
    SQLite) as the tracker logs an iteration's metrics."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from prefect import flow, task
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.cache_policies import NO_CACHE

    from tasks.train_tasks import ENGINE_RETRIES, quiet_completed_phases

    @task(cache_policy=NO_CACHE, **ENGINE_RETRIES)
    def phase(x):
        return x

    def per_call(fn) -> float:
        fn(-1)  # warm-up
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        return 1000 * (time.perf_counter() - start) / n

    @flow
    def parts() -> dict[str, float]:
        out = {"task run, completion logged": per_call(phase)}
        with quiet_completed_phases():
            out["task run, completion dropped"] = per_call(phase)
        progress = create_progress_artifact(progress=0.0)
        out["progress artifact update"] = per_call(lambda i: update_progress_artifact(progress, i))
        return out

    result = parts()
    client = MlflowClient(tracking_uri=f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
    run = client.create_run(client.create_experiment("bench")).info.run_id
    names = [f"metric/{k}" for k in range(45)]
    result["MLflow metric batch (45, SQLite)"] = per_call(
        lambda i: client.log_batch(
            run, metrics=[Metric(k, 1.0, int(time.time() * 1000), i + 1) for k in names]
        )
    )
    for key, ms in result.items():
        print(f"  {key:34s} {ms:6.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument(
        "--toy",
        action="store_true",
        help="the toy preset's own iteration (64 prompts x 8, its pretrained base "
        "model, built once under runs/bench) instead of the pinned small run",
    )
    parser.add_argument(
        "--parts",
        action="store_true",
        help="also time each piece of per-iteration bookkeeping on its own",
    )
    args = parser.parse_args()
    if args.iterations < 2:
        parser.error("--iterations must be at least 2 (the first one is warm-up and dropped)")

    from mlflow import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from flows.prepare_data import prepare_data
    from flows.train import train
    from relift_core.config import load_config

    workdir = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    base = OVERRIDES
    if args.toy:
        base = toy_overrides()
    overrides = base + [f"run.iterations={args.iterations}", f"run.workdir={workdir}"]
    with prefect_test_harness(server_startup_timeout=180):
        plain_cfg = load_config("toy", overrides + ["run.name=plain"])
        data = prepare_data(plain_cfg.model_dump(mode="json"))
        plain, plain_phases = plain_loop(plain_cfg, data)
        result = train(preset="toy", overrides=overrides + ["run.name=flow"])
        if args.parts:
            print("per call:")
            orchestration_parts()
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    history = client.get_metric_history(result["mlflow_run_id"], "rollout_accuracy")
    stamps = [m.timestamp for m in sorted(history, key=lambda m: m.step)]
    flow_times = [(b - a) / 1000 for a, b in itertools.pairwise(stamps)]
    # The first iteration of each includes warm-up (JIT paths, grader worker start): drop it.
    p, f = statistics.mean(plain[1:]), statistics.mean(flow_times)
    print(f"iterations: {args.iterations} (first dropped)")
    print(f"plain relift_core loop : {p:.2f} s/iteration")
    print(f"Prefect + MLflow flow  : {f:.2f} s/iteration")
    print(
        f"orchestration overhead : {f - p:.2f} s/iteration = "
        f"{100 * (f - p) / f:.1f}% of an iteration"
    )
    # Inside the phases (as each measures itself): what the flow spends beyond the work itself
    # is outside them (task-run bookkeeping, metric logging) or slows them (busy threads).
    for key in PHASES:
        flow_phase = [
            m.value
            for m in sorted(
                client.get_metric_history(result["mlflow_run_id"], f"time/{key}"),
                key=lambda m: m.step,
            )
        ][1:]
        if plain_phases[key][1:] and flow_phase:
            print(
                f"  {key:11s} plain {statistics.mean(plain_phases[key][1:]):.3f} s, "
                f"flow {statistics.mean(flow_phase):.3f} s"
            )


if __name__ == "__main__":
    main()
