"""Multi-digit arithmetic: prompt ``"12+35="``, answer ``"47"`` (``"-23"`` when negative)."""

from __future__ import annotations

import random
from typing import Any

from k2sys.tasks.base import Task, TaskFamily, register_family

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@register_family
class Arithmetic(TaskFamily):
    name = "arithmetic"

    def __init__(self, digits: int = 2, ops: str = "+-", allow_negative: bool = True):
        if not isinstance(digits, int) or not 1 <= digits <= 18:
            raise ValueError(f"arithmetic digits must be an int in [1, 18], got {digits!r}")
        if not ops or any(o not in _OPS for o in ops) or len(set(ops)) != len(ops):
            raise ValueError(f"arithmetic ops must be distinct characters from '+-*', got {ops!r}")
        self.digits, self.ops, self.allow_negative = digits, ops, allow_negative

    def params(self) -> dict[str, Any]:
        return {"digits": self.digits, "ops": self.ops, "allow_negative": self.allow_negative}

    def sample(self, rng: random.Random) -> Task:
        lo = 0 if self.digits == 1 else 10 ** (self.digits - 1)
        hi = 10 ** self.digits - 1
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        op = rng.choice(self.ops)
        if op == "-" and not self.allow_negative and a < b:
            a, b = b, a
        value = _OPS[op](a, b)
        return Task(prompt=f"{a}{op}{b}=", answer=str(value), family=self.name,
                    meta={"a": a, "b": b, "op": op})

    def verify(self, task: Task, response: str) -> float:
        self._check_task(task)
        # Canonical integer text only: "047", "+47", "47.0", "= 47" are all wrong.
        return 1.0 if response.strip() == task.answer else 0.0
