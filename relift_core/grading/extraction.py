"""Reading a model's answer out of its response: pure Python, no sympy, linear in the text.

The text after the last `</think>` is the answer part; maths answers are the content of the last
top-level `\\boxed{}`; multiple-choice answers are a letter from that box or from the last answer
line (`ANSWER: C`), whichever is later. `grader` decides whether what is read here is correct.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

AnswerType = Literal["math", "choice"]

THINK_CLOSE = "</think>"

_CHOICE_SOURCE_PREFIXES = ("gpqa", "arc_c", "mmlu_pro")


# What a multiple-choice gold is: one letter A-J or digit 1-9, optionally in parentheses.
_CHOICE_LABEL = re.compile(r"\s*\(?\s*(?:[A-Ja-j]|[1-9])\s*\)?\s*")


def names_choice_source(data_source: str) -> bool:
    """gpqa*, arc_c*, mmlu_pro*: sets of multiple-choice questions. Only the last path
    component counts, so hub-style names ("Idavidrein/gpqa") work too."""
    return data_source.lower().rsplit("/", 1)[-1].startswith(_CHOICE_SOURCE_PREFIXES)


def is_choice_label(ground_truth: str) -> bool:
    return _CHOICE_LABEL.fullmatch(ground_truth) is not None


def answer_type_for(data_source: str, ground_truth: str | None = None) -> AnswerType:
    """Multiple choice for a question of a multiple-choice set (`names_choice_source`) whose
    gold is a choice label; everything else is maths.

    With the gold given, a name alone never forces letter grading: a numeric question under
    `data_source: gpqa_diamond` (`\\boxed{147}` against 147) is graded as maths, where letter
    grading would call every answer wrong. Data preparation warns about such rows."""
    if not names_choice_source(data_source):
        return "math"
    return "choice" if ground_truth is None or is_choice_label(ground_truth) else "math"


# --------------------------------------------------------------------------------------------
# Extraction (pure Python, runs in the caller; linear in the response length)
# --------------------------------------------------------------------------------------------


def answer_part(response: str) -> str | None:
    """The text after the last `</think>`, or None when there is no such tag."""
    cut = response.rfind(THINK_CLOSE)
    return None if cut < 0 else response[cut + len(THINK_CLOSE) :]


def reference_answer_text(response: str) -> str:
    """The text the ReLIFT reference's evaluation grades (eval_scripts/generate_vllm.py:69-73):
    after the first `</think>` up to the next one, else the whole response (the reference puts
    the `<think>` prefill back in front, so only the closing tag decides). No box needed:
    math-verify reads the answer out of that text."""
    parts = response.split(THINK_CLOSE)
    return parts[1] if len(parts) > 1 else response


# Box commands and braces, in one linear scan; escaped braces are content, not structure.
_BOX_OR_BRACE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])|\\[{}]|[{}]")


@dataclass(frozen=True)
class Boxed:
    content: str
    position: int  # where the box command starts, to order it against answer lines
    depth: int  # deepest brace nesting inside the box


def last_boxed(text: str) -> Boxed | None:
    """Content of the last top-level `\\boxed{...}` (or `\\fbox{...}`), braces balanced.

    Escaped braces (`\\{`, `\\}`) are content, not structure. A box inside a box is part of
    the outer box's content, not an answer of its own: `\\boxed{43 \\boxed{42}}` answers
    `43 \\boxed{42}` (refused later), never `42`. Returns None when there is no box, when the
    last box is not followed by a brace (`\\boxed 5`) or when it never closes (truncated)."""
    depth = 0
    outside: int | None = None  # the depth just outside the open top-level box
    command_start = command_end = -1  # a top-level box command still waiting for its brace
    open_brace = deepest = 0
    last: Boxed | None = None
    for match in _BOX_OR_BRACE.finditer(text):
        token = match.group()
        if token in ("\\{", "\\}"):
            continue
        if token not in ("{", "}"):  # a box command
            if outside is None:
                command_start, command_end = match.start(), match.end()
                last = None  # a later box replaces every earlier one, even if it is broken
            continue
        if token == "{":
            if command_start >= 0:
                if not text[command_end : match.start()].strip():
                    outside, open_brace, deepest = depth, match.start(), 0
                    start = command_start
                command_start = -1
            depth += 1
            if outside is not None:
                deepest = max(deepest, depth - outside)
        else:
            depth -= 1
            if outside is not None and depth == outside:
                last = Boxed(text[open_brace + 1 : match.start()], start, deepest - 1)
                outside = None
    if command_start >= 0 or outside is not None:
        return None  # the last box never opens, or never closes
    return last


# Linear time: every quantifier is possessive (`*+`), so after a failed attempt the engine
# never re-splits a run of spaces between them. With plain `\s*` next to `[\s...]*` and `\s*`,
# `"answer" + " " * 40000 + "!"` took 19 s (each split of the spaces was tried). Each attempt
# starts at a literal "answer" and reads only the run of separators after it, so the whole
# scan is linear in the text.
_ANSWER_LINE = re.compile(
    r"(?i:answer)(?:\s*+(?i:is))?[\s:*$(\[]*+(?:(?i:option|choice)\s*+)?"
    r"(?:\\text(?:bf)?\{|\\mathrm\{)?\s*+([A-J]|[1-9])(?!\w)"
)
# Inside a box: "C", "(C)", "C.", "C) the option's text".
_BOXED_CHOICE = re.compile(r"\(?([A-J]|[1-9])(?:[).:](?:\s.*)?)?", re.DOTALL)
_TEXT_WRAPPERS = ("\\text{", "\\textbf{", "\\mathrm{", "\\mathbf{")
# `\text{\text{C}}` is unwrapped this many times at most: each unwrapping copies the content,
# so unbounded nesting would be quadratic.
_MAX_UNWRAP = 3


def _choice_in_box(content: str) -> str | None:
    inner = content.strip()
    for _ in range(_MAX_UNWRAP):
        wrapper = next((w for w in _TEXT_WRAPPERS if inner.startswith(w)), None)
        if wrapper is None or not inner.endswith("}"):
            break
        inner = inner[len(wrapper) : -1].strip()
    letter = _BOXED_CHOICE.fullmatch(inner)
    return letter.group(1) if letter else None


def extract_choice(text: str) -> str | None:
    """The chosen letter (or digit): from the last box or the last answer line, whichever is
    later in the text."""
    candidates: list[tuple[int, str]] = []
    box = last_boxed(text)
    if box is not None and (letter := _choice_in_box(box.content)) is not None:
        candidates.append((box.position, letter))
    lines = list(_ANSWER_LINE.finditer(text))
    if lines:
        candidates.append((lines[-1].start(), lines[-1].group(1)))
    return max(candidates)[1] if candidates else None


def normalize_choice(ground_truth: str) -> str:
    """`"C"`, `" c "`, `"(C)"` -> `"C"`."""
    return ground_truth.strip().strip("()").strip().upper()
