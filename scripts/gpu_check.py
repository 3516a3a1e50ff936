"""A GPU check that needs no download: one RL and one SFT step and an HF rollout, measured.

    python scripts/gpu_check.py                          # CUDA: a Qwen2.5-Math-1.5B-shaped model
    python scripts/gpu_check.py --device cpu --shape tiny   # CPU, seconds (tests/test_gpu_check.py)

The model is built from `configs/models/qwen2.5-math-1.5b-16k-think/config.json` (the reference's
1.5B base: Qwen2.5-Math-1.5B's shapes with rope_theta 40k and a 16k context) with random weights;
the tokenizer is a stand-in with one token per id, so nothing comes from the hub. The run goes
through the platform's own pieces (HFRolloutEngine, TorchTrainer built by `trainer_options`, the
batch builders) at the GPU presets' learning rate 1e-6 with `model.dtype` bfloat16 compute, and
prints:

- the share of weights one RL step and one SFT step changed (at lr 1e-6 a bf16 weight rounds
  most updates away; fp32 master weights keep them),
- peak accelerator memory beside `relift plan`'s training-phase figure for the same shapes,
- training tokens/s and MFU (6 x parameters x tokens/s over the device's peak bf16 FLOP/s),
- HF rollout tokens/s (generated tokens).

The GPU shape takes a few minutes on one H100/H200-class GPU (most of it model set-up and the
rollout); the numbers are for one process on one device, not a cluster.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

# The GPU machine runs this from a copy of the tree, without installing the project.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from relift_core.config import ExperimentConfig
from relift_core.runtime.assembly import trainer_options
from relift_core.runtime.batches import pack_rows, rl_batch
from relift_core.runtime.memory_plan import GIB, plan_memory
from relift_core.runtime.rollout import HFRolloutEngine, SamplingRequest
from relift_core.runtime.trainer import TorchTrainer

MODEL_DIR = ROOT / "configs" / "models" / "qwen2.5-math-1.5b-16k-think"
# Dense bf16 peak FLOP/s by device name (vendor datasheets, no sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "L4": 121e12,
}
# Shapes: the model, then prompts x samples, prompt and response tokens, rows per forward.
SHAPES = {
    "1.5b": {
        "overrides": {},
        "prompts": 8,
        "n": 4,
        "prompt_len": 512,
        "response_len": 512,
        "micro": 4,
    },
    "tiny": {
        "overrides": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 512,
            "max_position_embeddings": 512,
            "bos_token_id": 1,
            "eos_token_id": 1,
        },
        "prompts": 2,
        "n": 2,
        "prompt_len": 16,
        "response_len": 16,
        "micro": 4,
    },
}


def stand_in_tokenizer(vocab_size: int, eos_id: int):
    """One token per id (`<t17>`), pad 0: enough for the engine to pad, stop and decode."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<t{i}>": i for i in range(vocab_size)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, "<t0>")),
        pad_token="<t0>",
        eos_token=f"<t{eos_id}>",
        unk_token="<t0>",
    )
    return tok


def build_model(shape: dict, device: torch.device, config_dir: Path):
    """Random weights of the shape's config, which is also written to `config_dir` (where
    `relift plan`'s architecture_of reads it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {**json.loads((MODEL_DIR / "config.json").read_text()), **shape["overrides"]}
    (config_dir / "config.json").write_text(json.dumps(values))
    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    with torch.device(device):  # random weights made where they live (no 6 GB CPU detour)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = 0
    return model, config


def experiment(
    shape: dict, dtype: str, device: torch.device, gpu_gib: float, config_dir: Path
) -> ExperimentConfig:
    """The config whose trainer settings and memory plan match this check's shapes."""
    rows = shape["prompts"] * shape["n"]
    cfg = ExperimentConfig.model_validate(
        {
            "model": {
                "source": "hf",
                "name_or_path": str(config_dir),
                "dtype": dtype,
                "gradient_checkpointing": device.type == "cuda",
            },
            "data": {"max_prompt_tokens": shape["prompt_len"]},
            "rollout": {
                "engine": "hf",
                "n": shape["n"],
                "max_new_tokens": shape["response_len"],
                "batch_size": rows,
            },
            "rl": {
                "lr": 1e-6,
                "prompts_per_step": shape["prompts"],
                "mini_batch_size": shape["prompts"],
                "micro_batch_size": shape["micro"],
                "grad_clip": 0.7,
            },
            "sft": {
                "lr": 1e-6,
                "mini_batch_size": shape["prompts"],
                "micro_batch_size": shape["micro"],
                "grad_clip": 1.0,
                "max_target_tokens": shape["response_len"],
            },
            "eval": {"max_new_tokens": shape["response_len"]},
            "cluster": {"gpu_memory_gib": gpu_gib},
        }
    )
    return cfg


def snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def share_changed(model: torch.nn.Module, before: list[torch.Tensor]) -> float:
    changed = total = 0
    for p, b in zip(model.parameters(), before, strict=True):
        changed += int((p.detach() != b).sum())
        total += p.numel()
    return changed / total


def timed_update(step, model, device) -> tuple[dict, float, float]:
    """(stats, seconds, share of weights changed) of one update."""
    before = snapshot(model)
    synchronize(device)
    t0 = time.perf_counter()
    stats = step()
    synchronize(device)
    return stats, time.perf_counter() - t0, share_changed(model, before)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def run(
    shape_name: str, device_name: str, dtype: str | None, peak_tflops: float | None
) -> dict[str, float | str | None]:
    device = torch.device(device_name)
    shape = SHAPES[shape_name]
    dtype = dtype or ("bfloat16" if device.type == "cuda" else "float32")
    gpu_gib = (
        torch.cuda.get_device_properties(device).total_memory / GIB
        if device.type == "cuda"
        else 80.0
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    config_dir = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    model, config = build_model(shape, device, config_dir)
    cfg = experiment(shape, dtype, device, gpu_gib, config_dir)
    trainer = TorchTrainer(model, **trainer_options(cfg, device))
    tokenizer = stand_in_tokenizer(config.vocab_size, config.eos_token_id)
    engine = HFRolloutEngine(
        trainer.model,
        tokenizer,
        batch_size=cfg.rollout.batch_size,
        stop_token_ids=[config.eos_token_id],
        bf16_autocast=cfg.model.bf16_autocast,
    )
    params = sum(p.numel() for p in trainer.model.parameters())
    setup_s = time.perf_counter() - start

    # Rollout: random prompts (never the pad id), n samples each, plain sampling.
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(
        2, config.vocab_size, (shape["prompts"], shape["prompt_len"]), generator=generator
    ).tolist()
    request = SamplingRequest(prompts, shape["n"], 1.0, 1.0, shape["response_len"], 0, None)
    synchronize(device)
    t0 = time.perf_counter()
    groups = engine._sample_ids(request)
    synchronize(device)
    rollout_s = time.perf_counter() - t0
    samples = [s for group in groups for s in group]
    generated = sum(s.length for s in samples)

    # One RL step on those samples (advantages of both signs, as GRPO's are).
    advantages = torch.tensor([1.0 if i % 2 else -1.0 for i in range(len(samples))])
    batch = rl_batch(samples, advantages, tokenizer.pad_token_id)
    rl_stats, rl_s, rl_share = timed_update(lambda: trainer.rl_step(batch), trainer.model, device)

    # One SFT step: the prompts with random demonstrations of the full target length.
    targets = torch.randint(
        2, config.vocab_size, (shape["prompts"], shape["response_len"]), generator=generator
    ).tolist()
    sft = pack_rows(prompts, targets, tokenizer.pad_token_id)
    sft_stats, sft_s, sft_share = timed_update(lambda: trainer.sft_step(sft), trainer.model, device)

    flops = peak_flops(device, peak_tflops)
    train_tokens = batch.num_tokens + sft.num_tokens
    train_tps = train_tokens / (rl_s + sft_s)
    plan = plan_memory(cfg, 1)
    measured = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": shape_name,
        "parameters": params,
        "dtype": dtype,
        "weights_dtype": str(next(trainer.model.parameters()).dtype).removeprefix("torch."),
        "setup_s": setup_s,
        "rl_share_of_weights_changed": rl_share,
        "sft_share_of_weights_changed": sft_share,
        "rl_loss": rl_stats.get("policy_loss"),
        "sft_loss": sft_stats.get("sft_loss"),
        "rl_step_s": rl_s,
        "sft_step_s": sft_s,
        "rl_tokens": batch.num_tokens,
        "sft_tokens": sft.num_tokens,
        "train_tokens_per_s": train_tps,
        "mfu": 6 * params * train_tps / flops if flops else None,
        "rollout_generated_tokens": generated,
        "rollout_s": rollout_s,
        "rollout_tokens_per_s": generated / rollout_s,
        "peak_memory_gib": measured / GIB if measured is not None else None,
        "plan_training_phase_gib": plan.training_phase / GIB,
        "plan_peak_gib": plan.peak / GIB,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default=None,
        help="1.5b (default on CUDA) or tiny (default on CPU)",
    )
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default=None,
        help="model.dtype, the compute dtype (default bfloat16 on CUDA)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak bf16 TFLOP/s for MFU (default: known GPUs)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    shape = args.shape or ("1.5b" if args.device.startswith("cuda") else "tiny")
    result = run(shape, args.device, args.dtype, args.peak_tflops)
    for key, value in result.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:32s} {shown}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
