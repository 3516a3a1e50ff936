"""The GPU presets follow the ReLIFT reference (docs/recipe.md), and its prompt format works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from relift_core.config import ConfigError, ModelConfig, load_config
from relift_core.runtime.batches import sft_batch
from relift_core.runtime.char_tokenizer import build_char_tokenizer
from relift_core.runtime.models import apply_prompt_format
from relift_core.runtime.vllm_engine import engine_context

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_SYSTEM_PROMPT_START = "Your task is to follow a systematic, thorough reasoning process"


@pytest.mark.parametrize("size", ["7B", "1.5B"])
def test_gpu_presets_start_where_the_reference_starts(size):
    cfg = load_config(f"qwen2.5-math-{size.lower()}")
    assert cfg.model.name_or_path == f"RoadQAQ/Qwen2.5-Math-{size}-16k-think"
    assert cfg.model.chat_template == "chatml" and cfg.model.prefill == "<think>\n"
    assert cfg.model.system_prompt.startswith(REFERENCE_SYSTEM_PROMPT_START)
    assert engine_context(cfg) == cfg.rollout.max_model_len == 1024 + 8192
    # train.sh: grad_clip=0.7 for RL, sft_grad_clip 1.0 (relift_trainer.yaml), AdamW weight
    # decay 0.01 (fsdp_worker.py), total_epochs=3.
    assert cfg.rl.grad_clip == 0.7 and cfg.sft.grad_clip == 1.0 and cfg.rl.weight_decay == 0.01
    assert cfg.run.iterations == 1071


def test_rl_baseline_preset_is_train_rl_sh():
    relift, rl = load_config("qwen2.5-math-7b"), load_config("qwen2.5-math-7b-rl")
    assert rl.algorithm.name == "rl" and rl.algorithm.clip_ratio == 0.2 and rl.rl.grad_clip == 1.0
    same = {
        k: v
        for k, v in rl.flat_params().items()
        if k not in ("algorithm.name", "algorithm.clip_ratio", "rl.grad_clip", "run.name")
    }
    assert same == {k: v for k, v in relift.flat_params().items() if k in same}


def test_relift_config_shows_checkpoint_template_prefill_and_context():
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "config", "-p", "qwen2.5-math-7b"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    shown = yaml.safe_load(out)  # the printed config is YAML as it stands, unwrapped
    assert shown["model"]["name_or_path"] == "RoadQAQ/Qwen2.5-Math-7B-16k-think"
    assert shown["model"]["chat_template"] == "chatml" and shown["model"]["prefill"] == "<think>\n"
    assert shown["model"]["system_prompt"].startswith(REFERENCE_SYSTEM_PROMPT_START)
    assert shown["rollout"]["max_model_len"] >= 9216


def test_a_context_too_short_for_prompt_and_response_is_refused():
    with pytest.raises(ConfigError, match=r"rollout.max_model_len=4096 .* \(9216 tokens\)"):
        load_config("qwen2.5-math-7b", ["rollout.max_model_len=4096"])


def test_prompt_format_renders_system_prompt_and_prefill_once():
    tok = build_char_tokenizer()
    cfg = ModelConfig(chat_template="chatml", system_prompt="Think first.", prefill="<think>\n")
    apply_prompt_format(tok, cfg)
    apply_prompt_format(tok, cfg)  # a reloaded checkpoint's tokenizer already carries it

    def render(msgs):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    assert render([{"role": "user", "content": "1+1"}]) == (
        "<|im_start|>system\nThink first.<|im_end|>\n<|im_start|>user\n1+1<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    # The data's own system message wins, as in the reference's training prompts.
    assert render([{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )


def test_sft_targets_mask_the_prompt_and_do_not_repeat_the_prefill():
    tok = build_char_tokenizer()
    apply_prompt_format(tok, ModelConfig(chat_template="chatml", prefill="<think>\n"))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "1+1"}], tokenize=False, add_generation_prompt=True
    )
    demo = "<think>\n1+1=2</think>2"
    batch = sft_batch(tok, [prompt], [demo], 64, prefill="<think>\n")
    ids = batch.input_ids[0].tolist()
    targets = [ids[j + 1] for j, on in enumerate(batch.loss_mask[0].tolist()) if on]
    assert tok.decode(targets) == "1+1=2</think>2" + tok.eos_token  # the prefill is prompt only
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    assert batch.loss_mask[0, : len(prompt_ids) - 1].sum() == 0


def _tiny_policy(seed: int):
    from relift_core.config import TinyModelConfig
    from relift_core.runtime.models import build_tiny_model

    tok = build_char_tokenizer()
    return build_tiny_model(TinyModelConfig(), tok, seed=seed), tok


def test_the_best_evaluation_keeps_its_policy(tmp_path):
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM

    from relift_core.config import ExperimentConfig
    from relift_core.runtime.best_policy import best_so_far
    from relift_core.tracker import InMemoryTracker
    from tasks.eval_tasks import keep_best_policy

    class TaggingTracker(InMemoryTracker):
        def __init__(self):
            super().__init__()
            self.tags = {}

        def set_tags(self, tags):
            self.tags.update(tags)

    cfg = ExperimentConfig()
    cfg.run.workdir, cfg.eval.keep_best = str(tmp_path), True
    tracker = TaggingTracker()
    weights_at = {}
    for step, (seed, scores) in enumerate([(0, (0.2, 0.4)), (1, (0.5, 0.5)), (2, (0.6, 0.3))]):
        model, tok = _tiny_policy(seed)
        weights_at[step] = model
        session = SimpleNamespace(
            cfg=cfg,
            model=model,
            tokenizer=tok,
            trainer=SimpleNamespace(gather_weights=lambda: None),
        )
        summaries = {f"b{j}": {"questions": 5, "avg_at_k": s} for j, s in enumerate(scores)}
        keep_best_policy(session, tracker, step * 10, summaries)
    # Means 0.3, 0.5, 0.45: the step-10 policy is the best and stays kept.
    best_dir = cfg.run_dir() / "best"
    assert best_so_far(best_dir) == {"step": 10, "score": 0.5}
    kept = AutoModelForCausalLM.from_pretrained(best_dir)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            kept.state_dict().values(), weights_at[1].state_dict().values(), strict=True
        )
    )
    assert tracker.tags["relift.best_step"] == "10"
    assert tracker.tags["relift.best_checkpoint"] == str(best_dir.resolve())
    assert tracker.history("eval/best_score") == pytest.approx([0.3, 0.5])


def test_gpu_presets_keep_the_best_checkpoint_and_report_both_readings():
    cfg = load_config("qwen2.5-math-7b")
    assert cfg.eval.keep_best is True and cfg.eval.reference_reading is True


def test_sft_baseline_preset_is_luffys_offline_recipe():
    sft, relift = load_config("qwen2.5-math-7b-sft"), load_config("qwen2.5-math-7b")
    assert sft.algorithm.name == "sft" and sft.sft.lr == 5e-5
    assert sft.rl.prompts_per_step == sft.sft.mini_batch_size == 64
    assert sft.run.iterations == 2142 and sft.rollout.max_new_tokens == 1
    assert (sft.model, sft.data, sft.eval) == (relift.model, relift.data, relift.eval)
