import random
import re

import pandas as pd
import pytest

from relift_core.config import WorldConfig
from relift_core.proofworld.problems import (
    FAMILIES,
    build_world,
    generate_problems,
    problem_to_record,
    record_to_problem,
    write_world,
)
from tests.conftest import add1_world

DEMO = re.compile(r"^<think>(?P<steps>[0-9+\-*= ]+)</think> \\boxed\{(?P<answer>\d+)\}$")
SMALL = WorldConfig(train_per_cell=4, eval_per_cell=3, pretrain_examples=200, seed=7)


def evaluate(expr: str) -> int:
    """Integer value of `a op b op c...` with * before +/- (the tests' own oracle, no eval)."""
    total, sign = 0, 1
    for tok in re.findall(r"[+-]|[^+-]+", expr):
        if tok in "+-":
            sign = 1 if tok == "+" else -1
        else:
            product = 1
            for factor in tok.split("*"):
                product *= int(factor)
            total += sign * product
    return total


def test_same_seed_same_world_other_seed_other_world():
    assert build_world(SMALL) == build_world(SMALL)
    assert build_world(SMALL) != build_world(SMALL.model_copy(update={"seed": 8}))
    a = generate_problems("add", 2, 5, random.Random(3))
    assert a == generate_problems("add", 2, 5, random.Random(3))


def test_splits_are_disjoint_and_sized_from_the_config():
    world = build_world(SMALL)
    questions = {split: {p.question for p in ps} for split, ps in world.items()}
    assert not questions["train"] & questions["eval"]
    assert not questions["eval"] & questions["pretrain"]
    assert not questions["train"] & questions["pretrain"]
    cells = len(SMALL.families) * len(SMALL.sizes)
    assert len(world["train"]) == cells * SMALL.train_per_cell
    assert len(world["eval"]) == cells * SMALL.eval_per_cell
    assert len(world["pretrain"]) == SMALL.pretrain_examples
    assert {(p.family, p.size) for p in world["pretrain"]} <= {
        (f, s) for f in SMALL.pretrain_families for s in SMALL.pretrain_sizes
    }
    assert len({p.uid for p in world["train"] + world["eval"]}) == cells * 7


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("size", [1, 2, 3])
def test_demonstrations_are_short_correct_and_well_formed(family, size):
    for p in generate_problems(family, size, 40, random.Random(size)):
        m = DEMO.match(p.demonstration)
        assert m, p.demonstration
        assert m["answer"] == p.answer == str(evaluate(p.question))
        assert len(p.demonstration) <= 80
        for step in m["steps"].split(" "):  # every scratchpad fact is true
            lhs, rhs = step.split("=")
            assert evaluate(lhs) == int(rhs), (p.question, step)


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown family"):
        generate_problems("div", 1, 1, random.Random(0))


def test_records_round_trip_through_parquet_in_verl_layout(tmp_path):
    paths = write_world(SMALL, tmp_path)
    assert set(paths) == {"train", "eval", "pretrain"}
    assert not list(tmp_path.glob(".*tmp*"))
    world = build_world(SMALL)
    df = pd.read_parquet(paths["train"])
    assert list(df.columns) == [
        "data_source",
        "prompt",
        "ability",
        "reward_model",
        "extra_info",
        "target",
    ]
    row = df.iloc[0].to_dict()
    row["prompt"] = [dict(m) for m in row["prompt"]]
    first = world["train"][0]
    assert row["data_source"] == f"world/{first.family}/{first.size}"
    assert row["prompt"] == [{"role": "user", "content": first.question}]
    assert row["reward_model"] == {"ground_truth": first.answer, "style": "rule"}
    assert row["extra_info"]["split"] == "train" and row["extra_info"]["index"] == 0
    assert record_to_problem(row) == first
    assert len(pd.read_parquet(paths["pretrain"])) == SMALL.pretrain_examples


def test_system_prompt_goes_first():
    p = generate_problems("mul", 1, 1, random.Random(0))[0]
    record = problem_to_record(p, "Think, then box the answer.")
    assert [m["role"] for m in record["prompt"]] == ["system", "user"]


def test_exhausted_pretraining_cell_is_dropped_quickly_with_a_warning():
    # Training and evaluation take all 100 of the cell's questions: none is left to pretrain on.
    cfg = add1_world(train_per_cell=60, eval_per_cell=40, pretrain_examples=500)
    with pytest.warns(UserWarning, match="pretraining"):
        world = build_world(cfg)
    assert world["pretrain"] == [] and len(world["train"]) + len(world["eval"]) == 100


def test_long_answer_holdout_keeps_every_longer_answer_out_of_pretraining():
    """The demo's gap: pretraining never shows an add or mul answer longer than its operands
    (7+8=15, 7*8=56, 47+58=105), while train questions with one stay in the world."""
    cfg = WorldConfig(
        cells=["add/2"],
        train_per_cell=64,
        eval_per_cell=16,
        pretrain_cells={"add/1": 1.0, "mul/1": 1.0, "add/2": 1.0, "mul/2": 1.0, "sub/2": 1.0},
        pretrain_holdout=["long_answer"],
        pretrain_examples=1500,
        seed=3,
    )
    world = build_world(cfg)
    pretrain = world["pretrain"]
    assert {(p.family, p.size) for p in pretrain} == {
        ("add", 1),
        ("mul", 1),
        ("add", 2),
        ("mul", 2),
        ("sub", 2),
    }
    assert not [p for p in pretrain if p.family in ("add", "mul") and len(p.answer) > p.size]
    assert any(len(p.answer) > p.size for p in world["train"])  # what the demos must teach


@pytest.mark.parametrize("style", ["last_digit_slip", "miscopy"])
def test_pretraining_noise_changes_only_answers_in_its_style(style):
    cfg = WorldConfig(
        cells=["sub/2"],
        train_per_cell=8,
        eval_per_cell=8,
        pretrain_cells={"add/2": 1.0, "sub/2": 1.0},
        pretrain_noise=0.3,
        pretrain_noise_style=style,
        pretrain_examples=2000,
        seed=5,
    )
    pretrain = build_world(cfg)["pretrain"]
    wrong = 0
    for p in pretrain:
        truth = str(evaluate(p.question))
        m = DEMO.match(p.demonstration)
        assert m and m["answer"] == p.answer  # the demonstration boxes the (noisy) answer
        if p.answer == truth:
            continue
        wrong += 1
        assert len(p.answer) == len(truth)
        if style == "last_digit_slip":  # always the same slip: the last digit one too high
            assert p.answer[:-1] == truth[:-1]
            assert int(p.answer[-1]) == (int(truth[-1]) + 1) % 10
        else:  # one digit, anywhere, replaced by another
            assert sum(a != b for a, b in zip(p.answer, truth, strict=True)) == 1
    assert 0.25 < wrong / len(pretrain) < 0.35
