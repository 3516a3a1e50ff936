import json

import pytest

from relift_core.algorithm.demonstration_buffer import DemoBuffer, DemoEntry


def entry(uid: str, iteration: int = 0) -> DemoEntry:
    prompt = ({"role": "system", "content": "think"}, {"role": "user", "content": f"q {uid}"})
    return DemoEntry(uid, prompt, f"<think>...</think> \\boxed{{{uid}}}", iteration, "hardest")


def uids(entries) -> list[str]:
    return [e.uid for e in entries]


def test_newest_order_puts_each_iterations_entries_in_front():
    """The paper's reference code: new entries are prepended, a step slices the front."""
    buffer = DemoBuffer()
    assert buffer.order == "newest"
    assert buffer.add_all([entry("a", 0), entry("b", 0)]) == 2
    assert buffer.add_all([entry("c", 1), entry("d", 1)]) == 2
    assert uids(buffer.peek(4)) == ["c", "d", "a", "b"]  # iteration 1 first, in its own order
    assert uids(buffer.take(3)) == ["c", "d", "a"]
    assert uids(buffer.peek(1)) == ["b"]  # the oldest waits
    assert buffer.total_added == 4 and buffer.total_taken == 3


def test_oldest_order_is_first_in_first_out():
    buffer = DemoBuffer(order="oldest")
    buffer.add_all([entry("a", 0), entry("b", 0)])
    buffer.add_all([entry("c", 1), entry("d", 1)])
    assert uids(buffer.take(3)) == ["a", "b", "c"]
    assert len(buffer) == 1


def test_take_k_and_errors():
    buffer = DemoBuffer(order="oldest")
    with pytest.raises(ValueError):
        buffer.take(1)  # nothing to take
    for uid in "abc":
        buffer.add(entry(uid))
    assert uids(buffer.take(1)) == ["a"]
    with pytest.raises(ValueError):
        buffer.take(3)
    with pytest.raises(ValueError):
        buffer.take(0)
    assert uids(buffer.take(2)) == ["b", "c"]
    with pytest.raises(ValueError, match="order"):
        DemoBuffer(order="random")


def test_peek_leaves_entries_in_place():
    buffer = DemoBuffer(order="oldest")
    for uid in "abc":
        buffer.add(entry(uid))
    assert buffer.peek(2) == [entry("a"), entry("b")]
    assert len(buffer) == 3 and buffer.total_taken == 0
    assert buffer.take(2) == [entry("a"), entry("b")]


def test_prompt_and_level_are_normalised():
    from relift_core.algorithm.difficulty import Level

    e = DemoEntry("a", [{"role": "user", "content": "q"}], "d", 0, Level.HARDEST)
    assert e.prompt == ({"role": "user", "content": "q"},) and e.level_when_added == "hardest"
    assert type(e.level_when_added) is str


@pytest.mark.parametrize("order", ["newest", "oldest"])
def test_a_uid_already_waiting_is_skipped_but_may_return_after_take(order):
    buffer = DemoBuffer(order=order)
    assert buffer.add(entry("a", 0))
    assert not buffer.add(entry("a", 1))  # still hardest one step later, still waiting
    assert len(buffer) == 1 and buffer.total_added == 1 and buffer.total_skipped == 1
    buffer.add(entry("b", 1))
    buffer.take(2)
    assert buffer.add(entry("a", 5))  # fine-tuned on once; failed again later: collected again
    assert buffer.total_added == 3


@pytest.mark.parametrize("order", ["newest", "oldest"])
def test_state_dict_round_trips_exactly(order):
    buffer = DemoBuffer(order=order)
    for i, uid in enumerate("abcde"):
        buffer.add(entry(uid, i))
    buffer.add(entry("e", 9))
    taken = buffer.take(3)
    state = json.loads(json.dumps(buffer.state_dict()))
    restored = DemoBuffer.from_state_dict(state)
    assert restored.state_dict() == buffer.state_dict()
    assert restored.order == order and len(restored) == 2
    # a checkpoint written while the buffer still kept the threshold loads the same
    assert DemoBuffer.from_state_dict({**state, "threshold": 3}).state_dict() == state
    assert (restored.total_added, restored.total_taken, restored.total_skipped) == (5, 3, 1)
    waiting = uids(restored.peek(2))
    assert not restored.add(entry(waiting[0]))  # the waiting set is restored too
    restored.add(entry("f", 7))
    expected = ["f", *uids(buffer.peek(2))] if order == "newest" else [*uids(buffer.peek(2)), "f"]
    assert uids(restored.take(3)) == expected
    assert not set(uids(taken)) & set(expected)

    other = DemoBuffer()
    other.add(entry("zz"))
    other.load_state_dict(state)  # replaces, does not merge
    assert other.state_dict() == buffer.state_dict()
    with pytest.raises(ValueError):
        DemoBuffer.from_state_dict({**state, "version": 2})
