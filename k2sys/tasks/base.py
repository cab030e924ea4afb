"""Generated task families with exact verifiers, for SFT data and RL rewards.

A family makes tasks (``generate``), scores a response (``verify`` -> reward in [0, 1]) and
writes the expert answer for SFT (``expert_solution``). Answers are short on purpose: the
tiny recipe model has to learn the format in minutes, so a prompt is ``"12+35="`` and its
answer ``"47"`` followed by the end-of-turn token (added by the chat template, not here).

Verifiers are strict about format: the whole response, less surrounding whitespace, must be
the answer in the family's format; any extra text scores 0.

Splits: which split a prompt belongs to is a pure function of the family and the prompt
text (a hash), so train and held-out never share a prompt, whatever seeds generate them.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["Task", "TaskFamily", "register_family", "get_family", "list_families", "split_of",
           "SPLITS", "HELDOUT_PERCENT"]

SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 20
"""Share of the prompt space reserved for the held-out split."""


@dataclass(kw_only=True)
class Task:
    prompt: str
    answer: str
    """A reference answer (the expert solution); some families accept other answers too."""
    family: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "answer": self.answer, "family": self.family, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Task":
        return cls(prompt=d["prompt"], answer=d["answer"], family=d["family"], meta=dict(d.get("meta", {})))


def split_of(family: str, prompt: str) -> str:
    h = int.from_bytes(hashlib.sha256(f"{family}\x00{prompt}".encode()).digest()[:8], "big")
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


class TaskFamily(ABC):
    name: ClassVar[str]
    verifiable: ClassVar[bool] = True
    """False where the reward is a judgement (a critic's score), not a check that a response passes:
    such a family has no "solved" sample, so the difficulty filter keeps its prompts unfiltered."""

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Difficulty parameters (JSON-serialisable); they also seed generation."""

    @abstractmethod
    def sample(self, rng: random.Random) -> Task:
        """One random task (any split)."""

    @abstractmethod
    def verify(self, task: Task, response: str) -> float:
        """Reward of ``response`` (decoded text without the end-of-turn token) for ``task``."""

    def verify_batch(self, tasks: list[Task], responses: list[str]) -> list[float]:
        """Rewards of many responses at once; families whose verifier is a batched service override it."""
        return [self.verify(t, r) for t, r in zip(tasks, responses)]

    def expert_solution(self, task: Task) -> str:
        self._check_task(task)
        return task.answer

    def generate(self, n: int, seed: int, split: str = "train") -> list[Task]:
        """``n`` distinct tasks of ``split``, deterministic in (params, seed, split)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        rng = random.Random(f"{self.name}|{sorted(self.params().items())}|{seed}|{split}")
        out: list[Task] = []
        seen: set[str] = set()
        budget = 50 * n + 1000
        while len(out) < n and budget > 0:
            budget -= 1
            t = self.sample(rng)
            if t.prompt in seen or split_of(self.name, t.prompt) != split:
                continue
            seen.add(t.prompt)
            out.append(t)
        if len(out) < n:
            raise ValueError(f"{self.name}{self.params()}: found only {len(out)} distinct {split} tasks "
                             f"of {n} requested; ask for fewer or raise the difficulty")
        return out

    def _check_task(self, task: Task) -> None:
        if task.family != self.name:
            raise ValueError(f"task of family {task.family!r} given to family {self.name!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"


_REGISTRY: dict[str, type[TaskFamily]] = {}


def register_family(cls: type[TaskFamily]) -> type[TaskFamily]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"task family {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def get_family(name: str, **params: Any) -> TaskFamily:
    """An instance of the registered family ``name`` with difficulty ``params``."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown task family {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**params)


def list_families() -> list[str]:
    return sorted(_REGISTRY)
