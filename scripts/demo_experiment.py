"""Fast tuning loop for the `relift demo` comparison: the same core, no Prefect, no MLflow.

It builds the toy preset's world and base model (cached under <workdir>/base_models, keyed as the
demo keys them), measures the base model's levels, then trains each method with
`relift_core.iteration.run_iteration` -- the loop the `train` flow runs -- one process per
(method, seed), `--jobs` at a time. What the demo flow shares with it is one core
(relift_core.proofworld.report): each method's overrides (the base model as a run of 0
iterations), the held-out measure (the train flow's final evaluation: eval settings, run seed)
and the report it prints, with bootstrap confidence intervals.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/demo_experiment.py --workdir /tmp/tune/a \\
        --seeds 0,1 rl.lr=1e-4 sft.lr=3e-4

Each trial writes into its own fresh directory under --workdir (runs never resume).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def train_one(
    preset: str,
    overrides: list[str],
    algo: str,
    seed: int,
    workdir: str,
    base_dir: str,
    world_dir: str,
) -> dict:
    import torch

    torch.set_num_threads(1)
    from relift_core.config import load_config
    from relift_core.data.benchmarks import load_benchmark
    from relift_core.data.examples import load_examples
    from relift_core.grading.evaluation import eval_settings, evaluate_benchmark
    from relift_core.iteration import run_iteration
    from relift_core.proofworld.report import method_overrides
    from relift_core.runtime.session import build_session

    name = f"{algo}-s{seed}-{time.time_ns() % 10**9}"
    cfg = load_config(
        preset,
        [
            *overrides,
            *method_overrides(algo),
            f"run.workdir={workdir}",
            f"model.init_from={base_dir}",
            f"run.seed={seed}",
            f"run.name={name}",
            "run.checkpoint_every=1000000",
            "run.grader_workers=1",
        ],
    )
    train = load_examples(Path(world_dir) / "train.parquet")
    held = load_benchmark(Path(world_dir) / "eval.parquet")
    start = time.perf_counter()
    session = build_session(cfg, train, resume=False)
    trace = []
    try:
        for i in range(cfg.run.iterations):
            m = run_iteration(session, i)
            trace.append(round(m["rollout_accuracy"], 3))
        # As the train flow's final evaluation measures it (tasks/eval_tasks.py).
        records, _ = evaluate_benchmark(
            session.engine,
            session.tokenizer,
            held,
            session.grader,
            **eval_settings(cfg.eval),
            seed=cfg.run.seed,
            require_think=cfg.algorithm.require_think,
        )
    finally:
        session.close()
    acc = {r.uid: r.accuracy for r in records}
    return {
        "algo": algo,
        "seed": seed,
        "accuracy": acc,
        "demos_used": session.state.demos_used,
        "train_trace": trace,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--algorithms", default="base,rl,sft,relift")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--preset", default="toy")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from relift_core.algorithm.difficulty import LEVELS
    from relift_core.config import load_config
    from relift_core.data.examples import load_examples
    from relift_core.grading.grader import BatchGrader
    from relift_core.grading.levels import AnswerSampler, measure_levels
    from relift_core.proofworld.pretrain import base_model_key, pretrain_base_model
    from relift_core.proofworld.problems import write_world
    from relift_core.proofworld.report import render_markdown
    from relift_core.proofworld.statistics import summarize
    from relift_core.runtime.assembly import build_engine
    from relift_core.runtime.models import load_policy

    t0 = time.perf_counter()
    wd = Path(args.workdir)
    cfg = load_config(args.preset, [*args.overrides, f"run.workdir={wd}"])
    base_dir = wd.parent / "base_models" / base_model_key(cfg)
    if not (base_dir / "config.json").exists():
        stats = pretrain_base_model(cfg.data.world, cfg.model.tiny, base_dir)
        print(
            f"pretrain {stats['seconds']:.0f}s final_loss {stats['final_loss']:.3f} "
            f"params {stats['params']}",
            flush=True,
        )
    world_dir = wd / "world"
    write_world(cfg.data.world, world_dir)
    train = load_examples(world_dir / "train.parquet")
    held = load_examples(world_dir / "eval.parquet")
    cell = {q.uid: q.data_source.split("/", 1)[1] for q in train + held}
    model, tok = load_policy(
        cfg.model.model_copy(update={"init_from": str(base_dir)}), device="cpu"
    )
    engine = build_engine(cfg, model, tok, "cpu")
    with BatchGrader(workers=2) as grader:
        sampler = AnswerSampler(engine, tok, grader)
        train_lv = {u: lv.value for u, lv in measure_levels(sampler, train, cfg, seed=0).items()}
        held_lv = {u: lv.value for u, lv in measure_levels(sampler, held, cfg, seed=0).items()}
    print(
        f"train levels: {dict(Counter(train_lv.values()))}  held: {dict(Counter(held_lv.values()))}"
    )
    for c in sorted(set(cell.values())):
        print(f"  {c}: {dict(Counter(lv for u, lv in train_lv.items() if cell[u] == c))}")
    print(f"setup {time.perf_counter() - t0:.0f}s", flush=True)

    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(a, s) for s in seeds for a in args.algorithms.split(",")]
    results = []
    # spawn: a forked child would inherit the parent's grader fork-server connection.
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(
                train_one,
                args.preset,
                args.overrides,
                a,
                s,
                str(wd / "runs"),
                str(base_dir),
                str(world_dir),
            )
            for a, s in jobs
        ]
        for f in futures:
            r = f.result()
            results.append(r)
            mean = sum(r["accuracy"].values()) / len(r["accuracy"])
            print(
                f"{r['algo']} s{r['seed']}: held-out {mean:.3f} demos {r['demos_used']} "
                f"({r['seconds']:.0f}s) train acc: {r['train_trace'][::4]}",
                flush=True,
            )
    summary = summarize(results, held_lv, {u: c.split("/")[0] for u, c in cell.items()})
    counts = Counter(train_lv.values())
    summary["train_levels"] = {lv: counts.get(lv, 0) for lv in LEVELS}
    print(render_markdown(summary))
    (wd / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
