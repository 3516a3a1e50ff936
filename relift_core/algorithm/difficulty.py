"""Question difficulty from the current policy's accuracy over its n rollouts, and its history.

The paper's bands: hardest acc = 0 (the questions whose demonstrations ReLIFT fine-tunes on),
hard 0 < acc <= 0.25, medium 0.25 < acc < 0.75, easy acc >= 0.75. The ledger keeps every
(iteration, accuracy, level) a question was seen at, so the analysis can show how questions move
between levels as training goes on, and a resumed run continues the same history.
"""

from __future__ import annotations

import bisect
from collections import Counter
from enum import StrEnum
from typing import Any

import pandas as pd


# StrEnum: equal to its value, and str()/format() give the value ("hard"), where (str, Enum)
# gave "Level.HARD" in f-strings on 3.12. Stored forms (ledger state, buffer rows) use .value.
class Level(StrEnum):
    HARDEST = "hardest"
    HARD = "hard"
    MEDIUM = "medium"
    EASY = "easy"


LEVELS: tuple[Level, ...] = (Level.HARDEST, Level.HARD, Level.MEDIUM, Level.EASY)  # hardest first


def level_for_accuracy(accuracy: float) -> Level:
    if not 0.0 <= accuracy <= 1.0:  # also rejects nan
        raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
    if accuracy == 0.0:
        return Level.HARDEST
    if accuracy <= 0.25:
        return Level.HARD
    if accuracy < 0.75:
        return Level.MEDIUM
    return Level.EASY


Record = tuple[int, float, Level]  # (iteration, accuracy, level)


class DifficultyLedger:
    """Per question, every (iteration, accuracy, level) it was classified at, by iteration."""

    def __init__(self) -> None:
        self._history: dict[str, list[Record]] = {}

    def record(self, iteration: int, uid: str, accuracy: float) -> Level:
        """Classify and remember. Recording the same (uid, iteration) again replaces the earlier
        record: a run resumed from a checkpoint may replay the iteration it crashed in."""
        level = level_for_accuracy(accuracy)
        history = self._history.setdefault(uid, [])
        entry = (iteration, float(accuracy), level)
        at = bisect.bisect_left(history, iteration, key=lambda r: r[0])
        if at < len(history) and history[at][0] == iteration:
            history[at] = entry
        else:
            history.insert(at, entry)
        return level

    def history(self, uid: str) -> list[Record]:
        """Every (iteration, accuracy, level) recorded for `uid`, in iteration order: the
        run's difficulty record, as its checkpoints keep it."""
        return list(self._history.get(uid, []))

    def __len__(self) -> int:
        return len(self._history)

    def __contains__(self, uid: object) -> bool:
        return uid in self._history

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable; floats survive JSON exactly (shortest round-trip repr)."""
        return {
            "version": 1,
            "history": {
                uid: [[it, acc, level.value] for it, acc, level in history]
                for uid, history in self._history.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != 1:
            raise ValueError(f"unsupported DifficultyLedger state version {state.get('version')!r}")
        history: dict[str, list[Record]] = {}
        for uid, records in state["history"].items():
            parsed = [(int(it), float(acc), Level(level)) for it, acc, level in records]
            history[uid] = sorted(parsed, key=lambda r: r[0])
        self._history = history

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DifficultyLedger:
        ledger = cls()
        ledger.load_state_dict(state)
        return ledger


def transition_table(before: dict[str, Level], after: dict[str, Level]) -> pd.DataFrame:
    """Counts of questions by level before (rows) and after (columns), over the uids in both.

    All four levels are always present, hardest first, so tables of different runs line up.
    """
    pairs = Counter(
        (Level(level_before), Level(after[uid]))
        for uid, level_before in before.items()
        if uid in after
    )
    labels = [level.value for level in LEVELS]
    counts = [[pairs[(row, col)] for col in LEVELS] for row in LEVELS]
    return pd.DataFrame(
        counts,
        index=pd.Index(labels, name="before"),
        columns=pd.Index(labels, name="after"),
        dtype="int64",
    )
