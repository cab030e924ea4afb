"""The tool library: validated JSON-schema tool specs with provenance, deduplicated, stored as JSONL.

One tool per line of `tools.jsonl`:

    {"name", "description", "parameters": JSON schema of the arguments object,
     "source": "mcp" | "synthetic" | "builtin", "category", "domain",
     "server": {"name", "command": [...], "env", "cwd"} | null    (how to start the real MCP server)
     "provenance": {...}}                                          (who made it, from what, when)

Validation (`validate_tool`): a name an OpenAI function and a K2 tool-call id accept
(`[A-Za-z_][A-Za-z0-9_-]{0,63}`), a description, and `parameters` a valid JSON schema
(jsonschema's check_schema for its draft) of type object whose `required` names its properties;
synthetic tools must also describe and type every argument (an imported server is taken as it is).

Deduplication (`ToolLibrary.add`): candidates are embedded with the hashed n-gram TF-IDF of
`k2sys.data.synth.embed` and a candidate whose cosine similarity to a tool already kept is at or
above the threshold is dropped as a near-duplicate (reported with what it duplicates); a kept
candidate whose name is taken is renamed NAME_2, NAME_3, ... Tools already in the library stay.

`AppendLog` is the resumable record file used for trajectories: one JSON object per line written
with a single O_APPEND write and fsync, a torn last line (a kill mid-write) cut off on reopening.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..jsonl import write_jsonl
from .embed import embed_texts, greedy_dedup, tool_text

__all__ = ["LibraryTool", "ToolSchemaError", "ToolLibrary", "AddReport", "validate_tool", "TOOL_NAME_RE",
           "sanitize_name", "AppendLog", "read_jsonl", "write_json_atomic", "DEFAULT_DEDUP_THRESHOLD"]

TOOL_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
SOURCES = ("mcp", "synthetic", "builtin")
DEFAULT_DEDUP_THRESHOLD = 0.85
MAX_DESCRIPTION = 2000


class ToolSchemaError(ValueError):
    """A tool spec that cannot go into the library; the message names the field."""


@dataclass
class LibraryTool:
    name: str
    description: str
    parameters: dict
    source: str = "synthetic"
    category: str = "general"
    domain: str = "general"
    server: dict | None = None
    provenance: dict = field(default_factory=dict)

    @property
    def real(self) -> bool:
        """Executed by a real MCP server (else simulated)."""
        return self.source == "mcp" and self.server is not None

    def openai(self) -> dict:
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def text(self) -> str:
        return tool_text(self.name, self.description, self.parameters)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "LibraryTool":
        known = {k: d[k] for k in ("name", "description", "parameters", "source", "category", "domain", "server",
                                   "provenance") if k in d}
        return cls(**known)


def sanitize_name(name: str) -> str:
    """A valid tool name close to `name` (invalid characters become '_', cut to 64)."""
    s = re.sub(r"[^A-Za-z0-9_-]", "_", str(name)).strip("-") or "tool"
    if not re.match(r"[A-Za-z_]", s):
        s = "t_" + s
    return s[:64]


def validate_tool(raw: Any, *, strict: bool = True) -> LibraryTool:
    """Check one tool spec (a dict or LibraryTool); return it as a LibraryTool or raise ToolSchemaError.

    `raw` may also be OpenAI-shaped ({"type": "function", "function": {...}}). `strict` (synthetic
    tools): every argument has a type (or enum/anyOf/oneOf/$ref) and a description.
    """
    import jsonschema

    if isinstance(raw, LibraryTool):
        raw = raw.to_json()
    if not isinstance(raw, dict):
        raise ToolSchemaError(f"tool must be an object, got {type(raw).__name__}")
    if isinstance(raw.get("function"), dict):
        raw = {**{k: v for k, v in raw.items() if k not in ("function", "type")}, **raw["function"]}
    name = raw.get("name")
    if not isinstance(name, str) or not TOOL_NAME_RE.match(name):
        raise ToolSchemaError(f"name {name!r}: must match {TOOL_NAME_RE.pattern}")
    desc = raw.get("description")
    if not isinstance(desc, str) or not desc.strip():
        raise ToolSchemaError(f"{name}: description must be a non-empty string")
    if len(desc) > MAX_DESCRIPTION:
        raise ToolSchemaError(f"{name}: description longer than {MAX_DESCRIPTION} characters")
    params = raw.get("parameters", raw.get("inputSchema", raw.get("input_schema")))
    if not isinstance(params, dict):
        raise ToolSchemaError(f"{name}: parameters must be a JSON schema object")
    try:
        jsonschema.validators.validator_for(params).check_schema(params)
    except jsonschema.SchemaError as e:
        raise ToolSchemaError(f"{name}: parameters is not a valid JSON schema ({e.message[:200]})") from None
    if params.get("type") != "object":
        raise ToolSchemaError(f"{name}: parameters.type must be 'object' (the arguments object)")
    props = params.get("properties", {})
    if not isinstance(props, dict):
        raise ToolSchemaError(f"{name}: parameters.properties must be an object")
    req = params.get("required", [])
    missing = [r for r in req if r not in props]
    if missing:
        raise ToolSchemaError(f"{name}: required names undeclared properties {missing}")
    if strict:
        for p, s in props.items():
            if not isinstance(s, dict) or not any(k in s for k in ("type", "enum", "anyOf", "oneOf", "$ref", "const")):
                raise ToolSchemaError(f"{name}: argument {p!r} has no type")
            if not isinstance(s.get("description"), str) or not s["description"].strip():
                raise ToolSchemaError(f"{name}: argument {p!r} has no description")
    source = raw.get("source", "synthetic")
    if source not in SOURCES:
        raise ToolSchemaError(f"{name}: source must be one of {SOURCES}, got {source!r}")
    return LibraryTool(name=name, description=desc.strip(), parameters=params, source=source,
                       category=str(raw.get("category") or "general"), domain=str(raw.get("domain") or "general"),
                       server=raw.get("server"), provenance=dict(raw.get("provenance") or {}))


@dataclass
class AddReport:
    added: list[str] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)            # (old, new)
    duplicates: list[tuple[str, str, float]] = field(default_factory=list)  # (dropped, kept, similarity)
    invalid: list[tuple[str, str]] = field(default_factory=list)            # (name or index, reason)

    def to_dict(self) -> dict:
        return {"added": len(self.added), "renamed": len(self.renamed), "duplicates": len(self.duplicates),
                "invalid": len(self.invalid), "duplicate_pairs": self.duplicates[:50], "invalid_reasons": self.invalid[:50]}


class ToolLibrary:
    def __init__(self, tools: Iterable[LibraryTool] = ()):
        self.tools: list[LibraryTool] = []
        self.by_name: dict[str, LibraryTool] = {}
        for t in tools:
            if t.name in self.by_name:
                raise ToolSchemaError(f"tool name {t.name!r} appears twice in the library")
            self.tools.append(t)
            self.by_name[t.name] = t

    def __len__(self) -> int:
        return len(self.tools)

    def __getitem__(self, name: str) -> LibraryTool:
        return self.by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def add(self, candidates: Sequence[Any], *, threshold: float = DEFAULT_DEDUP_THRESHOLD,
            strict: bool | None = None) -> AddReport:
        """Validate, deduplicate and append candidates (see the module doc); returns what happened."""
        rep = AddReport()
        valid: list[LibraryTool] = []
        for k, raw in enumerate(candidates):
            try:
                src = raw.source if isinstance(raw, LibraryTool) else (raw.get("source", "synthetic")
                                                                       if isinstance(raw, dict) else "synthetic")
                valid.append(validate_tool(raw, strict=(src == "synthetic") if strict is None else strict))
            except ToolSchemaError as e:
                label = raw.get("name") if isinstance(raw, dict) and isinstance(raw.get("name"), str) else f"#{k}"
                rep.invalid.append((label, str(e)))
        if not valid:
            return rep
        n0 = len(self.tools)
        everyone = self.tools + valid
        emb = embed_texts([t.text() for t in everyone])
        dropped = {i: (j, s) for i, j, s in greedy_dedup(emb, threshold, keep_first=n0)}
        for off, t in enumerate(valid):
            i = n0 + off
            if i in dropped:
                j, s = dropped[i]
                rep.duplicates.append((t.name, everyone[j].name, round(s, 4)))
                continue
            name = t.name
            if name in self.by_name:
                k = 2
                while f"{name[:60]}_{k}" in self.by_name:
                    k += 1
                t.name = f"{name[:60]}_{k}"
                rep.renamed.append((name, t.name))
            self.tools.append(t)
            self.by_name[t.name] = t
            rep.added.append(t.name)
        return rep

    def counts(self) -> dict:
        by_source: dict[str, int] = {}
        by_category: dict[str, int] = {}
        for t in self.tools:
            by_source[t.source] = by_source.get(t.source, 0) + 1
            by_category[t.category] = by_category.get(t.category, 0) + 1
        return {"tools": len(self.tools), "by_source": by_source, "by_category": dict(sorted(by_category.items()))}

    def save(self, path: str | os.PathLike) -> int:
        return write_jsonl(path, (t.to_json() for t in self.tools))

    @classmethod
    def load(cls, path: str | os.PathLike, *, missing_ok: bool = False) -> "ToolLibrary":
        p = Path(path)
        if not p.exists():
            if missing_ok:
                return cls()
            raise FileNotFoundError(f"{p}: no tool library here; build one with `k2sys synth tools`")
        tools = []
        for line_no, obj in read_jsonl(p):
            try:
                tools.append(validate_tool(obj, strict=False))
            except ToolSchemaError as e:
                raise ToolSchemaError(f"{p}:{line_no}: {e}") from None
        return cls(tools)


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, object) for every non-empty line; a bad line raises ValueError naming it."""
    out = []
    with open(path, encoding="utf-8") as f:
        for k, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{k}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{k}: expected a JSON object")
            out.append((k, obj))
    return out


def write_json_atomic(path: str | os.PathLike, obj: Any, text: str | None = None) -> None:
    """Write JSON (or `text`) atomically: temp file in the same directory, fsync, os.replace."""
    import tempfile

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text if text is not None else json.dumps(obj, ensure_ascii=False, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class AppendLog:
    """A JSONL file of records appended one at a time, safe to kill at any point.

    Opening it reads the records already there and cuts off a torn last line (a write that a kill
    interrupted); `append` writes one whole line with one O_APPEND write and fsyncs, so a record is
    either entirely in the file or not at all. `key` names the field that identifies a record.
    """

    def __init__(self, path: str | os.PathLike, key: str = "id"):
        self.path, self.key = Path(path), key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        self.torn = 0
        if self.path.exists():
            data = self.path.read_bytes()
            good = 0
            pos = 0
            while pos < len(data):
                nl = data.find(b"\n", pos)
                if nl < 0:
                    break   # no newline: a torn last line
                line = data[pos:nl]
                try:
                    obj = json.loads(line) if line.strip() else None
                except (json.JSONDecodeError, UnicodeDecodeError):
                    break   # a torn line in the middle is not expected; keep what came before
                if isinstance(obj, dict):
                    self.records.append(obj)
                pos = good = nl + 1
            if good < len(data):
                self.torn = len(data) - good
                with open(self.path, "r+b") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())
        self.ids = {r.get(key) for r in self.records}
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        n = os.write(self._fd, line)
        if n != len(line):   # a short write on a regular file: the disk is full
            raise OSError(f"{self.path}: short write ({n} of {len(line)} bytes)")
        os.fsync(self._fd)
        self.records.append(record)
        self.ids.add(record.get(self.key))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "AppendLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
