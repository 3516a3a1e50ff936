"""Fast tuning loop for the `relift demo` comparison, in-process (no Prefect, no MLflow).

It runs the same core as the demo flow -- the toy preset's world and base model, the same
`relift_core.iteration` phases over `build_session`, the same strategies -- and prints held-out
accuracy per method, per family, per size and per starting level, and the base model's levels.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/demo_experiment.py run.iterations=20 sft.lr=1e-3
    ... --algorithms rl,relift --workdir /tmp/tune/x

Base models are cached under <workdir>/../base_models/<key> (the demo's key), so trials that only
change training settings share one pretraining. Runs never resume: each trial uses a fresh
workdir (checkpoints are not written).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from flows.demo import base_model_key
from relift_core import iteration as it
from relift_core.config import load_config
from relift_core.data import load_examples
from relift_core.difficulty import LEVELS, DifficultyLedger
from relift_core.grader import BatchGrader
from relift_core.models import load_policy
from relift_core.pretrain import pretrain_base_model
from relift_core.runtime import build_engine, build_session, seed_everything
from relift_core.world import write_world


def levels_of(cfg, model_dir, questions, grader):
    seed_everything(cfg.run.seed)
    model, tok = load_policy(cfg.model.model_copy(update={"init_from": model_dir}), device="cpu",
                             seed=cfg.run.seed)
    engine = build_engine(cfg, model, tok, "cpu")
    ro = it.rollout(engine, tok, questions, cfg, seed=cfg.run.seed)
    it.grade(ro, grader, require_think=cfg.algorithm.require_think)
    return {q.uid: lv.value for q, lv in zip(questions, it.classify(DifficultyLedger(), 0, ro))}


def evaluate(session, questions, grader):
    cfg = session.cfg
    ro = it.rollout(session.engine, session.tokenizer, questions,
                    cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={
                        "n": cfg.eval.samples or 1, "temperature": cfg.eval.temperature,
                        "max_new_tokens": cfg.eval.max_new_tokens})}), seed=cfg.run.seed)
    it.grade(ro, grader, require_think=cfg.algorithm.require_think)
    acc = {q.uid: sum(g.correct for g in gs) / len(gs) for q, gs in zip(questions, ro.grades)}
    lens = [x.length for s in ro.samples for x in s]
    return acc, sum(lens) / len(lens)


def table(rows, keys, cols):
    out = ["| " + " | ".join(["key"] + cols) + " |"]
    for k in keys:
        out.append("| " + " | ".join([str(k)] + [rows[c].get(k, "-") for c in cols]) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--algorithms", default="rl,sft,relift")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--preset", default="toy")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    wd = Path(args.workdir)
    cfg = load_config(args.preset, args.overrides + [f"run.workdir={wd}"])
    base_dir = wd.parent / "base_models" / base_model_key(cfg)
    if not (base_dir / "config.json").exists():
        w = cfg.data.world
        stats = pretrain_base_model(w, cfg.model.tiny, base_dir, steps=w.pretrain_steps,
                                    lr=w.pretrain_lr, batch_size=w.pretrain_batch_size,
                                    seed=cfg.run.seed)
        print(f"pretrain {stats['seconds']:.0f}s final_loss {stats['final_loss']:.3f}", flush=True)
    cfg = load_config(args.preset, args.overrides + [f"run.workdir={wd}",
                                                     f"model.init_from={base_dir}"])
    paths = write_world(cfg.data.world, wd / "world")
    train = load_examples(paths["train"])
    held = load_examples(paths["eval"])
    fam = {q.uid: q.data_source.split("/", 1)[1] for q in train + held}
    grader = BatchGrader(workers=cfg.run.grader_workers, timeout_s=cfg.run.grader_timeout_s)
    t1 = time.perf_counter()
    train_lv = levels_of(cfg, str(base_dir), train, grader)
    held_lv = levels_of(cfg, str(base_dir), held, grader)
    print(f"levels measured in {time.perf_counter() - t1:.0f}s; train {len(train)} held {len(held)}")
    print("train levels:", dict(Counter(train_lv.values())))
    by_cell = defaultdict(Counter)
    for u, lv in train_lv.items():
        by_cell[fam[u]][lv] += 1
    for c in sorted(by_cell):
        print(f"  {c}: {dict(by_cell[c])}")
    print("held levels:", dict(Counter(held_lv.values())), flush=True)
    grader.close()

    results = {}
    for algo in ["base"] + args.algorithms.split(","):
        ts = time.perf_counter()
        acfg = cfg.model_copy(update={
            "algorithm": cfg.algorithm.model_copy(update={"name": algo if algo != "base" else "rl"}),
            "run": cfg.run.model_copy(update={"name": f"x-{algo}"})})
        session = build_session(acfg, train, resume=False)
        trace = []
        if algo != "base":
            for i in range(acfg.run.iterations):
                st, strat = session.state, session.strategy
                qs = it.draw_questions(st.stream, session.dataset, acfg.rl.prompts_per_step)
                ro = it.rollout(session.engine, session.tokenizer, qs, acfg, seed=acfg.run.seed * 100_003 + i)
                it.grade(ro, session.grader, require_think=acfg.algorithm.require_think)
                lv = it.classify(st.ledger, i, ro)
                it.collect_demonstrations(st.buffer, strat, i, qs, lv, session.demos)
                if strat.runs_rl(i):
                    it.rl_update(session.trainer, ro, pad_id=session.tokenizer.pad_token_id,
                                 norm_adv_by_std=acfg.algorithm.norm_adv_by_std)
                while k := strat.sft_batch_size(i, len(st.buffer)):
                    entries = st.buffer.peek(k)
                    it.sft_update(session.trainer, session.tokenizer, entries,
                                  max_target_tokens=acfg.sft.max_target_tokens)
                    st.buffer.take(k)
                    st.demos_used += k
                m = it.rollout_metrics(ro, lv)
                trace.append(f"{m['accuracy']:.2f}/{m['frac_hardest']:.2f}")
        acc, rlen = evaluate(session, held, session.grader)
        session.close()
        rows = {"family": defaultdict(list), "level": defaultdict(list), "size": defaultdict(list)}
        for u, a in acc.items():
            f, s = fam[u].split("/")
            rows["family"][f].append(a)
            rows["size"][s].append(a)
            rows["level"][held_lv[u]].append(a)
            rows["family"][fam[u]].append(a)
        results[algo] = {
            "all": f"{sum(acc.values()) / len(acc):.3f}", "demos": str(session.state.demos_used),
            "len": f"{rlen:.1f}",
            **{k: f"{sum(v) / len(v):.2f}" for d in rows.values() for k, v in d.items()}}
        print(f"{algo}: held-out {results[algo]['all']} demos {session.state.demos_used} "
              f"({time.perf_counter() - ts:.0f}s) train acc/hardest per iter: {' '.join(trace)}",
              flush=True)
    cols = list(results)
    keys = (["all", "demos", "len", "add", "sub", "mul", "chain", "1", "2", "3"]
            + [lv.value for lv in LEVELS]
            + sorted(k for k in results["base"] if "/" in k))
    print(table(results, keys, cols))
    print(f"held-out levels: {dict(Counter(held_lv.values()))}")
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
