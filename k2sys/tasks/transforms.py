"""List transforms: prompt ``"sort 3 1 2="``, answer ``"1 2 3"``; ops rev, sort, dedup
(dedup keeps the first occurrence of each value, in order)."""

from __future__ import annotations

import random
from typing import Any

from k2sys.tasks.base import Task, TaskFamily, register_family


def _apply(op: str, items: list[int]) -> list[int]:
    if op == "rev":
        return items[::-1]
    if op == "sort":
        return sorted(items)
    if op == "dedup":
        return list(dict.fromkeys(items))
    raise ValueError(f"unknown list op {op!r}")


@register_family
class ListOps(TaskFamily):
    name = "list_ops"
    OPS = ("rev", "sort", "dedup")

    def __init__(self, length: int = 4, max_value: int = 9, ops: tuple[str, ...] | list[str] = OPS):
        if not isinstance(length, int) or not 1 <= length <= 64:
            raise ValueError(f"list_ops length must be an int in [1, 64], got {length!r}")
        if not isinstance(max_value, int) or max_value < 1:
            raise ValueError(f"list_ops max_value must be an int >= 1, got {max_value!r}")
        ops = tuple(ops)
        if not ops or any(o not in self.OPS for o in ops):
            raise ValueError(f"list_ops ops must be a non-empty subset of {self.OPS}, got {ops!r}")
        self.length, self.max_value, self.ops = length, max_value, ops

    def params(self) -> dict[str, Any]:
        return {"length": self.length, "max_value": self.max_value, "ops": list(self.ops)}

    def sample(self, rng: random.Random) -> Task:
        op = rng.choice(self.ops)
        # dedup draws from a smaller pool so duplicates actually occur.
        hi = max(1, self.length // 2) if op == "dedup" else self.max_value
        items = [rng.randint(0, min(hi, self.max_value)) for _ in range(self.length)]
        out = _apply(op, items)
        return Task(prompt=f"{op} {' '.join(map(str, items))}=", answer=" ".join(map(str, out)),
                    family=self.name, meta={"op": op, "items": items})

    def verify(self, task: Task, response: str) -> float:
        self._check_task(task)
        # Single spaces between values, nothing else: "1,2,3" or "1  2 3" are wrong.
        return 1.0 if response.strip() == task.answer else 0.0
