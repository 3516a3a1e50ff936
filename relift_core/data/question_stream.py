"""The data-loader position: which questions the next iteration trains on.

Epochs are seeded permutations of the question indices, so the position is two integers
(epoch, offset) and a resumed run draws exactly the questions the crashed run would have.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class QuestionStream:
    size: int
    seed: int
    shuffle: bool = True
    epoch: int = 0
    offset: int = 0

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError("QuestionStream needs at least one question")

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
        return order

    def next_indices(self, k: int) -> list[int]:
        """The next k question indices, wrapping into a new epoch; advances the position."""
        out: list[int] = []
        while len(out) < k:
            order = self._order(self.epoch)
            take = order[self.offset : self.offset + (k - len(out))]
            out.extend(take)
            self.offset += len(take)
            if self.offset >= self.size:
                self.epoch, self.offset = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"size": self.size, "seed": self.seed, "epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["size"] != self.size or state["seed"] != self.seed:
            raise ValueError(
                f"data position was saved for {state['size']} questions (seed {state['seed']}), "
                f"but this run has {self.size} (seed {self.seed}): the training set changed"
            )
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
