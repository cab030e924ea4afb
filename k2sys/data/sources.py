"""User data from JSONL, Parquet and `datasets` save_to_disk directories: RL prompts and SFT chats.

Formats (chosen from the path; nothing is guessed from the content):

    *.jsonl / *.json / *.ndjson   one JSON object per line (JSON lines, not one JSON array)
    *.parquet / *.pq              a Parquet file (pyarrow.parquet)
    *.arrow                       one Arrow IPC file (stream or file format)
    DIR with state.json           a `datasets.Dataset.save_to_disk` directory: its *.arrow shards
                                  (Arrow IPC stream format) in the order state.json lists them
    DIR with dataset_dict.json    a `datasets.DatasetDict.save_to_disk` directory: one sub-directory
                                  per split; `split=` picks one

Arrow and Parquet are read with pyarrow directly: the `datasets` package is not needed at run time.

Row numbers: a JSONL row is numbered by its line (1-based, as an editor shows it); a Parquet/Arrow
row by its position counted from 1, so row N is `dataset[N - 1]` (the report says so). Every row
that cannot be used becomes a `BadRow` (number + reason) in the report, never a silent drop;
`LoadReport.check` stops a file that is mostly bad (see `k2sys.data.jsonl`).

Key mapping: `prompt_key`, `label_key` and `messages_key` name the columns to read. A dotted key
(`reward_model.ground_truth`) reads a nested field when no column has that literal name (the layout
of verl-style Parquet prompt sets). A key that no row has is an error naming the setting
(`data.prompt_key`, ...) and the columns the file does have; a key missing from some rows makes
those rows bad, each naming the key and the keys the row has. A null value counts as missing.

Arrow caveat: a column of nested objects (tool schemas, tool-call arguments stored as dicts) has
one struct type for the whole column, the union of every row's fields, so a row reads back with
null-valued fields it never had. Store such columns as JSON strings: a `tools` value that is a
string is decoded as JSON (an empty string means no tools), and tool-call `arguments` strings are
decoded by `normalize_conversation` as in JSONL. A struct-typed tools column logs a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .jsonl import (DEFAULT_MAX_BAD_FRACTION, BadDataError, ChatRow, LoadReport, RowError, iter_text_lines,
                    json_error_reason, normalize_conversation)

__all__ = ["PromptRecord", "SourceReport", "load_prompts", "load_chat_rows", "read_records", "source_format",
           "JSONL_SUFFIXES", "PARQUET_SUFFIXES", "ARROW_SUFFIXES"]

log = logging.getLogger("k2sys.data")

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
ARROW_SUFFIXES = (".arrow",)
_FORMS = ("a JSON-lines file (*.jsonl, *.json, *.ndjson), a Parquet file (*.parquet), an Arrow file (*.arrow), "
          "or a `datasets` save_to_disk directory (state.json or dataset_dict.json inside)")
_BATCH_ROWS = 4096


@dataclass
class SourceReport(LoadReport):
    """A `LoadReport` that knows how its rows are numbered: by line (JSONL) or by row (Arrow/Parquet)."""

    format: str = "jsonl"       # jsonl | parquet | arrow | datasets
    unit: str = "line"          # "line" (JSONL) or "row" (tabular; row N is dataset[N - 1])

    def summary(self, first: int = 5) -> str:
        text = super().summary(first)
        if self.unit == "line":
            return text
        head, sep, rest = text.partition("\n")
        head += " (rows count from 1: row N is dataset[N - 1])" if self.bad else ""
        rest = re.sub(r"^  line ", "  row ", rest, flags=re.MULTILINE)
        return head + sep + rest

    def check(self, max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION) -> None:
        if self.rows_seen == 0 and self.unit == "row":
            raise BadDataError(f"{self.source}: no rows (empty {self.format} data)")
        super().check(max_bad_fraction)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update(format=self.format, unit=self.unit)
        return out


@dataclass(frozen=True)
class PromptRecord:
    """One RL prompt. `prompt` is the text, or a chat message list (normalized like SFT data, ending
    with a user or tool turn); `label` is the reference the reward checks against (any JSON value;
    None when loaded with label_key=None); `metadata` holds every other column of the row."""

    prompt: str | list[dict]
    label: Any
    metadata: dict
    id: str
    """Content hash of (prompt, label): stable across runs, file formats and row order; duplicated
    rows share it."""
    row: int
    """Line (JSONL) or 1-based row number (Arrow/Parquet) in the source, as in the report."""


def source_format(path: str | os.PathLike) -> str:
    """"jsonl", "parquet", "arrow" or "datasets" for `path`, or a ValueError naming the accepted forms."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data source {p} not found; expected {_FORMS}")
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return "datasets"
        raise BadDataError(f"{p} is a directory but not a `datasets` save_to_disk directory (no state.json or "
                         f"dataset_dict.json in it); expected {_FORMS}")
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in ARROW_SUFFIXES:
        return "arrow"
    raise BadDataError(f"{p}: unsupported data file suffix {p.suffix!r}; expected {_FORMS}")


# ----------------------------------------------------------------------------------------------
# Reading rows


@dataclass
class _Rows:
    report: SourceReport
    rows: list[tuple[int, dict]]
    columns: list[str] | None            # the schema of tabular data; None for JSONL (keys vary by row)
    schema: Any = None                   # pyarrow.Schema of tabular data
    key_counts: dict[str, int] = field(default_factory=dict)   # JSONL: how many rows have each key


def _read_jsonl(path: Path) -> _Rows:
    report = SourceReport(source=str(path), format="jsonl", unit="line")
    rows: list[tuple[int, dict]] = []
    counts: dict[str, int] = {}
    with open(path, "rb") as f:
        for lineno, line in iter_text_lines(f, report):
            if lineno == 1 and line.lstrip().startswith("["):
                raise BadDataError(f"{path}: starts with '[': this looks like one JSON array, but JSON data is read "
                                   f"as JSON lines (one object per line); convert it, e.g. "
                                   f"`python -c \"import json,sys; [print(json.dumps(o)) for o in "
                                   f"json.load(sys.stdin)]\" "
                                   f"< {path.name} > {path.stem}.jsonl`")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                report.add_bad(lineno, json_error_reason(line, e))
                continue
            except RecursionError:
                report.add_bad(lineno, "too deeply nested: the JSON nests beyond Python's recursion limit")
                continue
            if not isinstance(obj, dict):
                report.add_bad(lineno, f"not an object: the line is a JSON {type(obj).__name__}, expected {{...}}")
                continue
            for k in obj:
                counts[k] = counts.get(k, 0) + 1
            rows.append((lineno, obj))
    return _Rows(report, rows, None, key_counts=counts)


def _arrow_batches(path: Path):
    """Record batches and schema of one Arrow IPC file, stream format (what `datasets` writes) or file format."""
    import pyarrow as pa

    source = pa.memory_map(str(path), "r")
    try:
        reader = pa.ipc.open_stream(source)
        return reader.schema, iter(reader)
    except pa.ArrowInvalid:
        pass
    try:
        reader = pa.ipc.open_file(source)
    except pa.ArrowInvalid as e:
        raise BadDataError(f"{path}: not an Arrow IPC file (neither stream nor file format): {e}") from None
    return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))


def _dataset_dir_files(path: Path, split: str | None) -> tuple[list[Path], str]:
    """The Arrow shards of a save_to_disk directory, in order, and a display name for the report."""
    dict_file = path / "dataset_dict.json"
    if dict_file.is_file():
        try:
            splits = json.loads(dict_file.read_text())["splits"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise BadDataError(f"{dict_file}: not a `datasets` dataset_dict.json ({e!r}); "
                             f"expected {{\"splits\": [...]}}") from None
        if split is None:
            raise BadDataError(f"{path} is a `datasets` DatasetDict with splits {', '.join(map(repr, splits))}; "
                             f"choose one with split= (e.g. split={splits[0]!r})")
        if split not in splits:
            raise BadDataError(f"{path}: no split {split!r}; the DatasetDict has splits {', '.join(map(repr, splits))}")
        files, _ = _dataset_dir_files(path / split, None)
        return files, f"{path}[{split}]"
    if split is not None:
        raise BadDataError(f"split={split!r} given, but {path} is a single `datasets` Dataset (no dataset_dict.json), "
                         f"which has no splits; leave split unset")
    state = path / "state.json"
    if state.is_file():
        try:
            names = [d["filename"] for d in json.loads(state.read_text())["_data_files"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise BadDataError(f"{state}: cannot read the shard list '_data_files' ({e!r}); is this a "
                             f"`datasets` save_to_disk directory?") from None
        files = [path / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: state.json lists Arrow shards that are missing: {', '.join(missing)}")
        return files, str(path)
    raise BadDataError(f"{path} is not a `datasets` save_to_disk directory (no state.json or dataset_dict.json)")


def _read_tabular(path: Path, fmt: str, split: str | None) -> _Rows:
    import pyarrow as pa

    if fmt == "datasets":
        files, source = _dataset_dir_files(path, split)
    else:
        if split is not None:
            raise BadDataError(f"split={split!r} given, but {path} is a single {fmt} file, which has no splits; "
                             f"leave split unset")
        files, source = [path], str(path)
    report = SourceReport(source=source, format=fmt, unit="row")
    rows: list[tuple[int, dict]] = []
    schema = None
    n = 0
    for f in files:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            try:
                pf = pq.ParquetFile(str(f))
            except (pa.ArrowInvalid, OSError) as e:
                raise BadDataError(f"{f}: not a readable Parquet file: {e}") from None
            file_schema, batches = pf.schema_arrow, pf.iter_batches(batch_size=_BATCH_ROWS)
        else:
            file_schema, batches = _arrow_batches(f)
        if schema is None:
            schema = file_schema
        elif file_schema.names != schema.names:
            raise BadDataError(f"{f}: columns {file_schema.names} differ from the first shard's {schema.names}")
        try:
            for batch in batches:
                for obj in batch.to_pylist():
                    n += 1
                    rows.append((n, obj))
        except (pa.ArrowException, OSError) as e:
            # A cut-off file reads until its last complete batch; losing the rest silently is data loss.
            raise BadDataError(f"{f}: cannot read past row {n} ({e}); the file is truncated or corrupt. "
                               f"Re-export it") from None
    report.rows_seen = n
    return _Rows(report, rows, list(schema.names) if schema is not None else [], schema=schema)


def _read(path: str | os.PathLike, split: str | None) -> _Rows:
    p = Path(path)
    fmt = source_format(p)
    if fmt == "jsonl":
        if split is not None:
            raise BadDataError(f"split={split!r} given, but {p} is a JSON-lines file, which has no splits; "
                             f"leave split unset")
        return _read_jsonl(p)
    return _read_tabular(p, fmt, split)


def read_records(path: str | os.PathLike, *, split: str | None = None) -> tuple[list[tuple[int, dict]], SourceReport]:
    """Every readable row of a source as (row number, dict). Unreadable JSONL lines (not UTF-8, not
    JSON, not an object) are in the report; Arrow/Parquet rows are always readable."""
    data = _read(path, split)
    return data.rows, data.report


# ----------------------------------------------------------------------------------------------
# Key mapping


_MISSING = object()


def _lookup(row: dict, key: str) -> Any:
    """row[key], or the nested field for a dotted key that is not itself a column; _MISSING if absent or null."""
    if key in row:
        value = row[key]
        return _MISSING if value is None else value
    if "." in key:
        node: Any = row
        for part in key.split("."):
            if not isinstance(node, dict) or node.get(part) is None:
                return _MISSING
            node = node[part]
        return node
    return _MISSING


def _missing_reason(kind: str, row: dict, key: str) -> str:
    if key in row:
        return f"missing {kind}: '{key}' is null"
    keys = ", ".join(map(repr, row)) or "none"
    if "." in key:
        head, node, walked = key.split("."), row, []
        for part in head:
            if not isinstance(node, dict) or part not in node or node[part] is None:
                where = f"'{'.'.join(walked)}'" if walked else "the row"
                have = ", ".join(map(repr, node)) if isinstance(node, dict) else f"a {type(node).__name__}"
                if isinstance(node, dict) and part in node:
                    return f"missing {kind}: '{'.'.join(walked + [part])}' is null (key '{key}')"
                return f"missing {kind}: {where} has no '{part}' (needed for key '{key}'; it has: {have or 'none'})"
            node, walked = node[part], walked + [part]
    return f"missing {kind}: row has no '{key}' (its keys: {keys})"


def _require_key(data: _Rows, key: str, setting: str, kind: str, hint: str = "") -> None:
    """Raise when `key` is absent from every row: the mapping is wrong, not the rows."""
    if not data.rows:
        return          # nothing readable: the report says why
    names = data.columns if data.columns is not None else list(data.key_counts)
    if key in names:
        return
    if "." in key and key.split(".", 1)[0] in names:
        # A nested field: present when at least one row has it.
        if any(_lookup(row, key) is not _MISSING for _, row in data.rows):
            return
    if data.columns is None:
        names = sorted(names, key=lambda k: -data.key_counts[k])     # the most common keys first
    shown = ", ".join(map(repr, names[:40])) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
    raise BadDataError(f"{data.report.source}: no row has the {kind} key {key!r} ({setting}={key}); "
                       f"the {'columns' if data.columns is not None else 'keys'} present are: {shown or 'none'}. "
                       f"Set {setting} to the column that holds the {kind}{hint}")


def _record_id(prompt: Any, label: Any) -> str:
    blob = json.dumps({"prompt": prompt, "label": label}, sort_keys=True, ensure_ascii=False,
                      separators=(",", ":"), default=repr)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _prompt_messages(msgs: list, key: str) -> list[dict]:
    """Validate a prompt given as chat messages; it must end where the model answers (a user or tool turn)."""
    if not msgs:
        raise RowError(f"bad prompt: '{key}' is an empty message list")
    last = msgs[-1]
    role = last.get("role") if isinstance(last, dict) else None
    if role not in ("user", "tool"):
        raise RowError(f"bad prompt: '{key}' must end with a user or tool message for the model to answer, "
                       f"its last message has role {role!r}")
    # The same validation and normalization as SFT conversations; the placeholder assistant turn only
    # satisfies normalize_conversation's "something to train on" rule and is removed again.
    messages, _, _ = normalize_conversation({"messages": list(msgs) + [{"role": "assistant", "content": "."}]})
    return messages[:-1]


def _prompt_value(value: Any, key: str, messages_only: bool) -> str | list[dict]:
    if isinstance(value, list):
        return _prompt_messages(value, key)
    if messages_only:
        raise RowError(f"bad prompt: '{key}' must be a list of chat messages, got {type(value).__name__}")
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"empty prompt: '{key}' is blank")
        return value
    raise RowError(f"bad prompt: '{key}' must be a string or a list of chat messages, got {type(value).__name__}")


def load_prompts(path: str | os.PathLike, *, prompt_key: str = "prompt", label_key: str | None = "answer",
                 messages_key: str | None = None, split: str | None = None,
                 max_bad_fraction: float | None = DEFAULT_MAX_BAD_FRACTION) -> tuple[list[PromptRecord], SourceReport]:
    """RL prompts of a user's data set.

    The prompt is read from `messages_key` (a chat message list) when it is given, else from
    `prompt_key` (a string, or a message list when the column holds messages). `label_key=None`
    loads no labels (for rewards that need none). Other columns become `metadata`.
    Raises BadDataError when a key is absent from every row, and (unless max_bad_fraction is None)
    when the report's bad fraction passes `max_bad_fraction`.
    """
    data = _read(path, split)
    if messages_key is not None:
        pkey, psetting = messages_key, "data.messages_key"
    else:
        pkey, psetting = prompt_key, "data.prompt_key"
    _require_key(data, pkey, psetting, "prompt")
    if label_key is not None:
        _require_key(data, label_key, "data.label_key", "label",
                     " (or set it to none when the reward needs no label)")
    used = {pkey} | ({label_key} if label_key is not None else set())
    out: list[PromptRecord] = []
    for row_no, row in data.rows:
        try:
            raw = _lookup(row, pkey)
            if raw is _MISSING:
                raise RowError(_missing_reason("prompt", row, pkey))
            prompt = _prompt_value(raw, pkey, messages_only=messages_key is not None)
            label = None
            if label_key is not None:
                label = _lookup(row, label_key)
                if label is _MISSING:
                    raise RowError(_missing_reason("label", row, label_key))
        except RowError as e:
            data.report.add_bad(row_no, str(e))
            continue
        meta = {k: v for k, v in row.items() if k not in used}
        out.append(PromptRecord(prompt=prompt, label=label, metadata=meta, id=_record_id(prompt, label), row=row_no))
    data.report.bad.sort(key=lambda b: b.line)
    if max_bad_fraction is not None:
        data.report.check(max_bad_fraction)
    return out, data.report


def _warn_struct_tools(data: _Rows, tools_key: str) -> None:
    if data.schema is None or tools_key not in data.schema.names:
        return
    import pyarrow as pa

    t = data.schema.field(tools_key).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
        log.warning("%s: column %r is stored as Arrow %s; Arrow gives a column one struct type, the union of every "
                    "row's fields, so tool schemas read back with null-valued fields they never had. Store tools as "
                    "a JSON string column.", data.report.source, tools_key, t)


def load_chat_rows(path: str | os.PathLike, *, messages_key: str = "messages", tools_key: str | None = "tools",
                   split: str | None = None) -> tuple[list[ChatRow], SourceReport]:
    """SFT conversations from any supported source, as `load_chat_jsonl` does for JSONL: every row
    validated and normalized by `normalize_conversation`; bad rows go to the report; never raises for
    bad rows (call `report.check(max_bad_fraction)` after later stages added their rejects).

    `tools_key=None` reads no tools. A tools value may be a list or a JSON string of one."""
    data = _read(path, split)
    _require_key(data, messages_key, "data.messages_key", "messages")
    if tools_key is not None and tools_key != "tools":
        # An explicitly mapped tools column that no row has is a wrong mapping, not "no tools".
        _require_key(data, tools_key, "data.tools_key", "tools", " (or set it to none for data without tools)")
    if tools_key is not None:
        _warn_struct_tools(data, tools_key)
    used = {messages_key} | ({tools_key} if tools_key is not None else set())
    out: list[ChatRow] = []
    for row_no, row in data.rows:
        try:
            msgs = _lookup(row, messages_key)
            if msgs is _MISSING:
                raise RowError(_missing_reason("messages", row, messages_key))
            if isinstance(msgs, str):
                raise RowError(f"bad messages: '{messages_key}' is a string; expected a list of "
                               f"{{'role', 'content'}} messages")
            tools = _lookup(row, tools_key) if tools_key is not None else _MISSING
            if isinstance(tools, str):
                if not tools.strip():
                    tools = _MISSING
                else:
                    try:
                        tools = json.loads(tools)
                    except json.JSONDecodeError as e:
                        raise RowError(f"bad tools: '{tools_key}' is a string but not JSON ({e.msg})") from None
            obj = {"messages": msgs}
            if tools is not _MISSING:
                obj["tools"] = tools
            messages, tools_out, _ = normalize_conversation(obj)
        except RowError as e:
            data.report.add_bad(row_no, str(e))
            continue
        meta = {k: v for k, v in row.items() if k not in used}
        out.append(ChatRow(messages, tools_out, row_no, meta))
    data.report.bad.sort(key=lambda b: b.line)
    return out, data.report
