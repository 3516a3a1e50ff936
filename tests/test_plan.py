"""`relift plan`: parameter counts checked against real transformers models (built on the meta
device, no download), the memory lines against their formulas, and `train` refusing a config
that cannot fit before anything starts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from relift_core.config import ConfigError, load_config
from relift_core.runtime.memory_plan import (
    GIB,
    KNOWN_ARCHITECTURES,
    architecture_of,
    check_fits,
    minimum_gpus,
    plan_memory,
)


def _real_count(name: str) -> int:
    a = KNOWN_ARCHITECTURES[name]
    common = {
        "hidden_size": a.hidden,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "intermediate_size": a.intermediate,
        "vocab_size": a.vocab,
        "tie_word_embeddings": a.tied_embeddings,
    }
    with torch.device("meta"):
        model = (
            Qwen2ForCausalLM(Qwen2Config(**common))
            if a.qkv_bias
            else LlamaForCausalLM(LlamaConfig(**common))
        )
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(KNOWN_ARCHITECTURES))
def test_parameter_count_matches_the_transformers_model(name):
    assert KNOWN_ARCHITECTURES[name].parameters() == _real_count(name)


def test_tiny_parameter_count_matches_the_built_model():
    from relift_core.runtime.models import load_policy

    cfg = load_config("toy", ["model.init_from=null"])
    model, _ = load_policy(cfg.model, device="cpu", seed=0)
    assert architecture_of(cfg).parameters() == sum(p.numel() for p in model.parameters())


def test_7b_plan_line_by_line():
    cfg = load_config("qwen2.5-math-7b")
    assert cfg.cluster.world_size == 8  # planned for the paper's 8 GPUs
    assert cfg.cluster.trainer_strategy == "fsdp2"
    p = plan_memory(cfg)
    n = 7_615_616_512
    assert p.parameters == n
    assert p.weights == p.gradients == n * 4 / 8  # float32 masters and gradients, sharded
    assert p.optimizer == n * 16 / 8  # RL and SFT AdamW, 2 fp32 moments each, sharded by 8
    layer = KNOWN_ARCHITECTURES["Qwen/Qwen2.5-Math-7B"].layer_parameters()
    assert p.compute == (2 * layer + (n - 28 * layer)) * 2  # two bf16 layers + the root unit
    # The largest micro-batch: SFT's 4 rows of 1024 + 8192 tokens (RL's token budget is 32,768).
    tokens = 4 * (1024 + 8192)
    # Layer inputs (bf16) + one layer's working set (34 sbh bytes) + 26 bytes per bf16 logit
    # of one 2,048-token chunk (model.logit_chunk_tokens).
    assert p.activations == 28 * tokens * 3584 * 2 + 34 * tokens * 3584 + 2048 * 152064 * 26
    assert p.rollout == 0.5 * 80 * GIB and p.resident_rollout == 0
    assert p.fits and minimum_gpus(cfg) == 4
    assert not plan_memory(cfg, 2).fits  # sharded states alone pass 80 GiB on 2
    assert minimum_gpus(load_config("qwen2.5-math-1.5b")) == 1


def test_zero3_counts_its_partitions_masters_and_buckets():
    cfg = load_config("qwen2.5-math-7b", ["cluster.trainer_strategy=deepspeed_zero3"])
    p = plan_memory(cfg)
    n = p.parameters
    assert p.weights == n * 2 / 8  # bf16 partitions
    assert p.gradients == n * 4 / 8  # the fp32 gradient partition
    assert p.optimizer == n * (4 + 16) / 8  # fp32 masters + both AdamWs' moments
    assert p.compute == 1e9 * 2 + 5e8 * 4  # live parameters + the fp32 reduce bucket
    assert p.initialization == n * 2 + n * 4 / 8  # the whole bf16 module before partitioning


def test_one_process_holds_everything_and_an_autocast_copy():
    cfg = load_config("qwen2.5-math-1.5b", ["cluster.backend=local"])
    p = plan_memory(cfg)
    assert p.gpus == 1 and p.weights == p.parameters * 4 and p.compute == p.parameters * 2


def test_check_fits_refuses_with_the_figures():
    with pytest.raises(ConfigError, match=r"needs \d+\.\d GiB per GPU with 2 trainer.*fits on 4"):
        check_fits(load_config("qwen2.5-math-7b", ["cluster.gpus_per_node=2"]))
    check_fits(load_config("qwen2.5-math-7b"))
    check_fits(load_config("toy"))  # CPU runs are not planned


def test_cli_plan_and_train_refusal():
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "plan", "-p", "qwen2.5-math-7b"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "7,615,616,512 parameters" in out.stdout and "fewest GPUs it fits on: 4" in out.stdout
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "train",
            "-p",
            "qwen2.5-math-7b",
            "cluster.gpus_per_node=2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode == 2
    assert "fits on 4 GPUs" in refused.stdout + refused.stderr
    assert "Prefect" not in refused.stdout + refused.stderr  # refused before any server starts
