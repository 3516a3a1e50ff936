"""What Prefect + MLflow cost per training iteration.

Runs the same iterations twice from the same seed: once as a plain Python loop over
relift_core (no Prefect, no MLflow, in-memory tracker), once as the `train` flow on a Prefect
server with MLflow's SQLite store. Iteration wall times in the flow come from the MLflow metric
timestamps (so they include task-run bookkeeping and metric logging). Prints both and the
orchestration share of an iteration.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_orchestration.py [--iterations 6]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

OVERRIDES = [
    "data.world.pretrain_examples=0", "rollout.n=8", "rollout.max_new_tokens=48",
    "rl.prompts_per_step=16", "rl.mini_batch_size=16", "algorithm.sft_buffer_threshold=8",
    "algorithm.require_think=false", "eval.benchmarks=[]", "run.grader_workers=1",
]


def plain_loop(cfg, data) -> list[float]:
    from relift_core import iteration as it
    from relift_core.runtime import build_session

    session = build_session(cfg, data.train_examples(), resume=False)
    times = []
    try:
        for i in range(cfg.run.iterations):
            start = time.perf_counter()
            questions = it.draw_questions(session.state.stream, session.dataset, cfg.rl.prompts_per_step)
            rollouts = it.rollout(session.engine, session.tokenizer, questions, cfg,
                                  seed=cfg.run.seed * 100_003 + i)
            it.grade(rollouts, session.grader, require_think=cfg.algorithm.require_think)
            levels = it.classify(session.state.ledger, i, rollouts)
            it.rollout_metrics(rollouts, levels)
            it.collect_demonstrations(session.state.buffer, session.strategy, i,
                                      rollouts.questions, levels, session.demos)
            it.rl_update(session.trainer, rollouts, pad_id=session.tokenizer.pad_token_id,
                         norm_adv_by_std=cfg.algorithm.norm_adv_by_std)
            while k := session.strategy.sft_batch_size(i, len(session.state.buffer)):
                entries = session.state.buffer.take(k)
                it.sft_update(session.trainer, session.tokenizer, entries,
                              max_target_tokens=cfg.sft.max_target_tokens)
            session.state.iteration = i + 1
            session.save()
            times.append(time.perf_counter() - start)
    finally:
        session.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=6)
    args = parser.parse_args()

    from mlflow import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from flows.prepare_data import prepare_data
    from flows.train import train
    from relift_core.config import load_config

    workdir = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    overrides = OVERRIDES + [f"run.iterations={args.iterations}", f"run.workdir={workdir}"]
    with prefect_test_harness(server_startup_timeout=180):
        plain_cfg = load_config("toy", overrides + ["run.name=plain"])
        data = prepare_data(plain_cfg.model_dump(mode="json"))
        plain = plain_loop(plain_cfg, data)
        result = train(preset="toy", overrides=overrides + ["run.name=flow"])
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    stamps = [m.timestamp for m in sorted(client.get_metric_history(result["mlflow_run_id"], "accuracy"),
                                          key=lambda m: m.step)]
    flow_times = [(b - a) / 1000 for a, b in itertools.pairwise(stamps)]
    # The first iteration of each includes warm-up (JIT paths, grader worker start): drop it.
    p, f = statistics.mean(plain[1:]), statistics.mean(flow_times)
    print(f"iterations: {args.iterations} (first dropped)")
    print(f"plain relift_core loop : {p:.2f} s/iteration")
    print(f"Prefect + MLflow flow  : {f:.2f} s/iteration")
    print(f"orchestration overhead : {f - p:.2f} s/iteration = {100 * (f - p) / f:.1f}% of an iteration")


if __name__ == "__main__":
    main()
