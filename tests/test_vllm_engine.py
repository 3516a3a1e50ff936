"""vLLM rollout engine against a fake `vllm` module (everywhere), and against real vLLM (GPU only).

The fake mirrors the parts of vLLM's offline API the engine uses: `LLM(...)`, `get_tokenizer`,
`generate(prompts, sampling_params, use_tqdm)` returning RequestOutputs whose CompletionOutputs
carry `index`, `token_ids`, `text` and `finish_reason`, `apply_model`, `sleep`, `wake_up`.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from relift_core.config import ExperimentConfig, ModelConfig, TinyModelConfig
from relift_core.runtime.char_tokenizer import build_char_tokenizer
from relift_core.runtime.models import build_tiny_model, save_policy
from relift_core.runtime.rollout import RolloutEngine
from relift_core.runtime.vllm_engine import VLLMRolloutEngine

MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


@dataclass
class FakeSamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None


@dataclass
class FakeCompletion:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None


@dataclass
class FakeRequestOutput:
    prompt_token_ids: list[int]
    outputs: list[FakeCompletion]


@dataclass
class FakeVLLMModel:
    loaded: list[list[tuple[str, torch.Tensor]]] = field(default_factory=list)

    def load_weights(self, weights):
        self.loaded.append(list(weights))


class _FakeLLMBase:
    """Sample j of every prompt: j even stops on eos after j+1 tokens, j odd runs to max_tokens.

    Completions come back in reverse index order, as vLLM does not promise an order.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.tokenizer = build_char_tokenizer()
        self.model = FakeVLLMModel()
        self.generate_calls: list[tuple[list[dict], list[FakeSamplingParams], bool]] = []
        self.events: list[str] = []

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.generate_calls.append((prompts, sampling_params, use_tqdm))
        eos = self.tokenizer.eos_token_id
        a = self.tokenizer.convert_tokens_to_ids("a")
        outputs = []
        for prompt, params in zip(prompts, sampling_params, strict=True):
            completions = []
            for j in reversed(range(params.n)):
                if j % 2 == 0:
                    ids, reason = [a] * j + [eos], "stop"
                else:
                    ids, reason = [a] * params.max_tokens, "length"
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                completions.append(FakeCompletion(j, ids, text, reason))
            outputs.append(FakeRequestOutput(prompt["prompt_token_ids"], completions))
        return outputs

    def sleep(self, level: int = 1) -> None:
        self.events.append(f"sleep({level})")

    def wake_up(self) -> None:
        self.events.append("wake_up")


class FakeLLM(_FakeLLMBase):
    """Current vLLM: `apply_model` runs a function on the model inside each worker."""

    def apply_model(self, func):
        self.events.append("apply_model")
        return [func(self.model)]


class LegacyFakeLLM(_FakeLLMBase):
    """An older vLLM without `apply_model`: the model sits on the driver worker's runner."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        runner = SimpleNamespace(model=self.model)
        worker = SimpleNamespace(model_runner=runner)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=worker))


def fake_vllm(llm_cls: type = FakeLLM) -> SimpleNamespace:
    return SimpleNamespace(LLM=llm_cls, SamplingParams=FakeSamplingParams)


@pytest.fixture(autouse=True)
def restore_multiprocessing_env(monkeypatch):
    # The engine sets this variable for single-GPU runs; undo it after each test.
    monkeypatch.setenv(MULTIPROCESSING_ENV, "sentinel")
    monkeypatch.delenv(MULTIPROCESSING_ENV)


@pytest.fixture
def engine(tmp_path) -> VLLMRolloutEngine:
    return VLLMRolloutEngine(tmp_path, vllm_module=fake_vllm())


PROMPTS = ["<|im_start|>user\n1+1<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>user\nhi"]


def test_constructs_llm_with_sleep_mode(tmp_path):
    engine = VLLMRolloutEngine(
        tmp_path,
        dtype="float16",
        gpu_memory_utilization=0.3,
        tensor_parallel_size=1,
        seed=5,
        vllm_module=fake_vllm(),
    )
    assert engine.llm.kwargs == {
        "model": str(tmp_path),
        "dtype": "float16",
        "gpu_memory_utilization": 0.3,
        "tensor_parallel_size": 1,
        "seed": 5,
        "enable_sleep_mode": True,
    }
    assert os.environ[MULTIPROCESSING_ENV] == "0"  # in-process engine core for weight sync
    assert isinstance(engine, RolloutEngine)


def test_missing_vllm_names_the_gpu_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "vllm", None)  # makes `import vllm` fail
    with pytest.raises(ImportError, match=r"relift\[gpu\]"):
        VLLMRolloutEngine(tmp_path)


def test_generate_maps_outputs_to_samples(engine):
    progress: list[tuple[int, int]] = []
    groups = engine.generate(
        PROMPTS,
        n=3,
        temperature=0.7,
        top_p=0.9,
        max_new_tokens=5,
        seed=11,
        progress=lambda done, total: progress.append((done, total)),
    )
    tok = engine.tokenizer
    prompts_sent, params, use_tqdm = engine.llm.generate_calls[0]
    expected_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert prompts_sent == [{"prompt_token_ids": ids} for ids in expected_ids]
    assert use_tqdm is False
    assert params == [
        FakeSamplingParams(n=3, temperature=0.7, top_p=0.9, max_tokens=5, seed=11),
        FakeSamplingParams(n=3, temperature=0.7, top_p=0.9, max_tokens=5, seed=12),
    ]
    assert progress == [(0, 6), (6, 6)]

    assert [len(g) for g in groups] == [3, 3]
    eos, a = tok.eos_token_id, tok.convert_tokens_to_ids("a")
    for index, group in enumerate(groups):
        assert [s.prompt_index for s in group] == [index] * 3
        assert all(s.prompt_ids == expected_ids[index] for s in group)
        assert [s.response_ids for s in group] == [[eos], [a] * 5, [a, a, eos]]  # by index
        assert [s.finish_reason for s in group] == ["eos", "length", "eos"]
        assert [s.length for s in group] == [1, 5, 3]
        assert [s.text for s in group] == ["", "aaaaa", "aa"]


def test_greedy_and_unseeded_sampling_params(engine):
    engine.generate(PROMPTS[:1], n=1, temperature=0.0, top_p=0.5, max_new_tokens=4)
    (params,) = engine.llm.generate_calls[0][1]
    assert params == FakeSamplingParams(n=1, temperature=0.0, top_p=1.0, max_tokens=4, seed=None)


def test_abort_and_missing_samples_are_errors(engine, monkeypatch):
    def aborted(prompts, params, use_tqdm=True):
        return [FakeRequestOutput([1], [FakeCompletion(0, [5], "x", "abort")])]

    monkeypatch.setattr(engine.llm, "generate", aborted)
    with pytest.raises(RuntimeError, match="abort"):
        engine.generate(PROMPTS[:1], n=1, temperature=1.0, max_new_tokens=4)
    with pytest.raises(RuntimeError, match="1 samples"):
        engine.generate(PROMPTS[:1], n=2, temperature=1.0, max_new_tokens=4)


@pytest.mark.parametrize("llm_cls", [FakeLLM, LegacyFakeLLM], ids=["apply_model", "legacy"])
def test_sync_weights_loads_the_trainer_state_dict(tmp_path, llm_cls):
    engine = VLLMRolloutEngine(tmp_path, vllm_module=fake_vllm(llm_cls))
    trainer_model = build_tiny_model(TinyModelConfig(), build_char_tokenizer(), seed=3)
    engine.sync_weights(trainer_model)
    (loaded,) = engine.llm.model.loaded
    expected = trainer_model.state_dict()
    assert [name for name, _ in loaded] == list(expected)
    for name, tensor in loaded:
        assert torch.equal(tensor, expected[name]), name


def test_sleep_and_wake_and_sync_while_asleep(engine):
    engine.sleep()
    engine.sleep()  # idempotent: vLLM must not be put to sleep twice
    engine.wake()
    engine.wake()
    engine.sleep()
    engine.sync_weights(build_tiny_model(TinyModelConfig(), build_char_tokenizer()))
    assert engine.llm.events == ["sleep(1)", "wake_up", "sleep(1)", "wake_up", "apply_model"]


def test_from_config_saves_the_policy_for_vllm(tmp_path):
    cfg = ExperimentConfig(model=ModelConfig(dtype="float32"))
    cfg.run.workdir = str(tmp_path)
    cfg.rollout.gpu_memory_utilization = 0.4
    tok = build_char_tokenizer()
    model = build_tiny_model(TinyModelConfig(), tok)
    engine = VLLMRolloutEngine.from_config(cfg, model, tok, vllm_module=fake_vllm())
    model_dir = cfg.run_dir() / "vllm_model"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    assert engine.llm.kwargs["model"] == str(model_dir)
    assert engine.llm.kwargs["dtype"] == "bfloat16"  # float32 training, half-precision rollouts
    assert engine.llm.kwargs["gpu_memory_utilization"] == 0.4


# -------------------------------------------------------------------- real vLLM (GPU only)


def test_real_vllm_generates_and_syncs_weights(tmp_path):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    tok = build_char_tokenizer()
    # head_dim 64: vLLM's attention kernels support that size, not the default tiny model's 16.
    cfg = TinyModelConfig(hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=512)
    save_policy(build_tiny_model(cfg, tok, seed=0), tok, tmp_path / "policy")
    engine = VLLMRolloutEngine(
        tmp_path / "policy", dtype="float32", gpu_memory_utilization=0.2, max_model_len=256
    )
    prompts = ["<|im_start|>user\n1+1<|im_end|>\n<|im_start|>assistant\n"] * 2
    groups = engine.generate(prompts, n=2, temperature=1.0, max_new_tokens=16, seed=0)
    assert [len(g) for g in groups] == [2, 2]
    for group in groups:
        for s in group:
            assert s.length == len(s.response_ids) <= 16
            assert (s.finish_reason == "eos") == (s.response_ids[-1] == tok.eos_token_id)

    # After a weight sync, vLLM's copy of the weights is the trainer's.
    other = build_tiny_model(cfg, tok, seed=1)
    engine.sync_weights(other)
    (synced,) = engine.llm.apply_model(lambda m: m.model.embed_tokens.weight.float().sum().item())
    assert synced == pytest.approx(other.model.embed_tokens.weight.sum().item(), rel=1e-4)
    engine.sleep()
    engine.wake()
    assert engine.generate(prompts[:1], n=1, temperature=0.0, max_new_tokens=4)[0][0].length
