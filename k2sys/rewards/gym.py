"""Verifiable-rewards gym (seed 4.1): one registry from task family to verifier, so the RL
loop scores any batch with ``gym.score_batch(tasks, responses)`` whatever the families."""

from __future__ import annotations

from typing import Callable, Sequence

from k2sys.rewards.code_reward import CodeVerifier
from k2sys.rewards.critic import RubricCritic
from k2sys.rewards.instruction import InstructionVerifier, JudgeFn
from k2sys.rewards.sandbox import SandboxConfig
from k2sys.tasks.base import Task, get_family, list_families

__all__ = ["Verifier", "RewardGym", "default_gym"]

Verifier = Callable[[Task, str], float]


class RewardGym:
    def __init__(self) -> None:
        self._verifiers: dict[str, Verifier] = {}

    def register(self, family: str, verifier: Verifier, *, replace: bool = False) -> None:
        if not callable(verifier):
            raise TypeError(f"verifier for {family!r} must be callable (task, response) -> float")
        if family in self._verifiers and not replace:
            raise ValueError(f"family {family!r} already has a verifier; pass replace=True to swap it")
        self._verifiers[family] = verifier

    def families(self) -> list[str]:
        return sorted(self._verifiers)

    def verifier(self, family: str) -> Verifier:
        if family not in self._verifiers:
            raise KeyError(f"no verifier registered for task family {family!r}; have {self.families()}")
        return self._verifiers[family]

    def score(self, task: Task, response: str) -> float:
        return float(self.verifier(task.family)(task, response))

    def score_batch(self, tasks: Sequence[Task], responses: Sequence[str]) -> list[float]:
        if len(tasks) != len(responses):
            raise ValueError(f"tasks ({len(tasks)}) and responses ({len(responses)}) must pair up")
        return [self.score(t, r) for t, r in zip(tasks, responses)]


def default_gym(sandbox: SandboxConfig | None = None, instruction_judge: JudgeFn | None = None,
                critic: RubricCritic | None = None) -> RewardGym:
    """Every registered task family (math/logic), code through the sandbox, instruction
    following, and, when a critic is given, subjective tasks (family "open_ended")."""
    gym = RewardGym()
    for name in list_families():
        gym.register(name, get_family(name).verify)
    gym.register(CodeVerifier.family, CodeVerifier(sandbox))
    gym.register(InstructionVerifier.family, InstructionVerifier(judge=instruction_judge))
    if critic is not None:
        gym.register("open_ended", critic)
    return gym
