"""The Grader: turns a model's response into a reward.

Maths answers are judged by math-verify (symbolic/numeric equivalence of the last `\\boxed{}`
against the gold); multiple-choice answers (GPQA, ARC-C, MMLU-Pro) by comparing one letter.

Decisions (each one deliberate, so records stay comparable across runs):

* `</think>`: the answer is always read after the LAST `</think>` when there is one, so a box
  written while thinking never counts. `require_think=True` additionally makes a missing tag a
  format failure (`format_ok=False`), counted apart from a wrong answer.
* Maths needs a `\\boxed{}` (the paper's verl reward does too). There is no fall-back to
  math-verify's own free-text extraction: it would reward unformatted answers and hide format
  failures. The LAST `\\boxed{` counts; if its braces never close (a truncated response), that
  is a format failure, not a search for an earlier box.
* The gold is parsed as `$gold$` and the prediction as `\\boxed{pred}`, then `verify(gold, pred)`.
* One reading of numbers. A percent sign is a unit: `42\\%` is 42 in the answer and the gold
  (math-verify alone reads it as 42 and as 0.42, so one answer matched two golds). Where a
  decimal is involved, the answer is right within NUMERIC_REL_TOL of the gold's magnitude, at
  every scale (math-verify's own rule, six decimal places, took `0.5000001` for 0.5 and
  refused `42.0000001` for 42); exact values compare exactly.
* Multiple choice accepts `\\boxed{C}` (also `\\boxed{\\text{C}}`, `\\boxed{(C)}`) and answer
  lines (`ANSWER: C`, `Answer: (C)`, `the answer is C`); whichever comes last in the text wins.
  Choices are A-J or 1-9 (ARC-C has some questions numbered 1-4).
* An answer is correct only if the boxed expression AS A WHOLE equals the gold. math-verify
  alone would also accept a part of it (`43 = 42`, `42 \\approx 43`, `42 \\text{ (or maybe 43)}`,
  `\\let\\x=42`, `20 22`, garbage ending in 42), so `answer_checks.rejection` refuses relations,
  alternatives, hedges, juxtaposed numbers, TeX programming and unknown commands that the gold
  does not share (`x = 42` still answers `42`). The same cheap checks cut pathological answers
  before sympy sees them: length, nesting deeper than `MAX_NESTING_DEPTH` (braces, parentheses
  and brackets together), power towers, factorial chains, huge numbers and exponents, large
  symbolic expansions. A refused answer is incorrect with its format still ok; it never costs a
  worker's time, so no answer should ever reach the timeout, which stays as the last resort.
* The prediction is parsed with LaTeX extraction only: math-verify's fall-back to plain
  expressions would pick a number out of text that is not valid LaTeX (`2e,,(=42\\lim` -> 42).

Why processes: math-verify's own timeouts use SIGALRM, which only works in a main thread, and
sympy can sit in C code where no signal is ever handled. So every maths answer is verified in a
worker process, in that process's main thread. The worker stops itself at `timeout_s` with
SIGALRM (cheap: the process survives); if that does not work, the parent kills it at
`timeout_s + KILL_GRACE_S`, starts a replacement and grades the answer incorrect with
`timed_out=True`. The rest of the batch is unaffected. Even with `workers=1` a worker process is
used: grading maths in-process could never be stopped. Multiple-choice answers, format failures
and pre-filtered answers need no sympy and are graded in the calling process. `grade_answer`
keeps one single-worker pool for the life of the process.

Workers come from the `forkserver` start method (never plain `fork`: the caller may hold torch
threads) with math_verify preloaded, so replacing a killed worker costs a fork, not an import.
As with any non-fork start method, a script that grades must keep its work under
`if __name__ == "__main__":`, because the fork server imports the main module.

Throughput is almost all math-verify's LaTeX parsing (ANTLR), whose caches warm up per process:
in a fresh process, parsing the 1,153 distinct maths golds took twice as long as parsing them a
second time. So each worker pays its own warm-up, and 2 workers do more work in all than 1.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Any, Literal, Self

from relift_core.grading.answer_checks import (
    MAX_ANSWER_CHARS,
    MAX_GOLD_CHARS,
    MAX_NESTING_DEPTH,
    rejection,
)
from relift_core.grading.extraction import (
    AnswerType,
    answer_part,
    extract_choice,
    last_boxed,
    normalize_choice,
    reference_answer_text,
)

# MAX_NESTING_DEPTH (answer_checks): gold answers nest braces at most 3 deep, and the parser's
# cost grows with depth (0.7 s at 8, 3.2 s at 12, past the 5 s timeout at 14), so the cut-off
# is far below where it explodes; it counts braces, parentheses and brackets together.
# MAX_ANSWER_CHARS (1000) comes from answer_checks too.
# How long past its deadline a worker may take to stop itself before the parent kills it.
KILL_GRACE_S = 0.5
# A worker that is not ready this long after starting means the pool itself is broken.
WORKER_START_TIMEOUT_S = 120.0
# Address-space cap per worker, so one adversarial expression cannot eat the machine's memory.
WORKER_MEMORY_LIMIT_BYTES = 4 * 1024**3
# Extracted answers are kept for records; pathological ones are cut to this length.
RECORD_CHARS = 200
# Where a decimal is involved (in the answer or the gold), a number is right when it differs
# from the gold by at most this fraction of the gold's magnitude: the rounding error of six
# significant digits, so `0.333333` answers `\frac13`, and `0.5000001` answers 0.5 just as
# `42.0000001` answers 42 (math-verify alone rounds to six decimal places, an absolute bound
# that accepted the first and refused the second, and that makes every gold below 5e-7 equal
# to 0). Integers, fractions and radicals written exactly compare exactly; a gold of 0 needs 0.
NUMERIC_REL_TOL = 5e-6
# A percent sign is a unit, not a factor of 1/100: `42\%` reads as 42, in the answer and in
# the gold alike, never as 0.42. math-verify reads it both ways (`42\%` matched 42 and 0.42,
# `4200\%` matched 42), so one answer could match two different golds; the sign, with the
# spacing before it, is dropped from both before any check.
_PERCENT = re.compile(
    r"(?:\\[,;:! ]|~|\s)*+(?:\\%|\\(?:text|mathrm)\{\s*+(?:\\%|percent)\s*+\}|%\s*+$)"
)


def without_percent(text: str) -> str:
    """`42\\%` -> `42`: the one reading of a percent sign (see `_PERCENT`)."""
    return _PERCENT.sub("", text).strip()


@dataclass(frozen=True)
class Grade:
    correct: bool
    format_ok: bool  # False when require_think and no </think>, or no extractable answer
    extracted: str | None  # the answer string we extracted (boxed content / letter)
    timed_out: bool = False

    @property
    def reward(self) -> float:
        return 1.0 if self.correct else 0.0


def _for_record(answer: str) -> str:
    return answer if len(answer) <= RECORD_CHARS else answer[:RECORD_CHARS] + "…"


@dataclass(frozen=True)
class _MathJob:
    """A maths answer that passed every cheap check and needs math-verify."""

    gold: str
    predicted: str
    record: str  # the box's content as written (with its percent sign, if any)
    whole: bool = False  # the reference's reading: math-verify finds the answer in the text

    @property
    def key(self) -> tuple:
        """The worker's job: (gold, predicted), with True appended for a whole response."""
        return (self.gold, self.predicted, True) if self.whole else (self.gold, self.predicted)


# hardened: the answer after the last </think>, in the last \boxed{}, behind the checks of
# answer_checks (the default: rewards that resist hacking). reference: as the ReLIFT
# reference's evaluation reads it (extraction.reference_answer_text), for comparison only.
Reading = Literal["hardened", "reference"]


def _prepare(
    response: str,
    ground_truth: str,
    answer_type: AnswerType,
    require_think: bool,
    reading: Reading = "hardened",
) -> Grade | _MathJob:
    """Everything that needs no sympy: a final Grade, or the job for a worker."""
    if reading == "reference":
        text = reference_answer_text(response)
        if answer_type == "choice":
            letter = extract_choice(text)
            return Grade(
                letter is not None and letter == normalize_choice(ground_truth),
                format_ok=letter is not None,
                extracted=letter,
            )
        return _MathJob(gold=ground_truth, predicted=text, record=_for_record(text), whole=True)
    answer = answer_part(response)
    if answer is None:
        if require_think:
            return Grade(correct=False, format_ok=False, extracted=None)
        answer = response
    if answer_type == "choice":
        letter = extract_choice(answer)
        if letter is None:
            return Grade(correct=False, format_ok=False, extracted=None)
        return Grade(letter == normalize_choice(ground_truth), format_ok=True, extracted=letter)
    if answer_type != "math":
        raise ValueError(f"unknown answer type {answer_type!r}; expected 'math' or 'choice'")
    if len(ground_truth) > MAX_GOLD_CHARS:
        raise ValueError(
            f"a ground truth of {len(ground_truth):,} characters (at most {MAX_GOLD_CHARS}): data "
            "preparation refuses such rows; grade only golds read by relift_core.data.examples"
        )
    box = last_boxed(answer)
    if box is None or not box.content.strip():
        return Grade(correct=False, format_ok=False, extracted=None)
    record = box.content.strip()
    # Cheapest first (the box's own depth is already known), then everything else that makes
    # an answer wrong as a whole or too costly for sympy.
    if len(record) > MAX_ANSWER_CHARS or box.depth > MAX_NESTING_DEPTH:
        return Grade(correct=False, format_ok=True, extracted=_for_record(record))
    predicted, gold = without_percent(record), without_percent(ground_truth)
    if not predicted or rejection(predicted, gold) is not None:
        return Grade(correct=False, format_ok=True, extracted=_for_record(record))
    fast = exact_number_verdict(predicted, gold)
    if fast is not None:
        return Grade(correct=fast, format_ok=True, extracted=_for_record(record))
    return _MathJob(gold=gold, predicted=predicted, record=record)


# A plain integer or decimal, as a boxed answer or a gold is usually written: `42`, `-3`, `0.50`.
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d+)?|\.\d+)")


def exact_number_verdict(predicted: str, gold: str) -> bool | None:
    """The grade of a plain-number answer against a plain-number gold without math-verify, or
    None where only math-verify can tell.

    Two integers compare exactly (`42` = `+42`, any length); where either is a decimal, the
    answer is right within NUMERIC_REL_TOL of the gold's magnitude, which is the rule the
    workers apply too (`_relative_numeric_eq`). Everything else (fractions, LaTeX, units,
    `1.`, `1e3`) goes to math-verify. This is the grading of the proof-world and of most maths
    golds, in microseconds instead of a round trip to a worker process."""
    p, g = predicted.strip(), gold.strip()
    if not (_PLAIN_NUMBER.fullmatch(p) and _PLAIN_NUMBER.fullmatch(g)):
        return None
    answer, target = Decimal(p), Decimal(g)
    if answer == target:
        return True
    if "." not in p and "." not in g:
        return False
    return abs(answer - target) <= Decimal(str(NUMERIC_REL_TOL)) * abs(target)


# --------------------------------------------------------------------------------------------
# Worker process: math-verify in its own main thread, stopped by SIGALRM at the soft deadline
# --------------------------------------------------------------------------------------------

_READY = "ready"


class _SoftDeadline(BaseException):
    """Raised by SIGALRM in a worker. A BaseException so that math-verify's and sympy's
    `except Exception` handlers cannot swallow it."""


def _raise_soft_deadline(signum: int, frame: Any) -> None:
    raise _SoftDeadline


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list[Any]:
    from math_verify import parse

    return parse(f"${gold}$", parsing_timeout=None)  # type: ignore[arg-type]


def _relative_numeric_eq(original: Any) -> Any:
    """math-verify's comparison of two numbers, with NUMERIC_REL_TOL where a decimal is
    involved instead of its rounding to six decimal places; everything else is `original`.
    math-verify calls it for every pair of values it compares (alone, or inside tuples,
    intervals and matrices), always as (gold, prediction). Constant expressions count as
    numbers (`1.0000001 \\times 10^{-9}`); a percent sign never gets here (`without_percent`)."""

    def numeric_eq(gold: Any, predicted: Any, float_rounding: int, numeric_precision: int) -> bool:
        from sympy import Basic, Float, UnevaluatedExpr

        if (
            isinstance(gold, Basic)
            and isinstance(predicted, Basic)
            and gold.is_number
            and predicted.is_number
            and (gold.has(Float) or predicted.has(Float))
            and not (gold.has(UnevaluatedExpr) or predicted.has(UnevaluatedExpr))
        ):
            g, p = gold.evalf(30), predicted.evalf(30)
            if g.is_finite and p.is_finite:
                return bool(abs(g - p) <= NUMERIC_REL_TOL * abs(g))
        return original(gold, predicted, float_rounding, numeric_precision)

    numeric_eq.relative_tolerance = True  # type: ignore[attr-defined]
    return numeric_eq


def _use_relative_tolerance() -> None:
    import math_verify.grader as math_verify_grader

    if not getattr(math_verify_grader.sympy_numeric_eq, "relative_tolerance", False):
        math_verify_grader.sympy_numeric_eq = _relative_numeric_eq(
            math_verify_grader.sympy_numeric_eq
        )


def _verify_math(gold: str, predicted: str, whole: bool = False) -> bool:
    from math_verify import LatexExtractionConfig, parse, verify

    _use_relative_tolerance()
    gold_parsed = _parse_gold(gold)
    if whole:  # the reference's call: math-verify's default extraction over the whole text
        predicted_parsed = parse(predicted, parsing_timeout=None)  # type: ignore[arg-type]
        return bool(gold_parsed and predicted_parsed) and verify(
            gold_parsed, predicted_parsed, timeout_seconds=None
        )
    # LaTeX only: the default's plain-expression fall-back finds numbers in text that is not
    # valid LaTeX, which would grade a part of the answer (`2e,,(=42\lim` -> 42).
    predicted_parsed = parse(
        f"\\boxed{{{predicted}}}",
        extraction_config=[LatexExtractionConfig()],
        parsing_timeout=None,  # type: ignore[arg-type]
    )
    if not gold_parsed or not predicted_parsed:
        return False
    return verify(gold_parsed, predicted_parsed, timeout_seconds=None)


def _verify_before_deadline(
    gold: str, predicted: str, soft_timeout_s: float | None, whole: bool = False
) -> tuple[bool, bool]:
    """(correct, timed_out). Any error in parsing or comparing means incorrect."""
    try:
        if soft_timeout_s:
            signal.setitimer(signal.ITIMER_REAL, soft_timeout_s)
        try:
            return _verify_math(gold, predicted, whole), False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _SoftDeadline:
        return False, True
    except Exception:  # noqa: BLE001 - a crash on one answer is that answer's failure
        return False, False


def _limit_worker_memory() -> None:
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = WORKER_MEMORY_LIMIT_BYTES
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    except (ImportError, ValueError, OSError):
        pass  # not every platform lets us; the parent's deadline still holds


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
    # Ctrl-C is for the parent, which shuts the pool down; workers must not print tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _raise_soft_deadline)
    # We disable math-verify's own (signal) timeouts and time out ourselves; silence its
    # warning about that, and its per-answer warnings.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _limit_worker_memory()
    import math_verify  # noqa: F401 - import before saying ready, so deadlines exclude it

    _use_relative_tolerance()

    conn.send(_READY)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if message is None:
            return
        *job, soft_timeout_s = message  # job: (gold, predicted[, whole])
        gold, predicted, *whole = job
        conn.send(_verify_before_deadline(gold, predicted, soft_timeout_s, bool(whole)))


# --------------------------------------------------------------------------------------------
# The pool: one pipe per worker, one answer in flight per worker, deadlines kept by the parent
# --------------------------------------------------------------------------------------------


def _worker_context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    # Keep the default "__main__" preload and add math_verify. Has no effect (harmlessly) when
    # the fork server is already running.
    context.set_forkserver_preload(["__main__", "math_verify", __name__])
    return context


class _Worker:
    def __init__(self, context: multiprocessing.context.BaseContext) -> None:
        self.conn, child_conn = context.Pipe(duplex=True)
        self.process = context.Process(  # type: ignore[attr-defined]
            target=_worker_main, args=(child_conn,), daemon=True, name="relift-grader"
        )
        self.process.start()
        child_conn.close()
        self.ready = False
        self.job: int | None = None
        self.deadline = time.monotonic() + WORKER_START_TIMEOUT_S

    def assign(self, job: int, message: tuple, timeout_s: float) -> None:
        self.conn.send(message)
        self.job = job
        self.deadline = time.monotonic() + timeout_s + KILL_GRACE_S

    def finish(self) -> None:
        self.job = None
        self.deadline = math.inf

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()

    def ask_to_stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass  # already gone


def _stop_all(workers: list[_Worker], owner_pid: int) -> None:
    if os.getpid() != owner_pid:
        return  # a forked copy of the owner exiting: the workers are not its to stop
    for worker in workers:
        worker.ask_to_stop()
    deadline = time.monotonic() + 1.0
    for worker in workers:
        worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
        worker.kill()  # a worker still busy with a long answer
    workers.clear()


_TIMED_OUT = (False, True)
_WORKER_DIED = (False, False)


class BatchGrader:
    """Grades batches over a pool of worker processes; results come back in input order.

    Use as a context manager (or call `close()`). Not thread-safe: one `grade` call at a time.
    Identical (gold, answer) pairs in a batch are verified once."""

    def __init__(self, workers: int = 2, timeout_s: float = 5.0) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        # Whether workers stop themselves with SIGALRM; off, only the parent's kill is left
        # (a seam for tests of that kill).
        self._worker_alarm = True
        self._context = _worker_context()
        self._workers: list[_Worker] = [_Worker(self._context) for _ in range(workers)]
        self._finalizer = weakref.finalize(self, _stop_all, self._workers, os.getpid())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._finalizer()

    def grade(
        self,
        responses: list[str],
        ground_truths: list[str],
        answer_types: list[AnswerType] | AnswerType = "math",
        require_think: bool = False,
        reading: Reading = "hardened",
    ) -> list[Grade]:
        types = [answer_types] * len(responses) if isinstance(answer_types, str) else answer_types
        if not len(responses) == len(ground_truths) == len(types):
            raise ValueError(
                f"{len(responses)} responses, {len(ground_truths)} ground truths and "
                f"{len(types)} answer types: they must be the same length"
            )
        prepared = [
            _prepare(response, gold, answer_type, require_think, reading)
            for response, gold, answer_type in zip(responses, ground_truths, types, strict=True)
        ]
        job_of: dict[tuple, int] = {}
        for item in prepared:
            if isinstance(item, _MathJob):
                job_of.setdefault(item.key, len(job_of))
        outcomes = self._run(list(job_of), self.timeout_s)
        grades = []
        for item in prepared:
            if isinstance(item, Grade):
                grades.append(item)
                continue
            correct, timed_out = outcomes[job_of[item.key]]
            grades.append(Grade(correct, True, item.record, timed_out))
        return grades

    def _run(self, jobs: list[tuple], timeout_s: float) -> list[tuple[bool, bool]]:
        """Verifies (gold, predicted[, whole]) jobs -> (correct, timed_out); each has its own
        deadline."""
        if not self._workers:
            raise RuntimeError("BatchGrader is closed")
        outcomes: list[tuple[bool, bool] | None] = [None] * len(jobs)
        queue = deque(range(len(jobs)))
        try:
            while queue or any(worker.job is not None for worker in self._workers):
                self._dispatch(jobs, queue, timeout_s)
                self._collect(outcomes)
                self._enforce_deadlines(outcomes)
        except BaseException:
            # Interrupted (Ctrl-C, a broken pool): answers still in flight would come back into
            # the next batch's results, so their workers are replaced.
            for index, worker in enumerate(self._workers):
                if worker.job is not None:
                    self._replace(index)
            raise
        return outcomes  # type: ignore[return-value]

    def _dispatch(self, jobs: list[tuple], queue: deque[int], timeout_s: float) -> None:
        """Gives the next answers to idle workers."""
        soft_timeout_s = timeout_s if self._worker_alarm else None
        for index, worker in enumerate(self._workers):
            if not (worker.ready and worker.job is None and queue):
                continue
            job = queue.popleft()
            try:
                worker.assign(job, (*jobs[job], soft_timeout_s), timeout_s)
            except OSError:  # the idle worker died (killed from outside): the answer waits
                queue.appendleft(job)
                self._replace(index)

    def _collect(self, outcomes: list[tuple[bool, bool] | None]) -> None:
        """Waits until a worker answers or the nearest deadline passes, then takes answers."""
        waiting = [worker for worker in self._workers if worker.job is not None or not worker.ready]
        nearest = min(worker.deadline for worker in waiting)
        readable = multiprocessing.connection.wait(
            [worker.conn for worker in waiting], timeout=max(0.0, nearest - time.monotonic())
        )
        for index, worker in enumerate(self._workers):
            if worker.conn not in readable:
                continue
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                if not worker.ready:
                    raise RuntimeError("a grader worker process died while starting") from None
                # Killed from outside or by the memory cap: this answer's failure only.
                outcomes[worker.job] = _WORKER_DIED  # type: ignore[index]
                self._replace(index)
                continue
            if worker.ready:
                outcomes[worker.job] = message  # type: ignore[index]
            worker.ready = True  # the first message is the worker's _READY
            worker.finish()

    def _enforce_deadlines(self, outcomes: list[tuple[bool, bool] | None]) -> None:
        now = time.monotonic()
        for index, worker in enumerate(self._workers):
            if now < worker.deadline:
                continue
            if not worker.ready:
                raise RuntimeError(
                    f"a grader worker was not ready after {WORKER_START_TIMEOUT_S:.0f} s"
                )
            outcomes[worker.job] = _TIMED_OUT  # type: ignore[index]
            self._replace(index)

    def _replace(self, index: int) -> None:
        self._workers[index].kill()
        self._workers[index] = _Worker(self._context)


# grade_answer's pool: one worker, started on first use and kept, so that one call costs an
# exchange with a warm process (milliseconds) instead of a new process with cold parser caches
# (up to seconds for a long formula). Its finalizer stops the worker at exit.
_single_lock = threading.Lock()
_single: tuple[int, BatchGrader] | None = None  # (pid of the owner, pool)


def _single_worker_pool() -> BatchGrader:
    global _single
    # A forked child must not share its parent's pipes: it gets its own pool.
    if _single is None or _single[0] != os.getpid() or not _single[1]._workers:
        _single = (os.getpid(), BatchGrader(workers=1))
    return _single[1]


def grade_answer(
    response: str,
    ground_truth: str,
    answer_type: AnswerType = "math",
    *,
    require_think: bool = False,
    timeout_s: float = 5.0,
) -> Grade:
    """Grades one response. Maths answers that reach math-verify go to a one-worker pool kept
    for this purpose (thread-safe, one answer at a time); grade many with a `BatchGrader`."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    prepared = _prepare(response, ground_truth, answer_type, require_think)
    if isinstance(prepared, Grade):
        return prepared
    with _single_lock:
        [(correct, timed_out)] = _single_worker_pool()._run([prepared.key], timeout_s)
    return Grade(correct, True, prepared.record, timed_out)
