"""vLLM rollout engine against a fake `vllm` module (everywhere), and against real vLLM (GPU only).

The fake behaves as vLLM 0.33.0 does where the engine depends on it (read from its source):
- `LLM(model=dir, ...)` loads the tokenizer and the generation config from `dir`; its
  `max_model_len` defaults to the config's `max_position_embeddings` and may not exceed it
  (config/model.py `_get_and_verify_max_len`); a prompt must be shorter than it.
- A request with n > 1 and a seed runs n child requests seeded `seed + index`
  (v1/engine/parallel_sampling.py); a sample's tokens are a function of its seed.
- A request stops only at the tokenizer's eos, the generation config's eos ids and its
  `stop_token_ids` (sampling_params.py `update_from_generation_config`,
  v1/core/sched/utils.py `check_stop`), else at `max_tokens` or `max_model_len`; the stop
  token is part of `token_ids`; `text` skips special tokens.
- Sleep mode allocates through one process-wide CuMem allocator: a second sleep-mode engine in
  a process fails its assertion (v1/worker/gpu_worker.py).
- `sleep(level)` drops the prefix cache and the KV cache; level 1 offloads the weights, level 2
  discards them. `wake_up(tags)` maps memory back for "weights" / "kv_cache" (None: all);
  weights discarded by level 2 hold no trained values until loaded again. Using memory that is
  asleep is an error (the real engine faults on unmapped memory).
- The prefix cache keeps prompts' KV across calls until `reset_prefix_cache` or a sleep: a hit
  computed by older weights is silently stale (counted here).
- `apply_model(func)` runs `func` on the model in this process only with the engine core in
  process (VLLM_ENABLE_V1_MULTIPROCESSING=0, tensor_parallel_size 1); otherwise vLLM's msgpack
  encoder refuses anything but a plain function unless VLLM_ALLOW_INSECURE_SERIALIZATION=1
  (v1/serial_utils.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub

from dataclasses import dataclass, field
from types import FunctionType, SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from relift_core.config import ExperimentConfig, ModelConfig, TinyModelConfig, load_config
from relift_core.runtime import ray_cluster, vllm_engine
from relift_core.runtime.char_tokenizer import build_char_tokenizer
from relift_core.runtime.models import build_tiny_model, save_policy
from relift_core.runtime.rollout import RolloutEngine, SamplingRequest, default_stop_token_ids
from relift_core.runtime.vllm_engine import VLLMRolloutEngine

MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
ENDOFTEXT = "<|endoftext|>"


@dataclass
class FakeSamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = 16
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True


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
    names: set[str]
    version: int = 0  # bumped by every full load
    loaded: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def load_weights(self, weights) -> set[str]:
        weights = dict(weights)
        self.loaded.append(weights)
        if set(weights) >= self.names:
            self.version += 1
        return set(weights)


# vLLM's defaults for the LLM arguments the engine passes (entrypoints/llm.py, EngineArgs).
LLM_DEFAULTS = {
    "dtype": "auto",
    "seed": 0,
    "gpu_memory_utilization": 0.9,
    "tensor_parallel_size": 1,
    "enable_sleep_mode": False,
    "max_model_len": None,
}


class FakeLLM:
    allocator_in_use = False  # the process-wide CuMem allocator

    def __init__(self, model: str, **engine_args) -> None:
        unknown = sorted(set(engine_args) - set(LLM_DEFAULTS))
        if unknown:  # vLLM's EngineArgs takes no other keyword
            raise TypeError(
                f"EngineArgs.__init__() got an unexpected keyword argument {unknown[0]!r}"
            )
        self.kwargs = {"model": model, **engine_args}  # as given
        self.args = {**LLM_DEFAULTS, **engine_args}
        max_model_len = self.args["max_model_len"]
        config = AutoConfig.from_pretrained(model)
        derived = config.max_position_embeddings
        if max_model_len is not None and max_model_len > derived:
            raise ValueError(
                f"User-specified max_model_len ({max_model_len}) is greater than "
                f"the derived max_model_len (max_position_embeddings={derived})"
            )
        self.max_model_len = max_model_len or derived
        if self.args["enable_sleep_mode"]:
            assert not FakeLLM.allocator_in_use, (
                "CuMem allocator can only be used for one instance per process."
            )
            FakeLLM.allocator_in_use = True
        self.in_process = (
            os.environ.get(MULTIPROCESSING_ENV, "1") == "0"
            and self.args["tensor_parallel_size"] == 1
        )
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        eos = GenerationConfig.from_pretrained(model).eos_token_id
        self.generation_eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.model = FakeVLLMModel({name for name, _ in _weights_of(model)})
        self.awake = {"weights": True, "kv_cache": True}
        self.weights_discarded = False
        self.prefix_cache: dict[tuple[int, ...], int] = {}
        self.stale_prefix_hits = 0
        self.garbage_samples = 0
        self.child_seeds: list[int | None] = []
        self.events: list[str] = []
        # What the sampler draws from: letters, ChatML's end of turn, the tokenizer's eos.
        self.alphabet = self.tokenizer.convert_tokens_to_ids(
            ["a", "b", "c", "<|im_end|>", self.tokenizer.eos_token]
        )
        self.weights = torch.tensor([0.3, 0.3, 0.25, 0.1, 0.05])

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, sampling_params, use_tqdm=True):
        if not all(self.awake.values()):
            raise RuntimeError(f"illegal memory access: asleep {self.awake}")
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(prompts)
        outputs = []
        for prompt, params in zip(prompts, sampling_params, strict=True):
            ids = prompt["prompt_token_ids"]
            if len(ids) >= self.max_model_len:
                raise ValueError(
                    f"The decoder prompt (length {len(ids)}) is longer than the "
                    f"maximum model length of {self.max_model_len}."
                )
            key = tuple(ids)
            if self.prefix_cache.get(key, self.model.version) != self.model.version:
                self.stale_prefix_hits += 1
            self.prefix_cache[key] = self.model.version
            if self.weights_discarded:
                self.garbage_samples += params.n
            stops = set(params.stop_token_ids or []) | self.generation_eos
            if not params.ignore_eos:
                stops.add(self.tokenizer.eos_token_id)
            budget = min(params.max_tokens or self.max_model_len, self.max_model_len - len(ids))
            completions = []
            for index in range(params.n):
                seed = None if params.seed is None else params.seed + index
                self.child_seeds.append(seed)
                completions.append(self._complete(index, seed, stops, budget, params))
            outputs.append(FakeRequestOutput(ids, completions[::-1]))  # no order promised
        return outputs

    def _complete(self, index, seed, stops, budget, params) -> FakeCompletion:
        generator = torch.Generator()
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
        tokens, reason = [], "length"
        for _ in range(budget):
            token = self.alphabet[int(torch.multinomial(self.weights, 1, generator=generator))]
            tokens.append(token)
            if token in stops:
                reason = "stop"
                break
        text = self.tokenizer.decode(tokens, skip_special_tokens=params.skip_special_tokens)
        return FakeCompletion(index, tokens, text, reason)

    def apply_model(self, func):
        if (
            not self.in_process
            and not isinstance(func, FunctionType)
            and os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") != "1"
        ):
            raise TypeError(
                f"Object of type {type(func)} is not serializable. Set "
                "VLLM_ALLOW_INSECURE_SERIALIZATION=1 to allow fallback to "
                "pickle-based serialization."
            )
        if not self.awake["weights"]:
            raise RuntimeError("illegal memory access: the weights are asleep")
        self.events.append("apply_model" + ("" if self.awake["kv_cache"] else "(kv asleep)"))
        version = self.model.version
        result = func(self.model)
        if self.model.version > version:  # every weight loaded: nothing discarded remains
            self.weights_discarded = False
        return [result]

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False) -> bool:
        self.events.append("reset_prefix_cache")
        self.prefix_cache.clear()
        return True

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        assert self.args["enable_sleep_mode"], "sleep mode is not enabled"
        self.events.append(f"sleep({level})")
        self.prefix_cache.clear()
        self.awake = {"weights": False, "kv_cache": False}
        if level == 2:
            self.weights_discarded = True

    def wake_up(self, tags: list[str] | None = None) -> bool:
        assert tags is None or set(tags) <= {"weights", "kv_cache", "scheduling"}, tags
        self.events.append(f"wake_up({tags})")
        for tag in tags or ["weights", "kv_cache"]:
            if tag in self.awake:
                self.awake[tag] = True
        return all(self.awake.values())


def _weights_of(model_dir: str):
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors")).items()


FAKE_VLLM = SimpleNamespace(LLM=FakeLLM, SamplingParams=FakeSamplingParams)
TINY = TinyModelConfig()


def qwen_like_tokenizer():
    """The character tokenizer with Qwen's split: eos `<|endoftext|>`, turns end `<|im_end|>`."""
    tok = build_char_tokenizer()
    tok.add_special_tokens({"eos_token": ENDOFTEXT})
    return tok


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    # Each test is a fresh process to vLLM: no CuMem allocator, no engine, the env untouched.
    monkeypatch.setattr(FakeLLM, "allocator_in_use", False)
    monkeypatch.setattr(vllm_engine, "_shared", None, raising=False)
    monkeypatch.setenv(MULTIPROCESSING_ENV, "sentinel")
    monkeypatch.delenv(MULTIPROCESSING_ENV)


@pytest.fixture(scope="module")
def policy():
    tok = qwen_like_tokenizer()
    return build_tiny_model(TINY, tok, seed=0), tok


@pytest.fixture
def model_dir(tmp_path, policy):
    save_policy(*policy, tmp_path / "policy")
    return tmp_path / "policy"


def engine_for(policy, tmp_path, **overrides) -> VLLMRolloutEngine:
    cfg = ExperimentConfig(model=ModelConfig(dtype="float32"))
    cfg.run.workdir = str(tmp_path)
    cfg.data.max_prompt_tokens, cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens = 64, 32, 48
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return VLLMRolloutEngine.from_config(cfg, *policy, vllm_module=FAKE_VLLM)


PROMPT = "<|im_start|>user\n1+1<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = [PROMPT, "<|im_start|>user\nhi"]


# ------------------------------------------------------------------ construction and settings


def test_from_config_builds_one_sleep_mode_engine_with_prompt_plus_response(tmp_path, policy):
    engine = engine_for(policy, tmp_path, rollout__gpu_memory_utilization=0.4)
    model_dir = tmp_path / "run" / "vllm_model"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    assert engine.llm.kwargs == {
        "model": str(model_dir),
        "dtype": "bfloat16",  # float32 training, bf16 rollouts
        "gpu_memory_utilization": 0.4,
        "tensor_parallel_size": 1,
        "seed": 0,
        "enable_sleep_mode": True,
        "max_model_len": 64 + 48,  # the longest prompt plus the longest response asked for
    }
    assert engine.llm.max_model_len == 112
    assert os.environ[MULTIPROCESSING_ENV] == "0"  # in-process engine core for weight sync
    assert isinstance(engine, RolloutEngine)


def test_a_context_beyond_the_checkpoint_is_vllms_error(tmp_path, policy):
    # The tiny policy holds 512 positions: a 9,216-token engine is vLLM's ValueError, which is
    # why the GPU presets start from the 16k-context checkpoints.
    with pytest.raises(ValueError, match="max_model_len"):
        engine_for(policy, tmp_path, data__max_prompt_tokens=1024, rollout__max_new_tokens=8192)


def test_engine_context_is_max_prompt_plus_max_response():
    cfg = load_config("qwen2.5-math-7b")
    assert (
        vllm_engine.engine_context(cfg)
        == cfg.data.max_prompt_tokens + max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens)
        >= 9216
    )


def test_tensor_parallelism_is_refused_in_one_line(tmp_path, policy):
    with pytest.raises(ValueError, match=r"^rollout.tensor_parallel_size=2: .*=1") as err:
        engine_for(policy, tmp_path, rollout__tensor_parallel_size=2)
    assert "\n" not in str(err.value)


def test_multiprocess_vllm_refuses_the_loader(model_dir, policy, monkeypatch):
    # Why tensor parallelism is refused: out of process, vLLM will not serialise the loader.
    monkeypatch.setenv(MULTIPROCESSING_ENV, "1")
    llm = FakeLLM(str(model_dir))
    with pytest.raises(TypeError, match="not serializable"):
        llm.apply_model(vllm_engine._WeightLoader(list(policy[0].state_dict().items())))


def test_missing_vllm_names_the_gpu_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "vllm", None)  # makes `import vllm` fail
    with pytest.raises(ImportError, match=r"relift\[gpu\]"):
        VLLMRolloutEngine(tmp_path)


# ------------------------------------------------------------------ one engine per process


def test_a_second_engine_in_the_process_reuses_the_first(tmp_path, policy):
    first = engine_for(policy, tmp_path)
    other = build_tiny_model(TINY, policy[1], seed=7)
    # The difficulty-dynamics flow measures two checkpoints in one process: the second gets
    # the first's engine, with its own weights loaded (a second LLM would fail vLLM's assert).
    second = engine_for((other, policy[1]), tmp_path, run__seed=3)
    assert second is first
    loaded = first.llm.model.loaded[-1]
    assert all(torch.equal(loaded[k], v) for k, v in other.state_dict().items())


def test_another_engine_setting_in_the_same_process_is_refused(tmp_path, policy):
    engine_for(policy, tmp_path)
    with pytest.raises(RuntimeError, match="one vLLM engine per process"):
        engine_for(policy, tmp_path, rollout__gpu_memory_utilization=0.3)


def test_the_fake_allows_one_sleep_mode_engine_per_process(model_dir):
    FakeLLM(str(model_dir), enable_sleep_mode=True)
    with pytest.raises(AssertionError, match="one instance per process"):
        FakeLLM(str(model_dir), enable_sleep_mode=True)


# ------------------------------------------------------------------ sampling as vLLM does it


def test_stop_tokens_are_the_hf_engines(tmp_path, policy):
    engine = engine_for(policy, tmp_path)
    model, tok = policy
    assert engine.stop_token_ids == default_stop_token_ids(tok, model)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in engine.stop_token_ids and tok.eos_token_id in engine.stop_token_ids
    groups = engine.generate(PROMPTS, n=8, temperature=1.0, max_new_tokens=32, seed=0)
    samples = [s for g in groups for s in g]
    # A Qwen-style turn ends at <|im_end|> (the tokenizer's eos is <|endoftext|>): no response
    # runs past it, and some stop there.
    for s in samples:
        assert im_end not in s.response_ids[:-1]
        assert (s.finish_reason == "eos") == (s.response_ids[-1] in engine.stop_token_ids)
        assert s.length == len(s.response_ids) and (s.finish_reason == "eos" or s.length == 32)
    assert any(s.response_ids[-1] == im_end for s in samples)


def test_every_sample_of_a_call_has_its_own_seed(tmp_path, policy):
    engine = engine_for(policy, tmp_path)
    engine.generate([PROMPT] * 3, n=4, temperature=1.0, max_new_tokens=8, seed=100)
    seeds = engine.llm.child_seeds
    assert len(seeds) == 12 and len(set(seeds)) == 12
    assert sorted(seeds) == list(range(100, 112))


def test_same_seed_same_samples_and_prompts_do_not_share_streams(tmp_path, policy):
    engine = engine_for(policy, tmp_path)

    def draw():
        groups = engine.generate([PROMPT, PROMPT], n=4, temperature=1.0, max_new_tokens=16, seed=5)
        return [[s.response_ids for s in g] for g in groups]

    first = draw()
    assert draw() == first  # reproducible
    # Identical prompts: with seeds seed + i (the old engine) prompt 1's sample j replays
    # prompt 0's sample j + 1; with seed + i * n they are all different draws.
    assert first[1][:3] != first[0][1:]


def test_ray_shards_keep_every_samples_seed_distinct(tmp_path, policy, monkeypatch):
    engine = engine_for(policy, tmp_path)

    class Rank:  # a rank actor: its engine samples its shard
        sample = SimpleNamespace(remote=engine._sample_ids)

    ranks = SimpleNamespace(world_size=3, actors=[Rank(), Rank(), Rank()])
    monkeypatch.setattr(ray_cluster, "_ray", lambda: SimpleNamespace(get=lambda ref: ref))
    sharded = ray_cluster.RayRolloutEngine(ranks, policy[1])
    ids = [policy[1](PROMPT, add_special_tokens=False)["input_ids"]] * 7
    request = SamplingRequest(ids, 4, 1.0, 1.0, 8, 50, None)
    groups = sharded._sample_ids(request)
    assert [g[0].prompt_index for g in groups] == list(range(7))
    # The same seeds as one engine sampling all 7 prompts: seed + 4 i + j, each once.
    assert sorted(engine.llm.child_seeds) == list(range(50, 50 + 28))


def test_outputs_map_to_samples_in_index_order(tmp_path, policy):
    engine = engine_for(policy, tmp_path)
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
    expected_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert list(engine.llm.prefix_cache) == [tuple(ids) for ids in expected_ids]  # ids sent
    assert progress == [(0, 6), (6, 6)]
    assert [len(g) for g in groups] == [3, 3]
    for index, group in enumerate(groups):
        assert [s.prompt_index for s in group] == [index] * 3
        assert all(s.prompt_ids == expected_ids[index] for s in group)
        for s in group:
            assert s.text == tok.decode(s.response_ids, skip_special_tokens=True)


def test_greedy_and_unseeded_sampling_params(tmp_path, policy, monkeypatch):
    engine = engine_for(policy, tmp_path)
    sent = []
    real = engine.llm.generate
    monkeypatch.setattr(
        engine.llm,
        "generate",
        lambda p, params, use_tqdm=True: sent.extend(params) or real(p, params),
    )
    engine.generate([PROMPT], n=1, temperature=0.0, top_p=0.5, max_new_tokens=4)
    assert sent == [
        FakeSamplingParams(
            n=1,
            temperature=0.0,
            top_p=1.0,
            max_tokens=4,
            seed=None,
            stop_token_ids=engine.stop_token_ids,
        )
    ]


def test_abort_and_missing_samples_are_errors(tmp_path, policy, monkeypatch):
    engine = engine_for(policy, tmp_path)

    def aborted(prompts, params, use_tqdm=True):
        return [FakeRequestOutput([1], [FakeCompletion(0, [5], "x", "abort")])]

    monkeypatch.setattr(engine.llm, "generate", aborted)
    with pytest.raises(RuntimeError, match="abort"):
        engine.generate([PROMPT], n=1, temperature=1.0, max_new_tokens=4)
    with pytest.raises(RuntimeError, match="1 samples"):
        engine.generate([PROMPT], n=2, temperature=1.0, max_new_tokens=4)


# ------------------------------------------------------------------ sleep, wake, weight sync


def train_step(engine, model):
    """What the training loop does around an update (rollout.engine_asleep, then the sync)."""
    engine.sleep()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    engine.wake()
    engine.sync_weights(model)


def test_sleep_level_2_wakes_weights_before_the_sync_and_the_kv_cache_after(tmp_path, policy):
    model = build_tiny_model(TINY, policy[1], seed=1)
    engine = engine_for((model, policy[1]), tmp_path)
    engine.generate([PROMPT], n=2, temperature=1.0, max_new_tokens=4, seed=0)
    train_step(engine, model)
    assert engine.llm.events == [
        "sleep(2)",
        "wake_up(['weights'])",
        "apply_model(kv asleep)",
        "reset_prefix_cache",
        "wake_up(['kv_cache'])",
    ]
    loaded = engine.llm.model.loaded[-1]
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    engine.generate([PROMPT], n=2, temperature=1.0, max_new_tokens=4, seed=0)
    assert engine.llm.garbage_samples == 0  # never sampled from discarded weights


def test_sleep_and_wake_are_idempotent(tmp_path, policy):
    engine = engine_for(policy, tmp_path)
    engine.sleep()
    engine.sleep()  # vLLM must not be put to sleep twice
    engine.wake()
    engine.wake()
    assert engine.llm.events == ["sleep(2)", "wake_up(['weights'])"]


def test_sampling_before_the_sync_after_level_2_is_refused(tmp_path, policy):
    engine = engine_for(policy, tmp_path)
    engine.sleep()
    engine.wake()  # weights mapped again, but discarded: they hold nothing trained
    with pytest.raises(RuntimeError, match="sync_weights"):
        engine.generate([PROMPT], n=1, temperature=1.0, max_new_tokens=4)
    engine.sync_weights(policy[0])
    assert engine.generate([PROMPT], n=1, temperature=1.0, max_new_tokens=4)[0][0].length
    assert engine.llm.garbage_samples == 0


def test_the_prefix_cache_is_reset_after_a_sync_without_sleep(tmp_path, policy):
    model = build_tiny_model(TINY, policy[1], seed=1)
    engine = engine_for((model, policy[1]), tmp_path)
    engine.generate([PROMPT], n=2, temperature=1.0, max_new_tokens=4, seed=0)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    engine.sync_weights(model)  # an awake engine given new weights (a rank's set_weights)
    engine.generate([PROMPT], n=2, temperature=1.0, max_new_tokens=4, seed=0)
    assert engine.llm.stale_prefix_hits == 0


# -------------------------------------------------------------------- real vLLM (GPU only)


def test_real_vllm_generates_and_syncs_weights(tmp_path):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    tok = qwen_like_tokenizer()
    # head_dim 64: vLLM's attention kernels support that size, not the default tiny model's 16.
    cfg = TinyModelConfig(hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=512)
    save_policy(build_tiny_model(cfg, tok, seed=0), tok, tmp_path / "policy")
    engine = VLLMRolloutEngine(
        tmp_path / "policy", dtype="float32", gpu_memory_utilization=0.2, max_model_len=256
    )
    prompts = [PROMPT] * 2
    groups = engine.generate(prompts, n=2, temperature=1.0, max_new_tokens=16, seed=0)
    assert [len(g) for g in groups] == [2, 2]
    for group in groups:
        for s in group:
            assert s.length == len(s.response_ids) <= 16
            assert (s.finish_reason == "eos") == (s.response_ids[-1] in engine.stop_token_ids)

    # After a sleep and a weight sync, vLLM's copy of the weights is the trainer's.
    other = build_tiny_model(cfg, tok, seed=1)
    engine.sleep()
    engine.wake()
    engine.sync_weights(other)
    (synced,) = engine.llm.apply_model(lambda m: m.model.embed_tokens.weight.float().sum().item())
    assert synced == pytest.approx(other.model.embed_tokens.weight.sum().item(), rel=1e-4)
    assert engine.generate(prompts[:1], n=1, temperature=0.0, max_new_tokens=4)[0][0].length
