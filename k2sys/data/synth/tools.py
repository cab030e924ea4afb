"""Tool library and tool simulator for tool-use data synthesis (seed section 3.1, 3.3).

A `ToolSpec` is the interface the model sees (name, description, JSON-schema parameters, in the
OpenAI `tools` shape) plus an implementation. The built-in library is small and exact:
calculator (safe arithmetic), unit conversion, lookup tables, and a stateful notebook.

`ToolSimulator` executes calls for one episode: it validates arguments against the schema
(errors come back to the agent as tool results, as a real tool would answer), keeps per-episode
state (the notebook), and injects seeded transient failures so trajectories include
recoveries; the judge later decides which trajectories are good enough to keep.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import random
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["ToolSpec", "ToolError", "TOOL_LIBRARY", "LOOKUP_TABLES", "UNITS", "ToolSimulator", "validate_args",
           "calculate", "canonical_number", "convert_units", "format_number"]


class ToolError(Exception):
    """A tool refused the call; the message goes back to the agent as the tool result."""


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict            # JSON schema of the arguments object
    fn: Callable[..., Any]      # fn(state: dict, **args) -> JSON-serialisable result
    category: str = "general"

    def openai(self) -> dict:
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


def format_number(x: float) -> str:
    """Canonical text of a numeric result: integers without '.0', else up to 6 decimals."""
    if isinstance(x, bool):
        raise TypeError("bool is not a number here")
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.6f}".rstrip("0").rstrip(".")


_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def calculate(expression: str) -> float:
    """Evaluate +, -, *, /, //, %, ** and parentheses over numbers; nothing else is allowed."""
    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(b) > 64:
                raise ToolError("exponent too large (limit 64)")
            try:
                return _BIN[type(node.op)](a, b)
            except ZeroDivisionError:
                raise ToolError("division by zero") from None
        raise ToolError(f"unsupported syntax {type(node).__name__}; use numbers, + - * / // % ** and parentheses")
    if len(expression) > 200:
        raise ToolError("expression longer than 200 characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse expression {expression!r}") from None
    value = ev(tree)
    if not math.isfinite(value):
        raise ToolError("result is not finite")
    return value


# unit -> (dimension, factor to the SI base unit); temperature is affine and handled apart.
UNITS: dict[str, tuple[str, float]] = {
    "m": ("length", 1.0), "km": ("length", 1000.0), "cm": ("length", 0.01), "mm": ("length", 0.001),
    "mi": ("length", 1609.344), "ft": ("length", 0.3048), "in": ("length", 0.0254), "yd": ("length", 0.9144),
    "kg": ("mass", 1.0), "g": ("mass", 0.001), "lb": ("mass", 0.45359237), "oz": ("mass", 0.028349523125),
    "s": ("time", 1.0), "min": ("time", 60.0), "h": ("time", 3600.0), "day": ("time", 86400.0),
    "C": ("temperature", 1.0), "F": ("temperature", 1.0), "K": ("temperature", 1.0),
}


def convert_units(value: float, from_unit: str, to_unit: str) -> float:
    if from_unit not in UNITS or to_unit not in UNITS:
        bad = from_unit if from_unit not in UNITS else to_unit
        raise ToolError(f"unknown unit {bad!r}; known: {', '.join(UNITS)}")
    dim_a, dim_b = UNITS[from_unit][0], UNITS[to_unit][0]
    if dim_a != dim_b:
        raise ToolError(f"cannot convert {dim_a} ({from_unit}) to {dim_b} ({to_unit})")
    if dim_a == "temperature":
        kelvin = {"C": value + 273.15, "F": (value - 32) * 5 / 9 + 273.15, "K": value}[from_unit]
        return {"C": kelvin - 273.15, "F": (kelvin - 273.15) * 9 / 5 + 32, "K": kelvin}[to_unit]
    return value * UNITS[from_unit][1] / UNITS[to_unit][1]


LOOKUP_TABLES: dict[str, dict[str, Any]] = {
    "country_capital": {"France": "Paris", "Germany": "Berlin", "Japan": "Tokyo", "Brazil": "Brasilia",
                        "Kenya": "Nairobi", "Canada": "Ottawa", "Australia": "Canberra", "Egypt": "Cairo",
                        "Peru": "Lima", "Norway": "Oslo"},
    "element_atomic_number": {"hydrogen": 1, "helium": 2, "carbon": 6, "nitrogen": 7, "oxygen": 8,
                              "sodium": 11, "iron": 26, "copper": 29, "silver": 47, "gold": 79},
    "country_calling_code": {"France": 33, "Germany": 49, "Japan": 81, "Brazil": 55, "Kenya": 254,
                             "Canada": 1, "Australia": 61, "Egypt": 20, "Peru": 51, "Norway": 47},
}


def canonical_number(x: float) -> int | float:
    """The number a tool returns: rounded as `format_number` prints it, int when integral."""
    s = format_number(x)
    return float(s) if "." in s else int(s)


def _tool_calculator(state: dict, expression: str) -> dict:
    return {"value": canonical_number(calculate(expression))}


def _tool_convert(state: dict, value: float, from_unit: str, to_unit: str) -> dict:
    return {"value": canonical_number(convert_units(value, from_unit, to_unit)), "unit": to_unit}


def _tool_lookup(state: dict, table: str, key: str) -> dict:
    rows = LOOKUP_TABLES[table]
    for k, v in rows.items():
        if k.casefold() == key.strip().casefold():
            return {"table": table, "key": k, "value": v}
    raise ToolError(f"{key!r} not in table {table}; keys: {', '.join(rows)}")


def _tool_save_note(state: dict, title: str, text: str) -> dict:
    notes = state.setdefault("notes", {})
    notes[title] = text
    return {"saved": title, "count": len(notes)}


def _tool_read_notes(state: dict) -> dict:
    return {"notes": dict(state.get("notes", {}))}


TOOL_LIBRARY: dict[str, ToolSpec] = {t.name: t for t in (
    ToolSpec("calculator", "Evaluate an arithmetic expression (+ - * / // % ** and parentheses).",
             {"type": "object", "properties": {"expression": {"type": "string", "description": "e.g. (3+4)*2"}},
              "required": ["expression"], "additionalProperties": False}, _tool_calculator, "math"),
    ToolSpec("convert_units", "Convert a quantity between units of length, mass, time or temperature.",
             {"type": "object", "properties": {"value": {"type": "number"},
                                               "from_unit": {"type": "string", "enum": list(UNITS)},
                                               "to_unit": {"type": "string", "enum": list(UNITS)}},
              "required": ["value", "from_unit", "to_unit"], "additionalProperties": False}, _tool_convert, "science"),
    ToolSpec("lookup", "Look up a value in a reference table.",
             {"type": "object", "properties": {"table": {"type": "string", "enum": list(LOOKUP_TABLES)},
                                               "key": {"type": "string"}},
              "required": ["table", "key"], "additionalProperties": False}, _tool_lookup, "knowledge"),
    ToolSpec("save_note", "Save a short note under a title in the user's notebook (overwrites).",
             {"type": "object", "properties": {"title": {"type": "string"}, "text": {"type": "string"}},
              "required": ["title", "text"], "additionalProperties": False}, _tool_save_note, "productivity"),
    ToolSpec("read_notes", "Read all notes in the user's notebook.",
             {"type": "object", "properties": {}, "additionalProperties": False}, _tool_read_notes, "productivity"),
)}

_JSON_TYPES = {"string": str, "number": (int, float), "integer": int, "boolean": bool, "object": dict, "array": list}


def validate_args(spec: ToolSpec, args: Any) -> None:
    """Check `args` against the spec's schema (the subset the library uses); raise ToolError."""
    schema = spec.parameters
    if not isinstance(args, dict):
        raise ToolError(f"{spec.name}: arguments must be a JSON object")
    props = schema.get("properties", {})
    missing = [k for k in schema.get("required", []) if k not in args]
    if missing:
        raise ToolError(f"{spec.name}: missing required argument(s) {', '.join(missing)}")
    for k, v in args.items():
        if k not in props:
            if schema.get("additionalProperties", True) is False:
                raise ToolError(f"{spec.name}: unknown argument {k!r}; allowed: {', '.join(props) or 'none'}")
            continue
        p = props[k]
        want = _JSON_TYPES[p["type"]]
        if not isinstance(v, want) or (p["type"] in ("number", "integer") and isinstance(v, bool)):
            raise ToolError(f"{spec.name}: argument {k!r} must be a {p['type']}, got {type(v).__name__}")
        if "enum" in p and v not in p["enum"]:
            raise ToolError(f"{spec.name}: argument {k!r}={v!r} is not one of {p['enum']}")


@dataclass
class ToolSimulator:
    """Executes tool calls for one episode; state persists across calls within the episode."""

    tools: dict[str, ToolSpec]
    rng: random.Random
    failure_rate: float = 0.0
    """Probability that a valid call fails transiently ("unavailable, retry"): exercises recovery."""
    state: dict = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0.0 <= self.failure_rate < 1.0:
            raise ValueError(f"failure_rate={self.failure_rate} must be in [0, 1)")

    def call(self, name: str, args: Any) -> str:
        """Run one call; return the tool message content (JSON). Every call is logged with `ok`."""
        entry: dict[str, Any] = {"name": name, "args": args, "ok": False}
        try:
            spec = self.tools.get(name)
            if spec is None:
                raise ToolError(f"no tool named {name!r}; available: {', '.join(self.tools)}")
            validate_args(spec, args)
            # Draw for every valid call, so the failure pattern depends only on the call sequence.
            if self.rng.random() < self.failure_rate:
                entry["transient"] = True
                raise ToolError(f"{name} is temporarily unavailable; retry the same call")
            result = spec.fn(self.state, **args)
            entry.update(ok=True, result=result)
            content = json.dumps(result, ensure_ascii=False)
        except ToolError as e:
            entry["error"] = str(e)
            content = json.dumps({"error": str(e)}, ensure_ascii=False)
        self.log.append(entry)
        return content
