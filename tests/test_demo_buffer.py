import json

import pytest

from relift_core.demo_buffer import DemoBuffer, DemoEntry


def entry(uid: str, iteration: int = 0) -> DemoEntry:
    prompt = ({"role": "system", "content": "think"}, {"role": "user", "content": f"q {uid}"})
    return DemoEntry(uid, prompt, f"<think>...</think> \\boxed{{{uid}}}", iteration, "hardest")


def test_fills_to_threshold_then_takes_oldest_first():
    buffer = DemoBuffer(threshold=3)
    for i, uid in enumerate("abcd"):
        assert buffer.add(entry(uid, i))
        assert buffer.ready == (i >= 2)
    assert len(buffer) == 4
    assert [e.uid for e in buffer.take()] == ["a", "b", "c"]
    assert len(buffer) == 1 and not buffer.ready
    assert buffer.total_added == 4 and buffer.total_taken == 3


def test_take_k_and_errors():
    buffer = DemoBuffer(threshold=2)
    with pytest.raises(RuntimeError, match="not ready"):
        buffer.take()
    with pytest.raises(ValueError):
        buffer.take(1)  # nothing to take
    for uid in "abc":
        buffer.add(entry(uid))
    assert [e.uid for e in buffer.take(1)] == ["a"]
    with pytest.raises(ValueError):
        buffer.take(3)
    with pytest.raises(ValueError):
        buffer.take(0)
    assert [e.uid for e in buffer.take(2)] == ["b", "c"]
    with pytest.raises(ValueError):
        DemoBuffer(threshold=0)


def test_an_explicit_k_drains_a_buffer_below_threshold():
    buffer = DemoBuffer(threshold=128)  # the SFT baseline takes whatever was collected
    buffer.add(entry("a"))
    buffer.add(entry("b"))
    assert not buffer.ready and [e.uid for e in buffer.take(2)] == ["a", "b"]
    assert buffer.total_taken == 2


def test_peek_leaves_entries_in_place():
    buffer = DemoBuffer(threshold=2)
    for uid in "abc":
        buffer.add(entry(uid))
    assert buffer.peek() == buffer.peek(2) == [entry("a"), entry("b")]
    assert len(buffer) == 3 and buffer.total_taken == 0
    assert buffer.take() == [entry("a"), entry("b")]
    with pytest.raises(RuntimeError):
        buffer.peek()


def test_prompt_and_level_are_normalised():
    from relift_core.difficulty import Level

    e = DemoEntry("a", [{"role": "user", "content": "q"}], "d", 0, Level.HARDEST)
    assert e.prompt == ({"role": "user", "content": "q"},) and e.level_when_added == "hardest"
    assert type(e.level_when_added) is str


def test_a_uid_already_waiting_is_skipped_but_may_return_after_take():
    buffer = DemoBuffer(threshold=2)
    assert buffer.add(entry("a", 0))
    assert not buffer.add(entry("a", 1))  # still hardest one step later, still waiting
    assert len(buffer) == 1 and buffer.total_added == 1 and buffer.total_skipped == 1
    buffer.add(entry("b", 1))
    buffer.take()
    assert buffer.add(entry("a", 5))  # fine-tuned on once; failed again later: collected again
    assert buffer.total_added == 3


def test_state_dict_round_trips_exactly():
    buffer = DemoBuffer(threshold=3)
    for i, uid in enumerate("abcde"):
        buffer.add(entry(uid, i))
    buffer.add(entry("e", 9))
    buffer.take()
    state = json.loads(json.dumps(buffer.state_dict()))
    restored = DemoBuffer.from_state_dict(state)
    assert restored.state_dict() == buffer.state_dict()
    assert restored.threshold == 3 and len(restored) == 2
    assert (restored.total_added, restored.total_taken, restored.total_skipped) == (5, 3, 1)
    assert not restored.add(entry("d"))  # the waiting set is restored too
    restored.add(entry("f", 7))
    assert restored.take() == [entry("d", 3), entry("e", 4), entry("f", 7)]

    other = DemoBuffer(threshold=128)
    other.add(entry("zz"))
    other.load_state_dict(state)  # replaces, does not merge
    assert other.state_dict() == buffer.state_dict()
    with pytest.raises(ValueError):
        DemoBuffer.from_state_dict({**state, "version": 2})
