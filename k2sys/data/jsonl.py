"""Chat JSONL: read with per-row validation and a report, write atomically.

One conversation per line:

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...],
     "tools": [{"type": "function", "function": {"name", "description", "parameters"}}, ...]}

Assistant tool calls are OpenAI-shaped, `{"id", "type": "function", "function": {"name",
"arguments"}}` with arguments a JSON object string or a dict; a tool message answers one call
through `tool_call_id`. Keys other than messages/tools are kept in `ChatRow.meta`.

Reading never drops a row silently: every line that fails validation becomes a `BadRow` (line
number + reason) in the `LoadReport`, and `LoadReport.check` stops the run when the bad fraction
passes a threshold (a file that is mostly bad is the wrong file, not noisy data). Later stages
(tokenization, length limits) add their rejects to the same report.

Normalization (so the chat template always sees one form): tool-call ids are renamed to K2's
`functions.NAME:IDX` (IDX counts calls across the conversation) and the tool messages that answer
them are renamed to match; arguments become dicts, so a dataset's calls render with one JSON
spelling whatever spacing the source used; text-only content-part lists are joined into a string.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

__all__ = ["ROLES", "ChatRow", "BadRow", "LoadReport", "BadDataError", "RowError", "normalize_conversation",
           "load_chat_jsonl", "read_chat_jsonl", "write_jsonl", "write_chat_jsonl", "iter_text_lines",
           "json_error_reason"]

ROLES = ("system", "user", "assistant", "tool")
DEFAULT_MAX_BAD_FRACTION = 0.02
"""Above 2% bad rows a file stops the run: a file that loses more is the wrong file or a broken export,
and training on what is left would silently change the data mix. Pass a larger value for data known to
be noisy (the report still lists every dropped row)."""
BOM = b"\xef\xbb\xbf"


class RowError(ValueError):
    """One conversation is invalid; the message is the reason shown in the report."""


class BadDataError(ValueError):
    """Too large a share of a file is invalid to train on it."""


@dataclass(frozen=True)
class ChatRow:
    messages: list[dict]
    tools: list[dict] | None
    line: int                         # 1-based line number in the source file (0 for in-memory rows)
    meta: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Content hash (hex sha256 of the canonical JSON): identity for the train/held-out split,
        independent of line order and of the file's whitespace or call-id spelling."""
        blob = json.dumps({"messages": self.messages, "tools": self.tools}, sort_keys=True,
                          ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def to_json(self) -> dict:
        out: dict[str, Any] = {"messages": self.messages}
        if self.tools:
            out["tools"] = self.tools
        out.update(self.meta)
        return out


@dataclass(frozen=True)
class BadRow:
    line: int
    reason: str


@dataclass
class LoadReport:
    """What happened to every line of one source: kept, or rejected with a reason."""

    source: str
    rows_seen: int = 0            # non-blank lines
    blank_lines: int = 0
    bad: list[BadRow] = field(default_factory=list)

    @property
    def n_bad(self) -> int:
        return len(self.bad)

    @property
    def n_ok(self) -> int:
        return self.rows_seen - self.n_bad

    @property
    def bad_fraction(self) -> float:
        return self.n_bad / self.rows_seen if self.rows_seen else 0.0

    def add_bad(self, line: int, reason: str) -> None:
        self.bad.append(BadRow(line, reason))

    def reasons(self) -> dict[str, int]:
        """Count of bad rows per reason kind (the text before the first ':')."""
        out: dict[str, int] = {}
        for b in self.bad:
            kind = b.reason.split(":", 1)[0]
            out[kind] = out.get(kind, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def summary(self, first: int = 5) -> str:
        head = (f"{self.source}: {self.n_ok} of {self.rows_seen} rows kept, {self.n_bad} bad "
                f"({100 * self.bad_fraction:.1f}%)")
        if not self.bad:
            return head
        kinds = ", ".join(f"{k} x{n}" for k, n in self.reasons().items())
        lines = "\n".join(f"  line {b.line}: {b.reason}" for b in sorted(self.bad, key=lambda b: b.line)[:first])
        more = f"\n  ... and {self.n_bad - first} more" if self.n_bad > first else ""
        return f"{head}; by reason: {kinds}\n{lines}{more}"

    def check(self, max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION) -> None:
        """Raise BadDataError when no row survives or the bad fraction exceeds `max_bad_fraction`.

        The message's first line says it all (file, counts, threshold, fix); the lines below it list
        the first bad rows with their reasons."""
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction={max_bad_fraction} must be within [0, 1]")
        if self.rows_seen == 0:
            raise BadDataError(f"{self.source}: no conversations (empty file); expected one JSON object per line")
        if self.n_ok == 0 or self.bad_fraction > max_bad_fraction:
            head, _, rows = self.summary().partition("\n")
            why = ("no row is usable" if self.n_ok == 0 else
                   f"bad fraction {self.bad_fraction:.3f} exceeds max_bad_fraction={max_bad_fraction}")
            raise BadDataError(
                f"{head}; {why}: fix the rows listed below or point the run at the right file (raise "
                f"data.max_bad_fraction only if this data is expected to be this noisy)"
                + (f"\n{rows}" if rows else ""))

    def to_dict(self) -> dict:
        return {"source": self.source, "rows_seen": self.rows_seen, "ok": self.n_ok, "bad": self.n_bad,
                "blank_lines": self.blank_lines, "reasons": self.reasons(),
                "bad_rows": [{"line": b.line, "reason": b.reason} for b in self.bad]}


def _text(value: Any, where: str, allow_none: bool) -> str:
    if value is None and allow_none:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        # OpenAI content parts; only text parts can become tokens here.
        parts = []
        for k, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RowError(f"unsupported content: {where}[{k}] is not a {{'type': 'text', 'text': str}} part")
            parts.append(part["text"])
        return "".join(parts)
    raise RowError(f"bad content: {where} must be a string, got {type(value).__name__}")


def _tool_calls(raw: Any, where: str, n_before: int, id_map: dict[str, str]) -> list[dict]:
    if not isinstance(raw, list):
        raise RowError(f"bad tool call: {where}.tool_calls must be a list")
    calls = []
    for j, tc in enumerate(raw):
        w = f"{where}.tool_calls[{j}]"
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict):
            raise RowError(f"bad tool call: {w} must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}")
        if tc.get("type", "function") != "function":
            raise RowError(f"bad tool call: {w}.type is {tc.get('type')!r}; only 'function' is supported")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise RowError(f"bad tool call: {w}.function.name is missing")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise RowError(f"bad tool call: {w}.function.arguments is not valid JSON ({e.msg})") from None
        if not isinstance(args, dict):
            raise RowError(f"bad tool call: {w}.function.arguments must be a JSON object, got {type(args).__name__}")
        new_id = f"functions.{name}:{n_before + j}"
        old_id = tc.get("id") or new_id
        if not isinstance(old_id, str):
            raise RowError(f"bad tool call: {w}.id must be a string")
        if old_id in id_map:
            raise RowError(f"bad tool call: {w}.id {old_id!r} is used by an earlier call")
        id_map[old_id] = new_id
        calls.append({"id": new_id, "type": "function", "function": {"name": name, "arguments": args}})
    return calls


def normalize_conversation(obj: Any) -> tuple[list[dict], list[dict] | None, dict]:
    """Validate one parsed JSON row; return (messages, tools, meta) in normalized form.

    Raises RowError whose message starts with a reason kind ("missing role: ...").
    """
    if not isinstance(obj, dict):
        raise RowError(f"not an object: the line is a JSON {type(obj).__name__}, expected {{'messages': [...]}}")
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RowError("missing messages: expected a non-empty 'messages' list")
    tools = obj.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise RowError("bad tools: 'tools' must be a list of {'type': 'function', 'function': {...}}")
        for k, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise RowError(f"bad tools: tools[{k}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
        tools = tools or None
    out: list[dict] = []
    id_map: dict[str, str] = {}     # source call id -> K2 id
    answered: set[str] = set()
    n_calls = 0
    has_assistant = False
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RowError(f"bad message: {where} must be an object")
        role = m.get("role")
        if role is None:
            raise RowError(f"missing role: {where} has no 'role'")
        if role not in ROLES:
            raise RowError(f"unknown role: {where}.role is {role!r}; allowed: {', '.join(ROLES)}")
        if role == "assistant":
            has_assistant = True
            content = _text(m.get("content"), f"{where}.content", allow_none=True)
            calls = _tool_calls(m.get("tool_calls") or [], where, n_calls, id_map)
            n_calls += len(calls)
            if not content and not calls:
                raise RowError(f"empty assistant turn: {where} has neither content nor tool_calls")
            msg: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
        elif role == "tool":
            ref = m.get("tool_call_id")
            if not isinstance(ref, str) or ref not in id_map:
                raise RowError(f"unmatched tool result: {where}.tool_call_id {ref!r} answers no earlier tool call")
            if ref in answered:
                raise RowError(f"unmatched tool result: {where}.tool_call_id {ref!r} was already answered")
            answered.add(ref)
            out.append({"role": "tool", "tool_call_id": id_map[ref],
                        "content": _text(m.get("content"), f"{where}.content", allow_none=False)})
        else:
            out.append({"role": role, "content": _text(m.get("content"), f"{where}.content", allow_none=False)})
    if not has_assistant:
        raise RowError("no assistant turn: nothing to train on")
    meta = {k: v for k, v in obj.items() if k not in ("messages", "tools")}
    return out, tools, meta


def load_chat_jsonl(path: str | os.PathLike) -> tuple[list[ChatRow], LoadReport]:
    """Read and validate every line; never raises for bad rows (see `LoadReport.check`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chat JSONL {path} not found")
    report = LoadReport(source=str(path))
    rows: list[ChatRow] = []
    with open(path, "rb") as f:
        for lineno, line in iter_text_lines(f, report):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                report.add_bad(lineno, json_error_reason(line, e))
                continue
            except RecursionError:
                report.add_bad(lineno, "too deeply nested: the JSON nests beyond Python's recursion limit")
                continue
            try:
                messages, tools, meta = normalize_conversation(obj)
            except RowError as e:
                report.add_bad(lineno, str(e))
                continue
            rows.append(ChatRow(messages, tools, lineno, meta))
    return rows, report


def iter_text_lines(f: Any, report: LoadReport) -> Iterable[tuple[int, str]]:
    """(line number, text) of every non-blank line of binary file `f` that decodes as UTF-8; the others go
    into `report` (blank lines counted, undecodable lines as bad rows). A UTF-8 byte-order mark at the start
    of the file (as Windows editors write it) is skipped, not a bad row."""
    for lineno, raw in enumerate(f, start=1):
        if lineno == 1 and raw.startswith(BOM):
            raw = raw[len(BOM):]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            report.rows_seen += 1
            enc = "; the file looks Latin-1/cp1252 encoded, re-save it as UTF-8" if _looks_latin1(raw) else ""
            report.add_bad(lineno, f"not UTF-8: byte {e.start} is 0x{raw[e.start]:02x}{enc}")
            continue
        if not line.strip():
            report.blank_lines += 1
            continue
        report.rows_seen += 1
        if "\x00" in line:
            report.add_bad(lineno, f"NUL byte: at column {line.index(chr(0)) + 1} (binary or corrupted data)")
            continue
        yield lineno, line


def _looks_latin1(raw: bytes) -> bool:
    return any(0xa0 <= b <= 0xff for b in raw) and not raw.startswith(BOM)


def json_error_reason(line: str, e: json.JSONDecodeError) -> str:
    """The report reason of a line that is not JSON: a truncated line (ends mid-object: an interrupted
    write or a cut file) says so; a BOM in the middle of a file (concatenated files) too."""
    if line.startswith("\ufeff"):
        return "not JSON: a UTF-8 byte-order mark inside the file (files concatenated?); remove it"
    # A JSON-lines string cannot span lines, so an unterminated one means the line was cut.
    cut = e.msg.startswith("Unterminated string") or e.pos >= len(line.rstrip())
    if cut and line.lstrip().startswith(("{", "[")):
        return f"truncated: the line ends inside the JSON value (at column {e.colno}); was the file cut off?"
    return f"not JSON: {e.msg} at column {e.colno}"


def read_chat_jsonl(path: str | os.PathLike,
                    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION) -> tuple[list[ChatRow], LoadReport]:
    """`load_chat_jsonl` then `report.check(max_bad_fraction)`."""
    rows, report = load_chat_jsonl(path)
    report.check(max_bad_fraction)
    return rows, report


def write_jsonl(path: str | os.PathLike, objs: Iterable[dict]) -> int:
    """Write one JSON object per line atomically (temp file in the same dir, fsync, os.replace).

    A crash leaves either the old file or the complete new one, never a torn file. Returns the count.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for obj in objs:
                f.write(json.dumps(obj, ensure_ascii=False))
                f.write("\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return n


def write_chat_jsonl(path: str | os.PathLike, conversations: Iterable[ChatRow | dict]) -> int:
    """Write conversations (ChatRow or {"messages", "tools"?} dicts, validated first) atomically."""
    def rows() -> Iterable[dict]:
        for k, c in enumerate(conversations):
            if isinstance(c, ChatRow):
                yield c.to_json()
                continue
            try:
                normalize_conversation(c)
            except RowError as e:
                raise ValueError(f"conversation {k} is invalid: {e}") from None
            yield c
    return write_jsonl(path, rows())
