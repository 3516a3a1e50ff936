"""Running a benchmark: sample k responses per question, grade them, keep per-question records.

Evaluation of the paper's full suite takes hours on a GPU (AIME/AMC at 32 samples of up to 8192
tokens), so a run is resumable: with `records_path`, every finished batch of questions is
appended to a jsonl file (one line per question) and fsync'd; a re-run skips the questions
found there. Batches are fixed slices of the question list and each batch's seed is derived from
its position, so a resumed run draws the same samples as an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relift_core.atomic import atomic_file
from relift_core.data.benchmarks import Benchmark
from relift_core.data.examples import Example, render_prompt
from relift_core.errors import UserError
from relift_core.grading.metrics import summarize

if TYPE_CHECKING:  # imported for types only: the grader and engines pull in heavy modules
    from relift_core.config import EvalConfig
    from relift_core.grading.grader import BatchGrader
    from relift_core.runtime.rollout import RolloutEngine

ProgressCallback = Callable[[int, int], None]  # (questions done, questions in the benchmark)


class ResumeError(UserError, ValueError):
    """A records file that does not belong to this evaluation (other benchmark or k)."""


@dataclass
class QuestionRecord:
    """Everything drawn and graded for one question; the unit of resumption and of the parquet."""

    benchmark: str
    uid: str
    data_source: str
    ground_truth: str
    samples: list[str]  # response texts
    extracted: list[str | None]  # the answer the grader read from each response
    correct: list[bool]
    format_ok: list[bool]
    lengths: list[int]  # response tokens
    finish_reasons: list[str]  # "eos" | "length"
    timed_out: list[bool] = field(default_factory=list)  # grader timeouts (graded incorrect)
    # Each sample graded as the ReLIFT reference's evaluation reads answers (grader reading
    # "reference"), beside `correct` (the hardened reading); empty in records made before it.
    correct_reference: list[bool] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuestionRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def eval_settings(eval_cfg: EvalConfig) -> dict[str, Any]:
    """evaluate_benchmark's sampling settings from the config's `eval` section: the train
    flow's evaluations, the evaluate flow and the demo's tuning loop all measure this way."""
    return {
        "samples": eval_cfg.samples,
        "temperature": eval_cfg.temperature,
        "top_p": eval_cfg.top_p,
        "max_new_tokens": eval_cfg.max_new_tokens,
        "reference_reading": eval_cfg.reference_reading,
    }


def evaluate_benchmark(
    engine: RolloutEngine,
    tokenizer: Any,
    bench: Benchmark,
    grader: BatchGrader,
    *,
    samples: int | None = None,
    temperature: float = 0.6,
    top_p: float = 1.0,
    max_new_tokens: int = 8192,
    batch_questions: int = 32,
    seed: int | None = 0,
    require_think: bool = False,
    reference_reading: bool = False,
    records_path: Path | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[list[QuestionRecord], dict[str, float]]:
    """Sample `samples` (default: the benchmark's k) responses per question, grade them, and
    return the per-question records (in question order) with `metrics.summarize` of them.

    `batch_questions` questions go to the engine per call (times k sequences). With
    `records_path`, records already in that jsonl are reused and new ones appended per batch.
    `progress(done, total)` is called once at the start and after every batch.
    """
    k = samples if samples is not None else bench.samples
    if k <= 0:
        raise ValueError(f"samples must be positive, got {k}")
    if batch_questions <= 0:
        raise ValueError(f"batch_questions must be positive, got {batch_questions}")
    uids = [q.uid for q in bench.questions]
    if len(set(uids)) != len(uids):
        raise ValueError(f"benchmark {bench.name!r} has repeated question uids")

    done: dict[str, QuestionRecord] = {}
    if records_path is not None:
        wanted = set(uids)
        for record in read_records_jsonl(records_path, repair=True):
            _check_resumable(record, bench.name, k, records_path)
            if record.uid in wanted:
                done.setdefault(record.uid, record)

    total = len(bench.questions)
    if progress is not None:
        progress(len(done), total)
    for batch_index, start in enumerate(range(0, total, batch_questions)):
        pending = [q for q in bench.questions[start : start + batch_questions] if q.uid not in done]
        if not pending:
            continue
        batch_seed = None if seed is None else seed + batch_index
        records = _run_batch(
            engine, tokenizer, bench, grader, pending,
            n=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            seed=batch_seed, require_think=require_think, reference_reading=reference_reading,
        )  # fmt: skip
        if records_path is not None:
            append_records_jsonl(records, records_path)
        for record in records:
            done[record.uid] = record
        if progress is not None:
            progress(len(done), total)

    ordered = [done[uid] for uid in uids]
    return ordered, {**summarize(ordered), **reference_summary(ordered)}


def reference_summary(records: Sequence[QuestionRecord]) -> dict[str, float]:
    """avg@k under the reference's reading of answers, when every record carries it."""
    if not records or not all(r.correct_reference for r in records):
        return {}
    return {
        "reference_avg_at_k": sum(
            sum(r.correct_reference) / len(r.correct_reference) for r in records
        )
        / len(records)
    }


def _run_batch(
    engine: RolloutEngine,
    tokenizer: Any,
    bench: Benchmark,
    grader: BatchGrader,
    questions: Sequence[Example],
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int | None,
    require_think: bool,
    reference_reading: bool = False,
) -> list[QuestionRecord]:
    prompts = [render_prompt(tokenizer, q.prompt) for q in questions]
    outputs = engine.generate(
        prompts, n=n, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, seed=seed,
    )  # fmt: skip
    if len(outputs) != len(questions) or any(len(o) != n for o in outputs):
        raise RuntimeError(
            f"engine returned {[len(o) for o in outputs]} samples for {len(questions)} prompts "
            f"x {n}"
        )
    # One grading call for the whole batch: the grader's process pool works in parallel.
    texts = [s.text for out in outputs for s in out]
    truths = [q.ground_truth for q in questions for _ in range(n)]
    types = [bench.answer_type_for(q) for q in questions for _ in range(n)]
    grades = grader.grade(texts, truths, types, require_think=require_think)
    # The reference's reading sends every maths response to math-verify: only when asked for.
    reference = (
        grader.grade(texts, truths, types, reading="reference") if reference_reading else None
    )

    records = []
    for i, (question, out) in enumerate(zip(questions, outputs, strict=True)):
        g = grades[i * n : (i + 1) * n]
        records.append(
            QuestionRecord(
                benchmark=bench.name,
                uid=question.uid,
                data_source=question.data_source,
                ground_truth=question.ground_truth,
                samples=[s.text for s in out],
                extracted=[x.extracted for x in g],
                correct=[bool(x.correct) for x in g],
                format_ok=[bool(x.format_ok) for x in g],
                lengths=[int(s.length) for s in out],
                finish_reasons=[str(s.finish_reason) for s in out],
                timed_out=[bool(x.timed_out) for x in g],
                correct_reference=(
                    [bool(x.correct) for x in reference[i * n : (i + 1) * n]]
                    if reference is not None
                    else []
                ),
            )
        )
    return records


def _check_resumable(record: QuestionRecord, name: str, k: int, path: Path) -> None:
    if record.benchmark != name or len(record.correct) != k:
        raise ResumeError(
            f"{path} holds records of benchmark {record.benchmark!r} with "
            f"{len(record.correct)} samples a question, but this evaluation is {name!r} with "
            f"{k}; use a fresh records path (or delete it) to start over"
        )


# ---------------------------------------------------------------------------------------------
# persistence


def append_records_jsonl(records: Sequence[QuestionRecord], path: Path) -> None:
    """Append one line per record and make it durable before returning (flush + fsync), so a
    kill can lose at most the batch in flight, never a batch already reported done."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(r.to_json() + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def read_records_jsonl(path: Path, *, repair: bool = False) -> list[QuestionRecord]:
    """Records from a jsonl written by `append_records_jsonl`; a missing file holds none.

    A last line without its newline (or not valid JSON) is what a kill mid-write leaves: it is
    ignored, and with `repair=True` cut off, so the next append starts on a fresh line. A bad
    line anywhere else is corruption and raises.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    records: list[QuestionRecord] = []
    good_end = 0  # byte offset just past the last intact line
    chunks = data.splitlines(keepends=True)
    for line_no, chunk in enumerate(chunks):
        is_last = line_no == len(chunks) - 1
        if not chunk.endswith(b"\n"):
            break  # torn tail from a kill (only the last chunk can lack its newline)
        if chunk.strip():
            try:
                records.append(QuestionRecord.from_dict(json.loads(chunk)))
            except (ValueError, TypeError, AttributeError) as e:
                if is_last:
                    break
                raise ValueError(f"{path}: line {line_no + 1} is not a record: {e}") from None
        good_end += len(chunk)
    if repair and good_end < len(data):
        with path.open("r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return records


def records_to_parquet(records: Sequence[QuestionRecord], path: Path) -> None:
    """Per-question records as parquet (one row a question, list columns for the samples),
    written atomically: readers see the previous file or the complete new one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{**asdict(r), "n": len(r.correct), "accuracy": r.accuracy} for r in records]
    schema = pa.schema(
        [
            ("benchmark", pa.string()),
            ("uid", pa.string()),
            ("data_source", pa.string()),
            ("ground_truth", pa.string()),
            ("samples", pa.list_(pa.string())),
            ("extracted", pa.list_(pa.string())),
            ("correct", pa.list_(pa.bool_())),
            ("format_ok", pa.list_(pa.bool_())),
            ("lengths", pa.list_(pa.int64())),
            ("finish_reasons", pa.list_(pa.string())),
            ("timed_out", pa.list_(pa.bool_())),
            ("n", pa.int64()),
            ("accuracy", pa.float64()),
        ]
    )
    with atomic_file(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)


# ---------------------------------------------------------------------------------------------
# reporting

# Headers short enough for the table to fit 100 columns; TABLE_LEGEND below the table says
# what each means.
_COLUMNS = (
    ("questions", "questions", "{:d}"),
    ("k", "k", "{:d}"),
    ("avg_at_k", "avg@k", "pct"),
    ("reference_avg_at_k", "ref avg@k", "pct"),
    ("pass_at_k", "pass@k", "pct"),
    ("maj_at_k", "maj@k", "pct"),
    ("response_length_mean", "len", "{:.0f}"),
    ("response_length_max", "max len", "{:d}"),
    ("format_failure_rate", "fmt fail", "pct"),
    ("truncation_rate", "cut", "pct"),
)
TABLE_LEGEND = (
    "Percent, over k samples a question: avg@k mean correct, pass@k any correct, maj@k the\n"
    "majority answer correct; ref avg@k: avg@k as the ReLIFT reference reads answers\n"
    "(eval.reference_reading); fmt fail: answer not in the required format; cut: stopped at the\n"
    "token limit. len, max len: response tokens, mean and longest.\n"
)


def markdown_table(
    summaries: dict[str, dict[str, Any]], averages: dict[str, float] | None = None
) -> str:
    """A markdown table, one row per benchmark (accuracies in percent), optionally followed by
    the rows of `metrics.paper_averages` (only the avg@k column is filled for those), then
    TABLE_LEGEND; every line fits 100 columns."""
    header = "| benchmark | " + " | ".join(title for _, title, _ in _COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(_COLUMNS)
    lines = [header, rule]
    for name, summary in summaries.items():
        cells = [_cell(summary.get(key), fmt) for key, _, fmt in _COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, value in (averages or {}).items():
        if not name.startswith("avg_"):
            continue  # flags such as paper_complete are not averages
        cells = [_cell(value, "pct") if key == "avg_at_k" else "" for key, _, _ in _COLUMNS]
        lines.append(f"| **{name}** | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + TABLE_LEGEND


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "–"
    if fmt == "pct":
        return f"{100 * float(value):.1f}"
    return fmt.format(int(value) if fmt == "{:d}" else value)
