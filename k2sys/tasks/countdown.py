"""Countdown / 24-style puzzles: prompt ``"3 5 7->26="`` asks for an expression over the
given numbers that equals the target, e.g. ``"3*7+5"``. Every valid expression is accepted.

The verifier never calls ``eval``: it parses with ``ast`` and walks a whitelist (binary
+ - * / over non-negative integer literals, parentheses), in exact rational arithmetic.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from fractions import Fraction
from typing import Any

from k2sys.tasks.base import Task, TaskFamily, register_family

__all__ = ["Countdown", "evaluate_expression"]

_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_ALLOWED_CHARS = re.compile(r"[0-9+\-*/() ]+")
_MAX_LEN = 200


def evaluate_expression(text: str, ops: str = "+-*/") -> tuple[Fraction, list[int]]:
    """Exact value and the integer literals (in order) of an arithmetic expression.
    Raises ValueError for anything outside the whitelist or a division by zero."""
    if len(text) > _MAX_LEN or not _ALLOWED_CHARS.fullmatch(text):
        raise ValueError("expression has characters outside digits, + - * / ( ) and spaces")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an expression: {e.msg}") from None
    numbers: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            sym = _AST_OPS[type(node.op)]
            if sym not in ops:
                raise ValueError(f"operator {sym!r} is not allowed here")
            left, right = walk(node.left), walk(node.right)
            if sym == "+":
                return left + right
            if sym == "-":
                return left - right
            if sym == "*":
                return left * right
            if right == 0:
                raise ValueError("division by zero")
            return left / right
        if isinstance(node, ast.Constant) and type(node.value) is int:
            numbers.append(node.value)
            return Fraction(node.value)
        raise ValueError(f"{type(node).__name__} is not allowed in an answer expression")

    value = walk(tree.body)
    return value, numbers


def _render(node: Any, parent: str | None = None, right: bool = False) -> str:
    """Shortest text of an expression tree: parentheses only where precedence needs them."""
    if isinstance(node, int):
        return str(node)
    op, a, b = node
    s = f"{_render(a, op, False)}{op}{_render(b, op, True)}"
    if parent is not None and (_PREC[op] < _PREC[parent] or (right and _PREC[op] == _PREC[parent]
                                                                and parent in "-/")):
        s = f"({s})"
    return s


def _value(node: Any) -> Fraction:
    if isinstance(node, int):
        return Fraction(node)
    op, a, b = node
    x, y = _value(a), _value(b)
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    return x / y


@register_family
class Countdown(TaskFamily):
    name = "countdown"

    def __init__(self, num_count: int = 3, max_number: int = 9, ops: str = "+-*", use_all: bool = True):
        if not isinstance(num_count, int) or not 2 <= num_count <= 6:
            raise ValueError(f"countdown num_count must be an int in [2, 6], got {num_count!r}")
        if not isinstance(max_number, int) or max_number < 2:
            raise ValueError(f"countdown max_number must be an int >= 2, got {max_number!r}")
        if not ops or any(o not in _PREC for o in ops):
            raise ValueError(f"countdown ops must be characters from '+-*/', got {ops!r}")
        self.num_count, self.max_number, self.ops, self.use_all = num_count, max_number, ops, use_all

    def params(self) -> dict[str, Any]:
        return {"num_count": self.num_count, "max_number": self.max_number, "ops": self.ops,
                "use_all": self.use_all}

    def sample(self, rng: random.Random) -> Task:
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(self.num_count)]
            nodes: list[Any] = list(numbers)
            rng.shuffle(nodes)
            ok = True
            while len(nodes) > 1:  # combine two random sub-expressions until one is left
                i, j = rng.sample(range(len(nodes)), 2)
                op = rng.choice(self.ops)
                if op == "/" and (_value(nodes[j]) == 0 or (_value(nodes[i]) / _value(nodes[j])).denominator != 1):
                    ok = False
                    break
                new = (op, nodes[i], nodes[j])
                nodes = [n for k, n in enumerate(nodes) if k not in (i, j)] + [new]
            if not ok:
                continue
            target = _value(nodes[0])
            if target.denominator == 1 and target >= 1:
                break
        solution = _render(nodes[0])
        shown = sorted(numbers)
        return Task(prompt=f"{' '.join(map(str, shown))}->{int(target)}=", answer=solution,
                    family=self.name, meta={"numbers": shown, "target": int(target), "ops": self.ops,
                                          "use_all": self.use_all})

    def verify(self, task: Task, response: str) -> float:
        self._check_task(task)
        # The task carries its own rules, so any Countdown instance (e.g. the reward gym's)
        # scores it the way its generator meant.
        ops, use_all = task.meta.get("ops", self.ops), task.meta.get("use_all", self.use_all)
        try:
            value, used = evaluate_expression(response.strip(), ops)
        except ValueError:
            return 0.0
        given, have = Counter(task.meta["numbers"]), Counter(used)
        if use_all and have != given:
            return 0.0
        if not use_all and any(have[k] > given[k] for k in have):
            return 0.0
        return 1.0 if value == task.meta["target"] else 0.0
