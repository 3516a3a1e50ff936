"""One RL update over responses of mixed lengths with a large vocabulary, before and after
token-budget batches (padded row-count micro-batches with whole-vocabulary logits, against
packed token-budget micro-batches with the head in chunks).

    .venv/bin/python scripts/bench_token_budget.py
    .venv/bin/python scripts/bench_token_budget.py --vocab 152064 --rows 32 \
        --min-len 20 --max-len 400

Each configuration runs in its own process, so its peak memory is that process's resident-set
high-water mark (getrusage's ru_maxrss) minus its resident set just before the update; beside it
the memory plan's activation figure for that micro-batch shape (memory_plan.activation_bytes:
the largest micro-batch's tokens through the layers plus the logits alive at once). Seconds are
the median of `--repeats` updates after one warm-up, on one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "before: padded, 8 rows per micro-batch, whole logits": {
        "micro": 8,
        "budget": None,
        "packed": False,
        "chunk": None,
    },
    "packed, token budget, whole logits": {
        "micro": 8,
        "budget": None,
        "packed": True,
        "chunk": None,
        "budget_from_rows": 8,
    },
    "after: packed, token budget, logits in chunks of 512": {
        "micro": 8,
        "budget": None,
        "packed": True,
        "chunk": 512,
        "budget_from_rows": 8,
    },
}


def _batch(args):
    import torch

    from relift_core.runtime.batches import rl_batch
    from relift_core.runtime.rollout import Sample

    gen = torch.Generator().manual_seed(0)
    samples, advantages = [], []
    for i in range(args.rows):
        prompt = torch.randint(10, args.vocab, (args.prompt_len,), generator=gen).tolist()
        length = int(torch.randint(args.min_len, args.max_len + 1, (1,), generator=gen))
        response = torch.randint(10, args.vocab, (length,), generator=gen).tolist()
        samples.append(Sample(i // 8, prompt, response, "x", length, "length"))
        advantages.append(1.0 if i % 2 else -1.0)
    return rl_batch(samples, torch.tensor(advantages), 0)


def _child(args, name: str) -> dict:
    import psutil
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from relift_core.config import AlgorithmConfig, RLConfig, SFTConfig
    from relift_core.runtime.memory_plan import Architecture, activation_bytes
    from relift_core.runtime.trainer import TorchTrainer

    torch.set_num_threads(1)
    spec = CONFIGS[name]
    batch = _batch(args)
    lengths = batch.attention_mask.sum(1)
    budget = spec.get("budget")
    if spec.get("budget_from_rows"):
        # The same work per forward on average: the padded version's rows x the mean length.
        budget = int(spec["budget_from_rows"] * float(lengths.float().mean()))
    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * args.hidden,
        tie_word_embeddings=True,
        max_position_embeddings=args.prompt_len + args.max_len + 8,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    trainer = TorchTrainer(
        model,
        algo=AlgorithmConfig(entropy_coef=0.001, loss_agg="token_mean"),
        rl=RLConfig(
            lr=1e-6,
            micro_batch_size=spec["micro"],
            max_tokens_per_micro_batch=budget,
            mini_batch_size=args.rows,
            prompts_per_step=args.rows,
        ),
        sft=SFTConfig(),
        max_response_len=args.max_len,
        remove_padding=spec["packed"],
        logit_chunk_tokens=spec["chunk"],
    )
    micros = trainer._micro_rows(batch, spec["micro"], budget)
    # The plan's figure for the largest micro-batch this update runs.
    widths = [
        (
            int(lengths[r].sum()) if spec["packed"] else len(r) * int(lengths[r].max()),
            int(batch.loss_mask[r].sum()),
        )
        for r in micros
    ]
    tokens, targets = max(widths)
    logit_tokens = min(targets, spec["chunk"]) if spec["chunk"] else targets
    arch = Architecture(
        hidden=args.hidden,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate=2 * args.hidden,
        vocab=args.vocab,
        tied_embeddings=True,
    )
    planned = activation_bytes(arch, tokens, logit_tokens, "float32", False)

    trainer.rl_step(batch, rows_per_minibatch=len(batch))  # warm-up
    rss_before = psutil.Process().memory_info().rss
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        trainer.rl_step(batch, rows_per_minibatch=len(batch))
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "name": name,
        "seconds": statistics.median(times),
        "peak_extra": peak - rss_before,
        "planned": planned,
        "micro_batches": len(micros),
        "budget": budget,
        "real_tokens": int(lengths.sum()),
        "targets": int(batch.loss_mask.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=152064)  # Qwen2.5's
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=20)
    parser.add_argument("--max-len", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args, args.child)))
        return
    forwarded = [a for a in sys.argv[1:]]
    results = []
    for name in CONFIGS:
        out = subprocess.run(
            [sys.executable, __file__, *forwarded, "--child", name],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first = results[0]
    load = os.getloadavg()[0]
    print(
        f"machine: {os.cpu_count()} cores, load average {load:.1f} (seconds are comparable "
        "only on a quiet machine; peak memory does not depend on the load)"
    )
    print(
        f"RL update: {args.rows} responses of {args.min_len}-{args.max_len} tokens "
        f"(+{args.prompt_len}-token prompts; {first['real_tokens']:,} real tokens, "
        f"{first['targets']:,} targets), vocabulary {args.vocab:,}, hidden {args.hidden}, "
        "float32, one thread"
    )
    print(f"{'':54} {'s/update':>9} {'peak MiB':>9} {'plan MiB':>9} {'micro':>6}")
    for r in results:
        print(
            f"{r['name']:54} {r['seconds']:9.2f} {r['peak_extra'] / 2**20:9.0f} "
            f"{r['planned'] / 2**20:9.0f} {r['micro_batches']:6d}"
        )
    before, after = results[0], results[-1]
    print(
        f"speed-up {before['seconds'] / after['seconds']:.2f}x, peak memory "
        f"{before['peak_extra'] / max(after['peak_extra'], 1):.1f}x lower "
        f"(token budget {after['budget']:,})"
    )


if __name__ == "__main__":
    main()
