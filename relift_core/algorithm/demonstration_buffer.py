"""ReLIFT's buffer of demonstrations for the questions the policy failed on every rollout.

Two orders, chosen by `algorithm.sft_buffer_order`:

- `newest` (the paper's reference code, the default): each iteration's new entries go in front
  of the buffer and a fine-tuning step takes the first k, i.e. the most recently failed
  questions; older entries wait behind them. When to take and how many (the buffer threshold)
  is the Strategy's decision, not the buffer's.
- `oldest`: first in, first out.

The buffer is part of a checkpoint, so its state round-trips through JSON exactly (entries,
order, counters).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal

BufferOrder = Literal["newest", "oldest"]


@dataclass(frozen=True)
class DemoEntry:
    uid: str
    prompt: tuple[dict[str, str], ...]  # chat messages, as in data.Example
    demonstration: str  # the assistant's text to fine-tune on
    iteration_added: int
    level_when_added: str  # a difficulty.Level value ("hardest" in ReLIFT)

    def __post_init__(self) -> None:
        # Callers may pass a list of messages; one form keeps equality and round trips exact.
        object.__setattr__(self, "prompt", tuple(dict(m) for m in self.prompt))
        object.__setattr__(
            self,
            "level_when_added",
            str(getattr(self.level_when_added, "value", self.level_when_added)),
        )


class DemoBuffer:
    def __init__(self, order: BufferOrder = "newest") -> None:
        if order not in ("newest", "oldest"):
            raise ValueError(f"order must be 'newest' or 'oldest', got {order!r}")
        self.order = order
        self._entries: deque[DemoEntry] = deque()
        self._waiting: set[str] = set()
        self.total_added = 0
        self.total_taken = 0
        self.total_skipped = 0  # adds refused because the uid was already waiting

    def add(self, entry: DemoEntry) -> bool:
        """Queue a demonstration; False (and nothing queued) if its uid is already waiting.

        A question that stays hardest across several RL steps before the buffer fills would
        otherwise appear several times in one fine-tuning step, weighing it more than the others
        and inflating the count of demonstrations used. Once taken, the uid may be added again.
        """
        return bool(self.add_all([entry]))

    def add_all(self, entries: list[DemoEntry]) -> int:
        """Queue one iteration's demonstrations together (in front of the buffer with the
        `newest` order, keeping their own order); returns how many were queued."""
        fresh: list[DemoEntry] = []
        for entry in entries:
            if entry.uid in self._waiting:
                self.total_skipped += 1
                continue
            fresh.append(entry)
            self._waiting.add(entry.uid)
        if self.order == "newest":
            self._entries.extendleft(reversed(fresh))
        else:
            self._entries.extend(fresh)
        self.total_added += len(fresh)
        return len(fresh)

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, k: int) -> list[DemoEntry]:
        """The entries `take(k)` would return, left in place: a fine-tuning step that may fail
        and be retried reads them first and takes them only once it succeeded."""
        return list(islice(self._entries, self._batch_size(k)))

    def take(self, k: int) -> list[DemoEntry]:
        """Remove and return the first `k` entries (the newest or the oldest, by `order`);
        0 < k <= len. When to take and how many is the Strategy's decision, not the buffer's."""
        taken = [self._entries.popleft() for _ in range(self._batch_size(k))]
        self._waiting.difference_update(e.uid for e in taken)
        self.total_taken += len(taken)
        return taken

    def _batch_size(self, k: int) -> int:
        if not 0 < k <= len(self._entries):
            raise ValueError(f"cannot take {k} entries from a buffer of {len(self)}")
        return k

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "order": self.order,
            "entries": [
                {
                    "uid": e.uid,
                    "prompt": [dict(m) for m in e.prompt],
                    "demonstration": e.demonstration,
                    "iteration_added": e.iteration_added,
                    "level_when_added": e.level_when_added,
                }
                for e in self._entries
            ],
            "total_added": self.total_added,
            "total_taken": self.total_taken,
            "total_skipped": self.total_skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore exactly: a resumed run continues with the same entries in the same order.
        (States written before the buffer stopped keeping the threshold carry a "threshold"
        key; it is ignored: the threshold is the config's.)"""
        if state.get("version") != 1:
            raise ValueError(f"unsupported DemoBuffer state version {state.get('version')!r}")
        entries = [
            DemoEntry(
                uid=e["uid"],
                prompt=tuple(dict(m) for m in e["prompt"]),
                demonstration=e["demonstration"],
                iteration_added=int(e["iteration_added"]),
                level_when_added=e["level_when_added"],
            )
            for e in state["entries"]
        ]
        if len({e.uid for e in entries}) != len(entries):
            raise ValueError("DemoBuffer state holds a uid twice")
        self.order = state.get("order", "oldest")  # version-1 states before `order` were FIFO
        self._entries = deque(entries)
        self._waiting = {e.uid for e in entries}
        self.total_added = int(state["total_added"])
        self.total_taken = int(state["total_taken"])
        self.total_skipped = int(state["total_skipped"])

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DemoBuffer:
        buffer = cls(state.get("order", "oldest"))
        buffer.load_state_dict(state)
        return buffer
