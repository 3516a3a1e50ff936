"""Question data in the verl/LUFFY layout: load, validate, write, fingerprint, render.

A row in that layout has `data_source` (str), `prompt` (chat messages `{role, content}`),
`reward_model.ground_truth` (str), an optional `target` demonstration (a string, or LUFFY's list
of messages `[{role: assistant, content}]`) and free extras such as `ability` and `extra_info`.
Rows come from a local parquet or jsonl file or a Hugging Face dataset id; `field_map` maps our
field names to another dataset's columns (dotted names reach into nested structs).

Every row is validated once, here at the edge: a malformed row raises `DataError` naming the
file, the row index and the field, so nothing downstream has to re-check types. A file that
cannot be read (invalid UTF-8 in a .jsonl, a corrupt parquet) or that holds no rows is refused
the same way, naming the file (and line and byte offset where there is one); so is a gold
longer than the grader's bound (`MAX_GOLD_CHARS`). Prompts over the
token budget are dropped and counted, or refused, by `filter_long_prompts`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from relift_core.atomic import atomic_file
from relift_core.errors import UserError
from relift_core.grading.answer_checks import MAX_GOLD_CHARS

# Our field -> the column it is read from by default (the verl layout).
DEFAULT_FIELD_MAP: dict[str, str] = {
    "prompt": "prompt",
    "ground_truth": "reward_model.ground_truth",
    "target": "target",
    "data_source": "data_source",
    "uid": "uid",
}
# Fields that may be absent from a row when the caller did not name their column explicitly.
_OPTIONAL_BY_DEFAULT = {"target", "data_source", "uid"}
_LOCAL_SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl"}


@dataclass(frozen=True)
class Example:
    """One question. Not hashable (the messages and `extra` are dicts): key collections by `uid`."""

    uid: str  # unique within its dataset; stable under `limit` (see `examples_from_records`)
    data_source: str
    prompt: tuple[dict[str, str], ...]  # chat messages, each exactly {"role", "content"}
    ground_truth: str
    target: str | None = None  # demonstration text (the assistant's content)
    extra: dict[str, Any] = field(default_factory=dict)  # other columns, verbatim

    def __post_init__(self) -> None:
        # Callers building Examples by hand may pass a list; one form keeps equality exact.
        object.__setattr__(self, "prompt", tuple(self.prompt))


class DataError(UserError, ValueError):
    """A row that does not fit the layout; the message names the file, row index and field."""


def load_examples(
    source: str | Path,
    *,
    split: str = "train",
    field_map: dict[str, str] | None = None,
    limit: int | None = None,
    allow_empty: bool = False,
) -> list[Example]:
    """Examples from a local `.parquet` / `.jsonl` file, or from a Hugging Face dataset id.

    A local directory is handed to `datasets.load_dataset` too (a folder of data files).
    `limit` keeps the first `limit` rows; `split` only applies to Hugging Face datasets.
    A source with no rows raises DataError naming it, unless `allow_empty`.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    path = Path(source)
    kind = _LOCAL_SUFFIXES.get(path.suffix.lower())
    if kind is not None:
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        records = _read_parquet(path, limit) if kind == "parquet" else _read_jsonl(path, limit)
        examples = examples_from_records(records, origin=str(path), field_map=field_map)
        origin = str(path)
    else:
        if path.suffix and path.exists() and not path.is_dir():
            raise DataError(
                f"{path}: unsupported file type {path.suffix!r} (use .parquet or .jsonl)"
            )
        origin = f"{source}[{split}]"
        examples = examples_from_records(
            _read_hf(str(source), split, limit), origin=origin, field_map=field_map
        )
    if not examples and not allow_empty:
        raise DataError(f"{origin}: the dataset is empty (no rows)")
    return examples


OverLongPolicy = Literal["drop", "error"]


@dataclass(frozen=True)
class DroppedPrompt:
    """A row left out by `filter_long_prompts`: its row index, uid and token count (`limit + 1`
    when the prompt was too long to be worth tokenizing, see `prompt_token_counter`)."""

    row: int
    uid: str
    tokens: int


def prompt_token_counter(tokenizer: Any, *, max_chars_per_token: int = 64) -> Callable[..., int]:
    """`count(example, limit)`: the number of tokens of the example's rendered prompt (chat
    template and generation prompt included: what the rollout feeds the model).

    A prompt longer than `limit * max_chars_per_token` characters is over the limit whatever the
    tokenizer (no tokenizer averages more characters a token), so it is not tokenized: a 1 MB
    prompt costs nothing. Such a prompt reports `limit + 1` tokens, a lower bound."""

    def count(example: Example, limit: int | None = None) -> int:
        chars = sum(len(m["content"]) for m in example.prompt)
        if limit is not None and chars > limit * max_chars_per_token:
            return limit + 1
        text = render_prompt(tokenizer, example.prompt)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


def filter_long_prompts(
    examples: Sequence[Example],
    *,
    count_tokens: Callable[..., int],
    max_tokens: int,
    origin: str,
    policy: OverLongPolicy = "drop",
) -> tuple[list[Example], list[DroppedPrompt]]:
    """Keep the examples whose prompt has at most `max_tokens` tokens (data.max_prompt_tokens).

    `count_tokens(example, limit)` counts a prompt (see `prompt_token_counter`). With
    policy "drop" the others are left out and returned as DroppedPrompt (row = index in
    `examples`, i.e. the row of `origin` for an unfiltered load); with "error" the first one
    raises DataError naming `origin` and the row. Dropping every row raises DataError too: an
    empty training set is never handed on."""
    if policy not in ("drop", "error"):
        raise ValueError(f"policy must be 'drop' or 'error', got {policy!r}")
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    kept: list[Example] = []
    dropped: list[DroppedPrompt] = []
    for row, example in enumerate(examples):
        tokens = count_tokens(example, max_tokens)
        if tokens <= max_tokens:
            kept.append(example)
            continue
        if policy == "error":
            chars = sum(len(m["content"]) for m in example.prompt)
            raise DataError(
                f"{origin}: row {row} (uid {example.uid!r}): the prompt ({chars} characters) is "
                f"over data.max_prompt_tokens={max_tokens} tokens"
            )
        dropped.append(DroppedPrompt(row=row, uid=example.uid, tokens=tokens))
    if examples and not kept:
        raise DataError(
            f"{origin}: all {len(examples)} rows were dropped: every prompt is over "
            f"data.max_prompt_tokens={max_tokens}"
        )
    return kept, dropped


def examples_from_records(
    records: Iterable[dict[str, Any]], *, origin: str, field_map: dict[str, str] | None = None
) -> list[Example]:
    """Validate rows into Examples. `origin` (a file or dataset name) is used in error messages.

    The uid is the mapped `uid` column when there is one, else `{data_source}-{extra_info.index}`,
    else `{data_source}-{row index}`. Repeated rows are kept (benchmarks repeat AIME/AMC questions
    32 times for avg@k); the first occurrence keeps its uid and each repeat becomes
    `{uid}#{row index}`, so uids stay unique and do not change when `limit` cuts the rows short.
    A missing `data_source` column falls back to the origin's name.
    """
    columns = _resolve_field_map(field_map)
    fallback_source = Path(origin.split("[")[0]).stem or origin
    examples: list[Example] = []
    seen: set[str] = set()
    for row_index, record in enumerate(records):
        ex = _parse_row(record, row_index, origin, columns, fallback_source)
        if ex.uid in seen:
            unique = f"{ex.uid}#{row_index}"
            if unique in seen:
                raise DataError(f"{origin}: row {row_index}: field 'uid': {unique!r} is not unique")
            ex = replace(ex, uid=unique)
        seen.add(ex.uid)
        examples.append(ex)
    return examples


def write_examples(examples: list[Example], path: Path) -> None:
    """Write a verl-layout parquet atomically: readers see the old file or the whole new one.

    Extras go back to their own columns; a `uid` column is added so uids from a field map or
    from de-duplication survive the round trip. `target` is written as LUFFY's message list.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [_to_row(ex) for ex in examples]
    with atomic_file(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)


def fingerprint_examples(examples: Iterable[Example]) -> str:
    """A short sha256 of the content, order included (order is part of a data-loader position)."""
    h = hashlib.sha256()
    for ex in examples:
        blob = [ex.uid, ex.data_source, list(ex.prompt), ex.ground_truth, ex.target, ex.extra]
        h.update(json.dumps(blob, sort_keys=True, default=str, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The text the policy continues from: the chat template plus the assistant's opening."""
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
    )


# ---------------------------------------------------------------------------------------------
# reading


def _read_parquet(path: Path, limit: int | None) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        size = path.stat().st_size if path.exists() else 0
        why = "an empty file (0 bytes)" if size == 0 else f"{_first_line(e)}"
        raise DataError(f"{path}: not a readable parquet file: {why}") from e
    if limit is not None:
        table = table.slice(0, limit)
    # pyarrow, not pandas: nested lists come back as Python lists, not numpy object arrays.
    return table.to_pylist()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_jsonl(path: Path, limit: int | None) -> list[dict[str, Any]]:
    """Read as bytes and decode line by line, so invalid UTF-8 is reported with its line and
    byte offset in the file instead of a bare UnicodeDecodeError."""
    records: list[dict[str, Any]] = []
    offset = 0  # byte offset of the current line's start
    with path.open("rb") as f:
        for line_no, raw in enumerate(f):
            line_start, offset = offset, offset + len(raw)
            if limit is not None and len(records) >= limit:
                break
            if line_no == 0 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                raw, line_start = raw[3:], line_start + 3
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: line {line_no + 1}: invalid UTF-8 at byte offset "
                    f"{line_start + e.start} (byte {raw[e.start : e.start + 1]!r}: {e.reason})"
                ) from None
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {line_no + 1}: not valid JSON: {e}") from None
    return records


def _read_hf(dataset_id: str, split: str, limit: int | None) -> Iterable[dict[str, Any]]:
    import datasets  # lazily: importing it is slow and only this path needs it

    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:
        raise DataError(f"{dataset_id}[{split}]: cannot load dataset: {e}") from e
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds


# ---------------------------------------------------------------------------------------------
# validating


def _resolve_field_map(field_map: dict[str, str] | None) -> dict[str, tuple[str, bool]]:
    """Our field -> (column, required). An explicitly mapped column must exist in every row."""
    unknown = set(field_map or {}) - set(DEFAULT_FIELD_MAP)
    if unknown:
        raise ValueError(
            f"unknown field_map keys {sorted(unknown)}; known: {sorted(DEFAULT_FIELD_MAP)}"
        )
    resolved = {}
    for name, default_column in DEFAULT_FIELD_MAP.items():
        explicit = field_map is not None and name in field_map
        column = (field_map or {}).get(name, default_column)
        resolved[name] = (column, explicit or name not in _OPTIONAL_BY_DEFAULT)
    return resolved


_MISSING = object()


def _lookup(record: dict[str, Any], column: str) -> Any:
    """The value at `column`, reaching into nested dicts for dotted names; _MISSING if absent."""
    if column in record:
        return record[column]
    node: Any = record
    for part in column.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _parse_row(
    record: Any,
    row: int,
    origin: str,
    columns: dict[str, tuple[str, bool]],
    fallback_source: str,
) -> Example:
    def fail(name: str, problem: str) -> DataError:
        column = columns[name][0]
        return DataError(f"{origin}: row {row}: field {name!r} (column {column!r}): {problem}")

    if not isinstance(record, dict):
        raise DataError(f"{origin}: row {row}: expected a mapping, got {type(record).__name__}")

    values: dict[str, Any] = {}
    for name, (column, required) in columns.items():
        value = _lookup(record, column)
        if value is _MISSING and required:
            raise fail(name, "missing")
        values[name] = None if value is _MISSING else value

    prompt = _parse_prompt(values["prompt"], lambda problem: fail("prompt", problem))

    ground_truth = values["ground_truth"]
    # Some Hugging Face sets store integer answers; a bool or a list is a mistake, not an answer.
    if isinstance(ground_truth, int) and not isinstance(ground_truth, bool):
        ground_truth = str(ground_truth)
    if not isinstance(ground_truth, str):
        raise fail("ground_truth", f"expected a string, got {type(ground_truth).__name__}")
    if not ground_truth.strip():
        raise fail("ground_truth", "empty")
    if len(ground_truth) > MAX_GOLD_CHARS:
        # The grader reads answers of at most this length, and its checks of a gold must stay
        # cheap: a gold this long is a broken row (a solution in the answer column, a dump).
        raise fail(
            "ground_truth",
            f"{len(ground_truth):,} characters, more than the {MAX_GOLD_CHARS:,} a gold may have",
        )

    target = _parse_target(values["target"], lambda problem: fail("target", problem))

    data_source = values["data_source"]
    if data_source is None:
        data_source = fallback_source
    if not isinstance(data_source, str) or not data_source:
        raise fail("data_source", f"expected a non-empty string, got {data_source!r}")

    uid = values["uid"]
    if uid is None:
        extra_info = record.get("extra_info")
        index = extra_info.get("index") if isinstance(extra_info, dict) else None
        uid = f"{data_source}-{index if isinstance(index, int) else row}"
    elif isinstance(uid, int) and not isinstance(uid, bool):
        uid = str(uid)
    if not isinstance(uid, str) or not uid:
        raise fail("uid", f"expected a non-empty string, got {uid!r}")

    return Example(
        uid=uid,
        data_source=data_source,
        prompt=prompt,
        ground_truth=ground_truth,
        target=target,
        extra=_extras(record, columns),
    )


def _parse_prompt(value: Any, fail: Any) -> tuple[dict[str, str], ...]:
    if isinstance(value, str):  # a plain question column (most Hugging Face math sets)
        if not value.strip():
            raise fail("empty")
        return ({"role": "user", "content": value},)
    if not isinstance(value, (list, tuple)):
        raise fail(f"expected a list of messages or a string, got {type(value).__name__}")
    if not value:
        raise fail("empty")
    return tuple(_parse_message(m, i, fail) for i, m in enumerate(value))


def _parse_message(message: Any, i: int, fail: Any) -> dict[str, str]:
    if not isinstance(message, dict):
        raise fail(f"message {i}: expected a mapping, got {type(message).__name__}")
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or not role:
        raise fail(f"message {i}: 'role' must be a non-empty string, got {role!r}")
    if not isinstance(content, str):
        raise fail(f"message {i}: 'content' must be a string, got {type(content).__name__}")
    return {"role": role, "content": content}


def _parse_target(value: Any, fail: Any) -> str | None:
    if isinstance(value, (list, tuple)):  # LUFFY: [{role: assistant, content: ...}]
        messages = [_parse_message(m, i, fail) for i, m in enumerate(value)]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        if messages and not answers:
            raise fail("a message list without an assistant message")
        value = answers[-1] if answers else None
    if value is not None and not isinstance(value, str):
        raise fail(f"expected a string or a list of messages, got {type(value).__name__}")
    # Writers that cannot store nulls fill a missing demonstration with "": treat it as none.
    return value if value and value.strip() else None


def _extras(record: dict[str, Any], columns: dict[str, tuple[str, bool]]) -> dict[str, Any]:
    """Columns no field consumed, verbatim; a consumed nested field is removed from its struct."""
    extra = dict(record)
    for column, _ in columns.values():
        if column in extra:
            del extra[column]
            continue
        head, _, rest = column.partition(".")
        if rest and isinstance(extra.get(head), dict):
            inner = {k: v for k, v in extra[head].items() if k != rest}
            if inner:
                extra[head] = inner
            else:
                del extra[head]
    # pandas writes its index as a column; it is not data.
    return {k: v for k, v in extra.items() if not k.startswith("__index_level_")}


# ---------------------------------------------------------------------------------------------
# writing


def _to_row(ex: Example) -> dict[str, Any]:
    row = dict(ex.extra)
    row["data_source"] = ex.data_source
    row["prompt"] = [dict(m) for m in ex.prompt]
    reward_model = row.get("reward_model")
    style = {"style": "rule"} if not isinstance(reward_model, dict) else reward_model
    row["reward_model"] = {**style, "ground_truth": ex.ground_truth}
    row["target"] = None if ex.target is None else [{"role": "assistant", "content": ex.target}]
    row["uid"] = ex.uid
    return row
