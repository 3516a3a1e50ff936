"""Training (and rollout) throughput of the policy runtime on this machine.

    .venv/bin/python scripts/bench_runtime.py                 # tiny model, + SmolLM2 if present
    .venv/bin/python scripts/bench_runtime.py --threads 1 --no-smollm2 --repeats 5
    .venv/bin/python scripts/bench_runtime.py --parts --threads 2   # two parts, on SmolLM2

Reports, per model: rl_step and sft_step (one optimizer step on a synthetic batch of
`--rows` rows of `--prompt-len` prompt + `--response-len` target tokens; an rl_step includes
its old-log-prob scoring pass) and HF rollout generation. With `--parts`, two parts the trainer and
the rollout chose between, on SmolLM2-135M's weights (the tiny model's without it): one AdamW
step, torch's default per-tensor loop against the fused kernel the trainer uses, and one token
draw for `--rows` x n rows over the vocabulary, `torch.multinomial` against `draw_index`.
tokens/s counts every real token a step processes (prompt + target); target tok/s counts only
the trained tokens. The median of `--repeats` timed runs after one warm-up.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from relift_core.config import AlgorithmConfig, ModelConfig, RLConfig, SFTConfig, TinyModelConfig
from relift_core.runtime.batches import TokenBatch, pack_rows
from relift_core.runtime.char_tokenizer import build_char_tokenizer
from relift_core.runtime.models import build_tiny_model
from relift_core.runtime.trainer import TorchTrainer


@dataclass
class Row:
    model: str
    phase: str
    rows: int
    tokens: int  # real tokens processed per call
    targets: int  # trained (or generated) tokens per call
    seconds: float  # median seconds per call

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def targets_per_s(self) -> float:
        return self.targets / self.seconds


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, lazy imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synthetic_batch(vocab: int, rows: int, prompt_len: int, response_len: int) -> TokenBatch:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (rows, prompt_len + response_len), generator=generator)
    prompts = [r[:prompt_len].tolist() for r in ids]
    responses = [r[prompt_len:].tolist() for r in ids]
    advantages = torch.linspace(-1, 1, rows)
    return pack_rows(prompts, responses, pad_id=0, advantages=advantages)


def bench_model(name: str, model, tokenizer, args: argparse.Namespace) -> list[Row]:
    rows, micro = args.rows, args.micro_batch_size
    trainer = TorchTrainer(
        model,
        algo=AlgorithmConfig(),
        rl=RLConfig(lr=1e-6, micro_batch_size=micro),
        sft=SFTConfig(lr=1e-6, micro_batch_size=micro, mini_batch_size=rows),
        max_response_len=args.response_len,
    )
    batch = synthetic_batch(len(tokenizer), rows, args.prompt_len, args.response_len)
    results = []
    for phase, step in (
        ("rl_step", lambda: trainer.rl_step(batch, rows_per_minibatch=rows)),
        ("sft_step", lambda: trainer.sft_step(batch)),
    ):
        seconds = median_seconds(step, args.repeats)
        results.append(Row(name, phase, rows, batch.num_tokens, batch.num_target_tokens, seconds))
    if args.rollout:
        results.append(bench_rollout(name, model, tokenizer, args))
    return results


def bench_rollout(name: str, model, tokenizer, args: argparse.Namespace) -> Row:
    """Hook for the rollout engine: HF generate via relift_core.runtime.rollout.HFRolloutEngine."""
    from relift_core.runtime.rollout import HFRolloutEngine

    engine = HFRolloutEngine(model, tokenizer, batch_size=args.rows)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 30? Think step by step."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompts = [prompt] * max(1, args.rows // args.n)
    generated: list[int] = []

    def generate() -> None:
        groups = engine.generate(
            prompts, n=args.n, temperature=1.0, max_new_tokens=args.response_len, seed=0
        )
        generated.append(sum(s.length for group in groups for s in group))

    seconds = median_seconds(generate, args.repeats)
    prompt_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    new_tokens = int(statistics.median(generated[1:] or generated))
    n_rows = len(prompts) * args.n
    return Row(name, "rollout", n_rows, n_rows * prompt_tokens + new_tokens, new_tokens, seconds)


def bench_parts(name: str, model, args: argparse.Namespace) -> None:
    """Seconds of one AdamW step (per-tensor loop, fused) and of one token draw (multinomial,
    draw_index), each the median of `--repeats` after a warm-up."""
    from relift_core.runtime.rollout import draw_index

    params = [p for p in model.float().parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    numel = sum(p.numel() for p in params)
    for label, fused in (("per-tensor loop", None), ("fused", True)):
        optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.01, fused=fused)
        seconds = median_seconds(optimizer.step, args.repeats)
        print(f"{name:<14}AdamW step, {label:<16}{seconds:>9.3f} s  ({numel:,} weights)")
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = args.rows * args.n
    probs = torch.softmax(torch.randn(rows, vocab) * 3, dim=-1)
    for label, draw in (
        ("torch.multinomial", lambda: torch.multinomial(probs, 1)),
        ("draw_index", lambda: draw_index(probs)),
    ):
        seconds = median_seconds(draw, max(args.repeats, 20))
        print(
            f"{name:<14}token draw, {label:<17}{seconds * 1e3:>8.3f} ms ({rows} rows x {vocab:,})"
        )


def load_smollm2():
    """SmolLM2-135M-Instruct through models.load_policy, or None (with the reason) if absent."""
    try:
        from relift_core.runtime.models import load_policy

        return load_policy(ModelConfig(source="gguf"))
    except (ImportError, FileNotFoundError) as e:
        print(f"(SmolLM2 skipped: {e})")
        return None


def print_table(results: list[Row]) -> None:
    header = (
        f"{'model':<14}{'phase':<10}{'rows':>5}{'tokens':>8}{'targets':>8}"
        f"{'s/call':>9}{'tokens/s':>11}{'target tok/s':>14}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.model:<14}{r.phase:<10}{r.rows:>5}{r.tokens:>8}{r.targets:>8}"
            f"{r.seconds:>9.3f}{r.tokens_per_s:>11.0f}{r.targets_per_s:>14.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8, help="sequences per step")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--response-len", type=int, default=96)
    parser.add_argument("--n", type=int, default=4, help="rollout samples per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--no-smollm2", dest="smollm2", action="store_false")
    parser.add_argument("--no-rollout", dest="rollout", action="store_false")
    parser.add_argument("--parts", action="store_true", help="AdamW step and token draw only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}; rows={args.rows} "
        f"prompt={args.prompt_len} response={args.response_len} micro={args.micro_batch_size}"
    )
    tokenizer = build_char_tokenizer()
    if args.parts:
        loaded = load_smollm2() if args.smollm2 else None
        if loaded is not None:
            bench_parts("smollm2-135m", loaded[0], args)
        else:
            bench_parts("tiny", build_tiny_model(TinyModelConfig(), tokenizer), args)
        return
    results = bench_model("tiny", build_tiny_model(TinyModelConfig(), tokenizer), tokenizer, args)
    if args.smollm2:
        loaded = load_smollm2()
        if loaded is not None:
            results += bench_model("smollm2-135m", *loaded, args)
    print_table(results)


if __name__ == "__main__":
    main()
