import json
import pickle

import pytest

from relift_core.algorithm.difficulty import (
    LEVELS,
    DifficultyLedger,
    Level,
    level_for_accuracy,
    transition_table,
)


@pytest.mark.parametrize(
    ("accuracy", "level"),
    [
        (0.0, Level.HARDEST),
        (1 / 8, Level.HARD),
        (0.25, Level.HARD),
        (0.26, Level.MEDIUM),
        (3 / 8, Level.MEDIUM),
        (0.5, Level.MEDIUM),
        (5 / 8, Level.MEDIUM),
        (0.7499, Level.MEDIUM),
        (0.75, Level.EASY),
        (1.0, Level.EASY),
        (1, Level.EASY),
    ],
)
def test_paper_bands(accuracy, level):
    assert level_for_accuracy(accuracy) is level


@pytest.mark.parametrize("accuracy", [-0.01, 1.01, float("nan")])
def test_classify_rejects_accuracy_outside_unit_interval(accuracy):
    with pytest.raises(ValueError):
        level_for_accuracy(accuracy)


def test_a_level_serves_as_its_name_in_reports():
    """The reports, tables and results.json use Level members where strings stood (dict keys
    looked up by name, table headers, JSON keys): a Level must behave as its name there."""
    assert [f"{lv}" for lv in LEVELS] == ["hardest", "hard", "medium", "easy"]  # hardest first
    by_level = {lv: i for i, lv in enumerate(LEVELS)}
    assert by_level["hard"] == 1 and json.loads(json.dumps(by_level)) == {
        "hardest": 0,
        "hard": 1,
        "medium": 2,
        "easy": 3,
    }
    assert f"frac_{Level.HARD}" == "frac_hard" and Level("easy") is Level.EASY
    # a pickled Level (Prefect results, process pools) comes back as the same member
    assert pickle.loads(pickle.dumps(Level.MEDIUM)) is Level.MEDIUM
    assert json.dumps({"level": Level.HARD}) == '{"level": "hard"}'


def make_ledger() -> DifficultyLedger:
    ledger = DifficultyLedger()
    assert ledger.record(0, "q1", 0.0) is Level.HARDEST
    ledger.record(0, "q2", 0.5)
    ledger.record(0, "q3", 1.0)
    ledger.record(2, "q1", 0.125)
    ledger.record(2, "q2", 0.875)
    ledger.record(3, "q4", 0.0)
    return ledger


def test_history_holds_each_record_in_order():
    ledger = make_ledger()
    assert ledger.history("q1") == [(0, 0.0, Level.HARDEST), (2, 0.125, Level.HARD)]
    assert ledger.history("nope") == []
    assert len(ledger) == 4 and "q4" in ledger and "nope" not in ledger


def test_rerecording_an_iteration_replaces_it_and_order_is_kept():
    ledger = make_ledger()
    ledger.record(2, "q1", 0.5)  # a resumed run replays iteration 2
    ledger.record(1, "q1", 1.0)  # recorded out of order: still sorted by iteration
    assert ledger.history("q1") == [
        (0, 0.0, Level.HARDEST),
        (1, 1.0, Level.EASY),
        (2, 0.5, Level.MEDIUM),
    ]


def test_transition_table():
    before = {"q1": Level.HARDEST, "q2": Level.MEDIUM, "q3": Level.EASY}
    after = {"q1": Level.HARD, "q2": Level.EASY, "q3": Level.EASY, "q4": Level.HARDEST}
    table = transition_table(before, after)
    assert list(table.index) == list(table.columns) == ["hardest", "hard", "medium", "easy"]
    assert table.index.name == "before" and table.columns.name == "after"
    assert table.loc["hardest", "hard"] == 1  # q1
    assert table.loc["medium", "easy"] == 1  # q2
    assert table.loc["easy", "easy"] == 1  # q3
    assert table.to_numpy().sum() == 3  # q4 is not in `before`
    empty = transition_table({}, {})
    assert empty.shape == (4, 4) and empty.to_numpy().sum() == 0
    assert transition_table({"a": "hard"}, {"a": "easy"}).loc["hard", "easy"] == 1


def test_state_dict_round_trips_through_json_exactly():
    ledger = make_ledger()
    ledger.record(4, "q5", 1 / 3)
    state = json.loads(json.dumps(ledger.state_dict()))
    restored = DifficultyLedger.from_state_dict(state)
    for uid in ("q1", "q2", "q3", "q4", "q5"):
        assert restored.history(uid) == ledger.history(uid)
    assert restored.history("q5")[0][1] == 1 / 3
    assert restored.state_dict() == ledger.state_dict()
    other = DifficultyLedger()
    other.record(0, "zz", 0.5)
    other.load_state_dict(state)  # replaces, does not merge
    assert "zz" not in other and other.state_dict() == ledger.state_dict()
    with pytest.raises(ValueError):
        DifficultyLedger.from_state_dict({"version": 99, "history": {}})
