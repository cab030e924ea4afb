"""Reference MCP server: arithmetic, unit conversion and summary statistics (stateless)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

import ast
import math
import operator
import statistics as st

try:
    from ._common import ToolError, new_server
except ImportError:  # run as a script
    from _common import ToolError, new_server

app = new_server("calculator", "Exact arithmetic, unit conversion and statistics. Use it for every number.")

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_FUNCS = {"sqrt": math.sqrt, "abs": abs, "round": round, "log": math.log, "exp": math.exp,
          "min": min, "max": max}
_CONSTS = {"pi": math.pi, "e": math.e}


def evaluate_expression(expression: str) -> float:
    """+ - * / // % ** and parentheses over numbers, the functions in _FUNCS and pi, e; nothing else."""
    if len(expression) > 300:
        raise ToolError("expression longer than 300 characters")

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name) and node.id in _CONSTS:
            return _CONSTS[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(b) > 64:
                raise ToolError("exponent too large (limit 64)")
            try:
                return _OPS[type(node.op)](a, b)
            except ZeroDivisionError:
                raise ToolError("division by zero") from None
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
                and not node.keywords and 1 <= len(node.args) <= 4):
            try:
                return _FUNCS[node.func.id](*[ev(a) for a in node.args])
            except (ValueError, TypeError) as e:
                raise ToolError(f"{node.func.id}: {e}") from None
        raise ToolError(f"unsupported syntax {type(node).__name__}; use numbers, + - * / // % **, "
                        f"parentheses, {', '.join(_FUNCS)}, pi, e")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse expression {expression!r}") from None
    value = ev(tree)
    if not math.isfinite(value):
        raise ToolError("result is not finite")
    return value


def _clean(x: float) -> float | int:
    r = round(x, 10)
    return int(r) if float(r).is_integer() and abs(r) < 1e15 else r


_UNITS = {"m": ("length", 1.0), "km": ("length", 1000.0), "cm": ("length", 0.01), "mm": ("length", 0.001),
          "mi": ("length", 1609.344), "ft": ("length", 0.3048), "in": ("length", 0.0254),
          "kg": ("mass", 1.0), "g": ("mass", 0.001), "lb": ("mass", 0.45359237), "oz": ("mass", 0.028349523125),
          "s": ("time", 1.0), "min": ("time", 60.0), "h": ("time", 3600.0), "day": ("time", 86400.0),
          "l": ("volume", 1.0), "ml": ("volume", 0.001), "gal": ("volume", 3.785411784),
          "C": ("temperature", 1.0), "F": ("temperature", 1.0), "K": ("temperature", 1.0)}


@app.tool(description="Evaluate an arithmetic expression exactly: + - * / // % ** and parentheses, "
                      "sqrt, abs, round, log, exp, min, max, and the constants pi and e.")
def evaluate(expression: Annotated[str, Field(description="the expression, e.g. (3 + 4) * sqrt(2)")]) -> dict:
    return {"expression": expression, "value": _clean(evaluate_expression(expression))}


@app.tool(description="Convert a quantity between units of length (m km cm mm mi ft in), mass (kg g lb oz), "
                      "time (s min h day), volume (l ml gal) or temperature (C F K).")
def convert_units(value: Annotated[float, Field(description="the quantity to convert")],
                  from_unit: Annotated[str, Field(description="unit of value, e.g. km, lb, F")],
                  to_unit: Annotated[str, Field(description="unit wanted, of the same dimension")]) -> dict:
    if from_unit not in _UNITS or to_unit not in _UNITS:
        bad = from_unit if from_unit not in _UNITS else to_unit
        raise ToolError(f"unknown unit {bad!r}; known: {', '.join(_UNITS)}")
    da, db = _UNITS[from_unit][0], _UNITS[to_unit][0]
    if da != db:
        raise ToolError(f"cannot convert {da} ({from_unit}) to {db} ({to_unit})")
    if da == "temperature":
        k = {"C": value + 273.15, "F": (value - 32) * 5 / 9 + 273.15, "K": value}[from_unit]
        out = {"C": k - 273.15, "F": (k - 273.15) * 9 / 5 + 32, "K": k}[to_unit]
    else:
        out = value * _UNITS[from_unit][1] / _UNITS[to_unit][1]
    return {"value": _clean(out), "unit": to_unit}


@app.tool(description="Summary statistics of a list of numbers: count, sum, mean, median, sample standard "
                      "deviation, min and max.")
def statistics(numbers: Annotated[list[float], Field(description="the data, 1 to 10000 numbers")]) -> dict:
    if not numbers:
        raise ToolError("numbers is empty")
    if len(numbers) > 10000:
        raise ToolError("at most 10000 numbers")
    return {"count": len(numbers), "sum": _clean(math.fsum(numbers)), "mean": _clean(st.fmean(numbers)),
            "median": _clean(st.median(numbers)), "stdev": _clean(st.stdev(numbers)) if len(numbers) > 1 else 0,
            "min": _clean(min(numbers)), "max": _clean(max(numbers))}


if __name__ == "__main__":
    app.run("stdio")
