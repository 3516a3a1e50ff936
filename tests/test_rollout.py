"""HF rollout engine: on a tiny random model (fast) and on SmolLM2-135M-Instruct (slow).

A tiny model's samples are gibberish, so exact stopping behaviour is checked with a forward hook
that forces the eos logit at chosen steps; everything else checks invariants that hold for any
model (finish reason "eos" exactly when the last token is a stop token, no padding inside a
response, determinism, padding invariance).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub

from collections.abc import Iterator

import pytest
import torch

from relift_core.config import ModelConfig, TinyModelConfig
from relift_core.runtime.models import build_tiny_model, load_policy, smollm2_dir
from relift_core.runtime.rollout import (
    HFRolloutEngine,
    Sample,
    default_stop_token_ids,
    draw_index,
    engine_asleep,
    sample_next,
    split_response,
)

QUESTIONS = ["1+1=?", "What is 23*7?", "Say hi, then stop."]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    # Tiny matmuls gain nothing from threads, and on a small shared machine two OpenMP threads
    # contending with other processes made generate ~20x slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _scramble(model: torch.nn.Module, seed: int) -> None:
    """Large random matrices, so greedy output depends on the whole context.

    At the default init scale a tied-embedding model mostly echoes its last input token (its
    embedding dotted with itself wins), which would make greedy comparisons pass vacuously.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_policy(ModelConfig(source="tiny"), seed=0)
    _scramble(model, seed=0)
    return model, tokenizer


@pytest.fixture(scope="module")
def prompts(tiny) -> list[str]:
    return _chat_prompts(tiny[1], QUESTIONS)


def _chat_prompts(tokenizer, questions: list[str]) -> list[str]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]


def _check_invariants(groups: list[list[Sample]], prompts, tokenizer, n, max_new_tokens, stops):
    assert len(groups) == len(prompts)
    for index, (group, prompt) in enumerate(zip(groups, prompts, strict=True)):
        assert len(group) == n
        expected_prompt = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for s in group:
            assert s.prompt_index == index
            assert s.prompt_ids == expected_prompt
            assert s.length == len(s.response_ids) and 1 <= s.length <= max_new_tokens
            assert s.text == tokenizer.decode(s.response_ids, skip_special_tokens=True)
            # No stop token (hence no eos-padding) anywhere but possibly the last position.
            assert not set(s.response_ids[:-1]) & set(stops)
            if s.finish_reason == "eos":
                assert s.response_ids[-1] in stops
            else:
                assert s.finish_reason == "length" and s.length == max_new_tokens
                assert s.response_ids[-1] not in stops


def _ids(groups: list[list[Sample]]) -> list[list[list[int]]]:
    return [[s.response_ids for s in group] for group in groups]


class _ForceEos:
    """Forward hook on lm_head: row r emits eos as its (r+1)-th token; eos is banned otherwise.

    So in one batch the rows stop at different steps, and `generate` pads the early finishers.
    Where finished rows leave the batch (`rows_leave`), the row still running longest is always
    at index 0 by step r, so the hook stops that one.
    """

    def __init__(self, eos_id: int, rows_leave: bool) -> None:
        self.eos_id = eos_id
        self.rows_leave = rows_leave
        self.step = 0

    def __call__(self, module, inputs, logits: torch.Tensor) -> torch.Tensor:
        bias = torch.zeros_like(logits[:, -1])
        bias[:, self.eos_id] = -1e4
        rows = torch.arange(logits.shape[0])
        bias[rows == (0 if self.rows_leave else self.step), self.eos_id] = 1e4
        self.step += 1
        logits = logits.clone()
        logits[:, -1] += bias
        return logits


# ----------------------------------------------------------------------------- tiny (fast)


def test_shapes_prompt_ids_and_finish_reasons(tiny, prompts, drop_finished):
    model, tok = tiny
    # 3 prompts x 4 = 12 rows: 3 chunks.
    engine = HFRolloutEngine(model, tok, batch_size=5, drop_finished=drop_finished)
    groups = engine.generate(prompts, n=4, temperature=1.0, max_new_tokens=12, seed=0)
    _check_invariants(groups, prompts, tok, 4, 12, engine.stop_token_ids)


@pytest.fixture(params=[True, False], ids=["drop-finished", "generate"])
def drop_finished(request) -> bool:
    return request.param


def _three_rows_stopping_at_steps_1_2_3(model, tok, prompt, max_new_tokens, drop_finished):
    engine = HFRolloutEngine(model, tok, drop_finished=drop_finished)
    hook = model.lm_head.register_forward_hook(_ForceEos(tok.eos_token_id, drop_finished))
    try:
        (group,) = engine.generate(
            [prompt], n=3, temperature=1.0, max_new_tokens=max_new_tokens, seed=0
        )
    finally:
        hook.remove()
    return group


def test_stops_at_eos_and_strips_the_padding_after_it(tiny, prompts, drop_finished):
    model, tok = tiny
    group = _three_rows_stopping_at_steps_1_2_3(
        model, tok, prompts[0], max_new_tokens=6, drop_finished=drop_finished
    )
    assert [s.length for s in group] == [1, 2, 3]
    assert all(s.finish_reason == "eos" and s.response_ids[-1] == tok.eos_token_id for s in group)
    assert group[0].text == ""  # the eos itself is a special token
    assert tok.pad_token_id not in {t for s in group for t in s.response_ids}


def test_length_when_max_new_tokens_is_hit(tiny, prompts, drop_finished):
    model, tok = tiny
    # Rows 0..2 would stop at steps 1..3, but only 2 tokens are allowed.
    group = _three_rows_stopping_at_steps_1_2_3(
        model, tok, prompts[0], max_new_tokens=2, drop_finished=drop_finished
    )
    assert [(s.length, s.finish_reason) for s in group] == [(1, "eos"), (2, "eos"), (2, "length")]


def test_same_seed_same_samples_and_global_rng_untouched(tiny, prompts, drop_finished):
    model, tok = tiny
    engine = HFRolloutEngine(model, tok, batch_size=4, drop_finished=drop_finished)
    rng = torch.get_rng_state()
    a = engine.generate(prompts, n=2, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=7)
    b = engine.generate(prompts, n=2, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=7)
    c = engine.generate(prompts, n=2, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=8)
    assert torch.equal(torch.get_rng_state(), rng)
    assert _ids(a) == _ids(b)
    assert _ids(a) != _ids(c)
    assert a[0][0].response_ids != a[0][1].response_ids  # the n samples of a prompt differ


def test_greedy_is_deterministic_and_independent_of_padding_and_chunking(
    tiny, prompts, drop_finished
):
    model, tok = tiny
    batched = HFRolloutEngine(model, tok, batch_size=64, drop_finished=drop_finished)
    greedy = {"temperature": 0.0, "max_new_tokens": 12}
    together = batched.generate(prompts, n=2, **greedy)
    # The prompts differ in length, so together they are left-padded; alone they are not.
    alone = [batched.generate([p], n=1, **greedy)[0][0] for p in prompts]
    assert len({s.text for s in alone}) == len(prompts)  # a model that reads its prompt
    for group, single in zip(together, alone, strict=True):
        assert [s.response_ids for s in group] == [single.response_ids] * 2
    one_row_chunks = HFRolloutEngine(
        model, tok, batch_size=1, drop_finished=drop_finished
    ).generate(prompts, n=2, **greedy)
    assert _ids(one_row_chunks) == _ids(together)


def test_dropping_finished_rows_decodes_what_generate_decodes(tiny, prompts):
    """Greedy: our loop and transformers `generate` give every row the same tokens, on prompts
    of different lengths (left padding) with rows stopping at different steps (eos forced)."""
    model, tok = tiny
    greedy = {"n": 1, "temperature": 0.0, "max_new_tokens": 16}
    free = HFRolloutEngine(model, tok, drop_finished=False).generate(prompts, **greedy)
    # Stop tokens each row meets at a different step: row r's token at step 2r.
    stops = list({group[0].response_ids[2 * r] for r, group in enumerate(free)})

    def decode(drop: bool):
        return _ids(
            HFRolloutEngine(
                model, tok, batch_size=6, stop_token_ids=stops, drop_finished=drop
            ).generate(prompts, **greedy)
        )

    ours = decode(True)
    assert len({len(group[0]) for group in ours}) > 1  # rows did stop at different steps
    assert ours == decode(False)


def test_progress_reports_rows_done(tiny, prompts):
    model, tok = tiny
    calls: list[tuple[int, int]] = []
    engine = HFRolloutEngine(model, tok, batch_size=4)
    engine.generate(
        prompts,
        n=3,
        temperature=1.0,
        max_new_tokens=2,
        seed=0,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(0, 9), (4, 9), (8, 9), (9, 9)]


def test_generation_restores_training_mode(tiny, prompts):
    model, tok = tiny
    model.train()
    try:
        HFRolloutEngine(model, tok).generate(prompts[:1], n=1, temperature=0, max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


def test_sync_weights_copies_into_a_separate_model(tiny, prompts):
    model, tok = tiny
    other = build_tiny_model(TinyModelConfig(), tok, seed=123)
    _scramble(other, seed=123)
    engine = HFRolloutEngine(other, tok)
    greedy = {"n": 1, "temperature": 0.0, "max_new_tokens": 8}
    reference = HFRolloutEngine(model, tok).generate(prompts, **greedy)
    assert _ids(engine.generate(prompts, **greedy)) != _ids(reference)
    engine.sync_weights(model)
    assert engine.model is other  # weights copied, model object kept
    assert _ids(engine.generate(prompts, **greedy)) == _ids(reference)


def test_sync_weights_with_the_shared_model_is_a_no_op(tiny, monkeypatch):
    model, tok = tiny
    engine = HFRolloutEngine(model, tok)
    monkeypatch.setattr(model, "load_state_dict", lambda *a, **k: pytest.fail("copied"))
    engine.sync_weights(model)


def test_engine_asleep_wakes_the_engine_even_when_the_step_fails(tiny, prompts, monkeypatch):
    """The trainer steps inside engine_asleep; a step that raises must still give the engine
    its memory back, and an engine woken again generates as before."""
    model, tok = tiny
    engine = HFRolloutEngine(model, tok)
    greedy = {"n": 1, "temperature": 0.0, "max_new_tokens": 8}
    before = _ids(engine.generate(prompts, **greedy))
    calls: list[str] = []
    monkeypatch.setattr(engine, "sleep", lambda: calls.append("sleep"))
    monkeypatch.setattr(engine, "wake", lambda: calls.append("wake"))
    with pytest.raises(RuntimeError, match="step failed"), engine_asleep(engine):
        assert calls == ["sleep"]
        raise RuntimeError("step failed")
    assert calls == ["sleep", "wake"]
    assert _ids(engine.generate(prompts, **greedy)) == before


def _draws(weights: torch.Tensor, times: int) -> torch.Tensor:
    """How often each entry of the one-row `weights` was drawn, in `times` draws."""
    drawn = draw_index(weights.expand(times, -1).contiguous())
    return torch.bincount(drawn, minlength=weights.shape[1])


def test_draw_index_draws_each_entry_with_its_probability():
    """The sampler's two levels (a block, then an entry in it) give each entry its share: a
    chi-square test on entries spread over three blocks, the last one partial; entries of
    weight 0 are never drawn, and a row's scale does not matter."""
    torch.manual_seed(0)
    weights = torch.zeros(1, 2500)  # blocks of 1024: 0-1023, 1024-2047 and a partial 2048-2499
    chosen = [0, 7, 1023, 1024, 2047, 2048, 2499]
    weights[0, chosen] = torch.tensor([0.05, 0.2, 0.1, 0.15, 0.05, 0.25, 0.2]) * 3.0
    times = 20_000
    counts = _draws(weights, times)
    assert int(counts.sum()) == times
    assert set(counts.nonzero().flatten().tolist()) <= set(chosen)
    expected = weights[0, chosen] / weights.sum() * times
    chi2 = float(((counts[chosen] - expected) ** 2 / expected).sum())
    assert chi2 < 22.5  # 6 degrees of freedom: P(chi2 > 22.5) = 0.001


def test_draw_index_never_runs_past_the_last_weighted_entry(monkeypatch):
    """A uniform draw that rounds up to the row's total lands on the last entry with a weight
    (in each level), not on the zeros after it or one past the end."""
    weights = torch.zeros(2, 3000)
    weights[0, [3, 10]] = 1.0  # the rest of block 0 and blocks 1-2 weigh nothing
    weights[1, [5, 1030]] = 1.0
    monkeypatch.setattr(torch, "rand", torch.ones)  # u == total, at both levels
    assert draw_index(weights).tolist() == [10, 1030]


def test_sample_next_matches_softmax_and_stays_in_the_nucleus():
    """Plain sampling follows softmax(logits / T); top_p keeps to the smallest prefix of the
    sorted distribution whose mass reaches p."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    times = 20_000
    drawn = sample_next(logits.expand(times, -1), temperature=0.5, top_p=1.0)
    counts = torch.bincount(drawn, minlength=5).float()
    expected = torch.softmax(logits[0] / 0.5, dim=-1) * times
    seen = expected > 5
    chi2 = float(((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum())
    assert chi2 < 16.3  # <= 3 degrees of freedom: P(chi2 > 16.3) = 0.001
    # softmax(logits): 0.644, 0.237, 0.087, ...: a 0.85 nucleus holds the first two tokens
    nucleus = sample_next(logits.expand(times, -1), temperature=1.0, top_p=0.85)
    assert set(nucleus.tolist()) == {0, 1}
    assert sample_next(logits, temperature=0.0, top_p=1.0).tolist() == [0]


def test_split_response_when_pad_is_eos():
    # SmolLM2's pad token is its eos: padding after a finished row looks like more eos tokens.
    assert split_response([5, 6, 2, 2, 2], [2]) == ([5, 6, 2], "eos")
    assert split_response([5, 6, 7], [2]) == ([5, 6, 7], "length")
    assert split_response([9, 5], [2, 9]) == ([9], "eos")


def test_default_stop_ids_include_chatml_end(tiny):
    model, tok = tiny
    assert default_stop_token_ids(tok, model) == [tok.convert_tokens_to_ids("<|im_end|>")]


# --------------------------------------------------------------------------- SmolLM2 (slow)


@pytest.fixture(scope="module")
def smollm2():
    try:
        model_dir = smollm2_dir()  # converted once, then cached on disk
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return load_policy(ModelConfig(source="hf", name_or_path=str(model_dir)))


@pytest.mark.slow
def test_smollm2_sampling(smollm2):
    model, tok = smollm2
    prompts = _chat_prompts(tok, ["What is 2+3?", "Name a colour."])
    engine = HFRolloutEngine(model, tok, batch_size=4)
    groups = engine.generate(prompts, n=2, temperature=1.0, max_new_tokens=16, seed=0)
    _check_invariants(groups, prompts, tok, 2, 16, engine.stop_token_ids)
    assert groups[0][0].response_ids != groups[0][1].response_ids


@pytest.mark.slow
def test_smollm2_greedy_answers_and_stops_on_im_end(smollm2):
    model, tok = smollm2
    prompts = _chat_prompts(tok, ["What is 2+3?", "Name one primary colour, in one word."])
    engine = HFRolloutEngine(model, tok)
    together = engine.generate(prompts, n=1, temperature=0.0, max_new_tokens=24)
    first = together[0][0]
    assert first.finish_reason == "eos" and first.response_ids[-1] == tok.eos_token_id
    assert "5" in first.text and "<|im_end|>" not in first.text
    # Left padding (the prompts differ in length) leaves each greedy answer unchanged.
    alone = engine.generate(prompts[1:], n=1, temperature=0.0, max_new_tokens=24)
    assert alone[0][0].response_ids == together[1][0].response_ids


def test_shared_prefill_samples_as_one_prefill_per_row(tiny, prompts):
    """model.share_prompts: a prompt's n rows share one prefill and then sample apart; the
    samples are those of a prefill per row, greedy and sampled alike (same seed)."""
    model, tok = tiny
    for settings in (
        {"n": 3, "temperature": 0.0, "max_new_tokens": 8},
        {"n": 4, "temperature": 1.0, "max_new_tokens": 8, "seed": 7},
    ):
        per_row = HFRolloutEngine(model, tok).generate(prompts, **settings)
        shared = HFRolloutEngine(model, tok, share_prompts=True).generate(prompts, **settings)
        assert _ids(shared) == _ids(per_row)
    # The rows of one prompt do sample apart (the copied cache is not shared state).
    sampled = _ids(HFRolloutEngine(model, tok, share_prompts=True).generate(prompts, **settings))
    assert any(len({tuple(ids) for ids in group}) > 1 for group in sampled)
