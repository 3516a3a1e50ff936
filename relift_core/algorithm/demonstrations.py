"""Where a hardest question's demonstration comes from (the DemonstrationSource seam).

- `DatasetDemonstrations`: the dataset's `target` column (OpenR1's R1 solutions in the paper).
- `TeacherDemonstrations`: a stronger model's answer, generated on demand through any
  RolloutEngine; it enters the buffer only if the Grader verifies it, so a wrong teacher answer
  never becomes training data.
"""

from __future__ import annotations

from typing import Protocol

from relift_core.data.examples import Example, render_prompt
from relift_core.grading.extraction import answer_type_for
from relift_core.grading.grader import BatchGrader
from relift_core.runtime.rollout import RolloutEngine


class DemonstrationSource(Protocol):
    def demonstrations(self, examples: list[Example]) -> list[str | None]:
        """One demonstration per example, or None where there is no good one."""
        ...

    def counts(self) -> dict[str, float]:
        """Running totals worth logging with each step's metrics (none for a dataset)."""
        ...


class DatasetDemonstrations:
    def demonstrations(self, examples: list[Example]) -> list[str | None]:
        return [ex.target or None for ex in examples]

    def counts(self) -> dict[str, float]:
        return {}


class TeacherDemonstrations:
    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer,
        grader: BatchGrader,
        *,
        attempts: int = 4,
        temperature: float = 0.6,
        max_new_tokens: int = 8192,
        require_think: bool = True,
    ):
        self.engine, self.tokenizer, self.grader = engine, tokenizer, grader
        self.attempts, self.temperature = attempts, temperature
        self.max_new_tokens, self.require_think = max_new_tokens, require_think
        self.verified = 0  # teacher answers the grader accepted (and so entered the buffer)
        self.rejected = 0  # questions none of whose `attempts` answers was right

    def demonstrations(self, examples: list[Example]) -> list[str | None]:
        if not examples:
            return []
        prompts = [render_prompt(self.tokenizer, list(ex.prompt)) for ex in examples]
        groups = self.engine.generate(
            prompts,
            n=self.attempts,
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
        )
        out: list[str | None] = []
        for ex, group in zip(examples, groups, strict=True):
            texts = [s.text for s in group]
            answer_type = answer_type_for(ex.data_source, ex.ground_truth)
            grades = self.grader.grade(
                texts, [ex.ground_truth] * len(texts), answer_type, self.require_think
            )
            # The first verified answer; a question the teacher cannot solve gets none.
            chosen = next((t for t, g in zip(texts, grades, strict=True) if g.correct), None)
            self.verified += chosen is not None
            self.rejected += chosen is None
            out.append(chosen)
        return out

    def counts(self) -> dict[str, float]:
        return {"teacher_verified": float(self.verified), "teacher_rejected": float(self.rejected)}
