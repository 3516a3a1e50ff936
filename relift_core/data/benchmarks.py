"""The evaluation benchmarks the paper reports, as a registry of specs, and how to load one.

A benchmark is a set of unique questions plus how many samples to draw per question (k). The
paper's sets come in the verl/LUFFY parquet layout, several per file, told apart by
`data_source`; AIME and AMC rows repeat each question 32 times (verl draws avg@32 that way).
Here those repeats collapse into one question and k = 32 instead, so an engine is asked for
32 samples of one prompt (one prefill, and resumable per question).

Local files are found in a benchmarks directory: the `benchmarks_dir` argument, else the
RELIFT_BENCHMARKS_DIR environment variable. Nothing is bundled with the project; users point
at their own copies. MMLU-Pro is read from the Hugging Face hub (needs network).

Extension: `register_benchmark(spec)` adds a benchmark by name (the demo registers its
generated eval set as `world`), and `load_benchmark("some/file.parquet")` loads any local
verl-layout file as a one-off benchmark.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from relift_core.data.examples import Example, examples_from_records, load_examples
from relift_core.errors import UserError
from relift_core.grading.extraction import AnswerType, answer_type_for

BenchmarkGroup = Literal["math", "ood", "custom"]

BENCHMARKS_DIR_ENV = "RELIFT_BENCHMARKS_DIR"
_LOCAL_SUFFIXES = (".parquet", ".jsonl")

# The system prompt of the verl/LUFFY evaluation files (identical in all three shared files);
# sets built here from raw rows (MMLU-Pro) get the same one, so every benchmark is asked alike.
SYSTEM_PROMPT = (
    "Your task is to follow a systematic, thorough reasoning process before providing the final "
    "solution. This involves analyzing, summarizing, exploring, reassessing, and refining your "
    "thought process through multiple iterations. Structure your response into two sections: "
    "Thought and Solution. In the Thought section, present your reasoning using the format: "
    '"<think>\n {thoughts} </think>\n". Each thought should include detailed analysis, '
    'brainstorming, verification, and refinement of ideas. After "</think>\n," in the Solution '
    "section, provide the final, logical, and accurate answer, clearly derived from the "
    "exploration in the Thought section. If applicable, include the answer in \\boxed{} for "
    "closed-form results like multiple choices or mathematical solutions."
)
# The user-turn wording of the GPQA / ARC-c files, reused for multiple-choice sets built here.
CHOICE_INSTRUCTION = (
    "Answer the following multiple choice question. The last line of your response should be of "
    "the following format: 'ANSWER: $LETTER' (without quotes) where LETTER is one of {letters}. "
    "Think step by step before answering."
)


class BenchmarkError(UserError, ValueError):
    """An unknown benchmark, or one whose data cannot be found; the message says what to do."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark's questions come from and how the paper evaluates it.

    `source` is a file name (`.parquet` / `.jsonl`; relative names are looked up in the
    benchmarks directory) or a Hugging Face dataset id. `data_source` keeps only the rows with
    that value (None: all rows). `answer_type` None means "decide per question from its
    data_source" (the grader's `answer_type_for`), for mixed sets such as the demo's.
    """

    name: str
    source: str
    data_source: str | None
    answer_type: AnswerType | None
    default_samples: int  # k of avg@k
    group: BenchmarkGroup
    in_paper_average: bool  # counted in the paper's headline average (see metrics.paper_averages)
    field_map: dict[str, str] = field(default_factory=dict)
    temperature: float = 0.6
    max_new_tokens: int = 8192
    split: str = "test"  # Hugging Face sources only
    # Hugging Face multiple-choice sets stored as question + option list (not verl layout):
    # the prompt is built from these two columns, the answer letter comes via `field_map`.
    question_column: str | None = None
    options_column: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.source).suffix.lower() in _LOCAL_SUFFIXES


@dataclass
class Benchmark:
    """A loaded benchmark: unique questions, and k samples to draw for each."""

    name: str
    spec: BenchmarkSpec
    questions: list[Example]
    samples: int

    def answer_type_for(self, question: Example) -> AnswerType:
        if self.spec.answer_type is not None:
            return self.spec.answer_type
        return answer_type_for(question.data_source, question.ground_truth)

    @property
    def data_sources(self) -> list[str]:
        """The data_source values present, in first-seen order (families of a mixed set)."""
        return list(dict.fromkeys(q.data_source for q in self.questions))


def _math(name: str, data_source: str, samples: int = 1, in_paper: bool = True) -> BenchmarkSpec:
    return BenchmarkSpec(
        name=name,
        source="math_valid.parquet",
        data_source=data_source,
        answer_type="math",
        default_samples=samples,
        group="math",
        in_paper_average=in_paper,
    )


def _local_choice(name: str, data_source: str, in_paper: bool) -> BenchmarkSpec:
    """A multiple-choice set stored as `<name>.parquet` in the benchmarks directory."""
    return BenchmarkSpec(
        name=name,
        source=f"{name}.parquet",
        data_source=data_source,
        answer_type="choice",
        default_samples=1,
        group="ood",
        in_paper_average=in_paper,
    )


# The paper (and LUFFY, whose files these are): avg@32 on AIME24/AIME25/AMC23, avg@1 elsewhere,
# temperature 0.6, 8192 new tokens. Its headline average is over AIME24, AMC, MATH-500, Minerva,
# OlympiadBench and GPQA-Diamond ("five competition-level benchmarks and one out-of-distribution
# benchmark"); AIME25, ARC-c and MMLU-Pro are reported beside it.
BUILTIN_BENCHMARKS: tuple[BenchmarkSpec, ...] = (
    _math("aime24", "aime", samples=32),
    _math("aime25", "aime25", samples=32, in_paper=False),
    _math("amc23", "amc", samples=32),
    _math("math500", "math"),
    _math("minerva", "minerva"),
    _math("olympiadbench", "olympiad_bench"),
    _local_choice("gpqa_diamond", "gpqa", in_paper=True),
    _local_choice("arc_c", "arc_c", in_paper=False),
    BenchmarkSpec(
        name="mmlu_pro",
        source="TIGER-Lab/MMLU-Pro",
        data_source="mmlu_pro",
        answer_type="choice",
        default_samples=1,
        group="ood",
        in_paper_average=False,
        split="test",
        field_map={"ground_truth": "answer", "uid": "question_id"},
        question_column="question",
        options_column="options",
    ),
)

_REGISTRY: dict[str, BenchmarkSpec] = {spec.name: spec for spec in BUILTIN_BENCHMARKS}


def register_benchmark(spec: BenchmarkSpec, *, replace_existing: bool = False) -> None:
    """Make `spec` loadable by name. Re-registering an identical spec is a no-op (idempotent
    for flows that register on every run); a different spec under a taken name needs
    `replace_existing=True`, so a typo cannot silently shadow a paper benchmark."""
    current = _REGISTRY.get(spec.name)
    if current is not None and current != spec and not replace_existing:
        raise BenchmarkError(
            f"benchmark {spec.name!r} is already registered with a different spec; "
            "pass replace_existing=True to replace it"
        )
    _REGISTRY[spec.name] = spec


def unregister_benchmark(name: str) -> None:
    """Remove a registered benchmark (tests; built-ins come back only by re-registering)."""
    _REGISTRY.pop(name, None)


def benchmark_names() -> list[str]:
    return list(_REGISTRY)


def get_spec(name: str) -> BenchmarkSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BenchmarkError(
            f"unknown benchmark {name!r}; known: {', '.join(_REGISTRY)} "
            "(or give a path to a .parquet/.jsonl file)"
        ) from None


def file_benchmark_spec(path: str | Path, name: str | None = None) -> BenchmarkSpec:
    """A one-off benchmark over every row of a local verl-layout file."""
    path = Path(path)
    return BenchmarkSpec(
        name=name or path.stem,
        source=str(path.resolve()),
        data_source=None,
        answer_type=None,
        default_samples=1,
        group="custom",
        in_paper_average=False,
    )


def resolve_benchmarks_dir(benchmarks_dir: str | Path | None = None) -> Path:
    """The argument, else $RELIFT_BENCHMARKS_DIR; an error saying how to set it otherwise."""
    chosen = benchmarks_dir or os.environ.get(BENCHMARKS_DIR_ENV)
    if not chosen:
        raise BenchmarkError(
            "no benchmarks directory: the evaluation sets are not bundled. Point at your copies "
            f"of the verl-layout files (math_valid.parquet, gpqa_diamond.parquet, arc_c.parquet) "
            f"with eval.benchmarks_dir=... or the {BENCHMARKS_DIR_ENV} environment variable"
        )
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise BenchmarkError(f"benchmarks directory {path} does not exist")
    return path


def load_benchmark(
    name: str | Path,
    benchmarks_dir: str | Path | None = None,
    limit: int | None = None,
) -> Benchmark:
    """Load a registered benchmark by name, or any local `.parquet`/`.jsonl` file by path.

    Questions are de-duplicated (same data_source, prompt and ground truth), keeping the first
    occurrence and its order; `limit` keeps the first `limit` unique questions. k is the spec's
    `default_samples`; for a file loaded by path whose questions all repeat r > 1 times, k = r
    (the verl convention for avg@r).
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    text = str(name)
    by_path = Path(text).suffix.lower() in _LOCAL_SUFFIXES and text not in _REGISTRY
    spec = file_benchmark_spec(text) if by_path else get_spec(text)

    rows = _load_rows(spec, benchmarks_dir)
    if spec.data_source is not None:
        rows = [ex for ex in rows if ex.data_source == spec.data_source]
        if not rows:
            raise BenchmarkError(
                f"benchmark {spec.name!r}: no rows with data_source {spec.data_source!r} "
                f"in {spec.source}"
            )
    questions, repeats = deduplicate(rows)
    samples = spec.default_samples
    if by_path and len(set(repeats)) == 1 and repeats[0] > 1:
        samples = repeats[0]
    if limit is not None:
        questions = questions[:limit]
    return Benchmark(name=spec.name, spec=spec, questions=questions, samples=samples)


def deduplicate(rows: list[Example]) -> tuple[list[Example], list[int]]:
    """Unique questions in first-seen order, and how many rows each one had."""
    first: dict[tuple[Any, ...], int] = {}
    counts: Counter[int] = Counter()
    unique: list[Example] = []
    for ex in rows:
        key = (ex.data_source, tuple((m["role"], m["content"]) for m in ex.prompt), ex.ground_truth)
        index = first.get(key)
        if index is None:
            index = first[key] = len(unique)
            unique.append(ex)
        counts[index] += 1
    return unique, [counts[i] for i in range(len(unique))]


def _load_rows(spec: BenchmarkSpec, benchmarks_dir: str | Path | None) -> list[Example]:
    if spec.is_local:
        path = Path(spec.source)
        if not path.is_absolute():
            path = resolve_benchmarks_dir(benchmarks_dir) / path
        if not path.is_file():
            raise BenchmarkError(f"benchmark {spec.name!r}: {path} not found")
        stat = path.stat()
        field_map = tuple(sorted(spec.field_map.items()))
        return list(_read_local(str(path.resolve()), stat.st_mtime_ns, stat.st_size, field_map))
    if spec.options_column is not None:
        return _load_hf_choice_rows(spec)
    examples = load_examples(spec.source, split=spec.split, field_map=spec.field_map or None)
    return [
        e if spec.data_source is None else replace(e, data_source=spec.data_source)
        for e in examples
    ]


# Six math benchmarks share one file: read it once per process (keyed on its mtime and size, so
# a replaced file is re-read). Examples are frozen; callers get a fresh list each time.
@functools.lru_cache(maxsize=8)
def _read_local(
    path: str, mtime_ns: int, size: int, field_map: tuple[tuple[str, str], ...]
) -> tuple[Example, ...]:
    return tuple(load_examples(path, field_map=dict(field_map) or None))


def _load_hf_choice_rows(spec: BenchmarkSpec) -> list[Example]:
    import datasets  # lazily: slow to import, and only this path needs it

    try:
        raw = datasets.load_dataset(spec.source, split=spec.split)
    except Exception as e:  # network, auth, a renamed dataset: say which benchmark failed
        raise BenchmarkError(f"benchmark {spec.name!r}: cannot load {spec.source}: {e}") from e
    records = (choice_record(spec, row) for row in raw)
    return examples_from_records(
        records, origin=f"{spec.source}[{spec.split}]", field_map=spec.field_map or None
    )


def choice_record(spec: BenchmarkSpec, row: dict[str, Any]) -> dict[str, Any]:
    """A raw question + options row as a verl-layout record: the shared system prompt and the
    GPQA-style user turn (`A) ...` lines, `ANSWER: $LETTER`). Other columns ride along."""
    assert spec.question_column is not None and spec.options_column is not None
    options = list(row[spec.options_column])
    letters = [chr(ord("A") + i) for i in range(len(options))]
    lines = "\n".join(f"{letter}) {text}" for letter, text in zip(letters, options, strict=True))
    user = (
        CHOICE_INSTRUCTION.format(letters="".join(letters))
        + f"\n\n{row[spec.question_column]}\n\n{lines}"
    )
    record = {k: v for k, v in row.items() if k not in (spec.question_column, spec.options_column)}
    record["prompt"] = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user},
    ]
    record["data_source"] = spec.data_source or spec.name
    return record
