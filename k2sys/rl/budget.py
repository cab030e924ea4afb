"""Budget control (seed 4.3): a max-token budget per task type; responses over budget are
truncated and their reward reduced by a penalty, so RL does not learn to ramble.

Flow in an iteration: ``max_new_tokens(type)`` is what the engine is asked for ->
``truncate(...)`` marks responses that hit the budget without finishing -> the verifier scores
the (truncated) text -> ``penalize(...)`` subtracts the penalty from those rewards.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = ["BudgetConfig", "BudgetController", "TruncationResult"]


@dataclass(kw_only=True)
class BudgetConfig:
    budgets: dict[str, int] = field(default_factory=dict)
    """Max response tokens per task type (family name), e.g. {"arithmetic": 8, "countdown": 16}."""
    default_budget: int | None = None
    """Budget for task types not in ``budgets``; None makes an unknown type an error."""
    penalty: float = 0.5
    """Subtracted from the reward of a truncated response (reward = reward - penalty)."""

    def __post_init__(self) -> None:
        for name, b in self.budgets.items():
            if not isinstance(b, int) or b < 1:
                raise ValueError(f"BudgetConfig.budgets[{name!r}] must be an int >= 1, got {b!r}")
        if self.default_budget is not None and (not isinstance(self.default_budget, int)
                                                or self.default_budget < 1):
            raise ValueError(f"BudgetConfig.default_budget must be an int >= 1 or None, got {self.default_budget!r}")
        if not self.penalty >= 0:
            raise ValueError(f"BudgetConfig.penalty must be >= 0, got {self.penalty!r}")


@dataclass
class TruncationResult:
    tokens: list[list[int]]            # responses cut to their budget
    truncated: list[bool]              # True where the response hit the budget unfinished
    fraction_truncated: float          # over the whole batch (logged every iteration)
    fraction_by_type: dict[str, float]

    def stats(self) -> dict[str, float]:
        out = {"budget/fraction_truncated": self.fraction_truncated}
        out.update({f"budget/fraction_truncated/{k}": v for k, v in self.fraction_by_type.items()})
        return out


class BudgetController:
    def __init__(self, config: BudgetConfig):
        self.config = config

    def max_new_tokens(self, task_type: str) -> int:
        b = self.config.budgets.get(task_type, self.config.default_budget)
        if b is None:
            raise KeyError(f"no token budget for task type {task_type!r}; add it to "
                           f"BudgetConfig.budgets or set default_budget")
        return b

    def truncate(self, task_types: Sequence[str], responses: Sequence[Sequence[int]],
                 finished: Sequence[bool]) -> TruncationResult:
        """A response is over budget when it is longer than the budget, or exactly at the
        budget without having emitted end-of-turn (the engine stopped it)."""
        if not (len(task_types) == len(responses) == len(finished)):
            raise ValueError(f"task_types ({len(task_types)}), responses ({len(responses)}) and "
                             f"finished ({len(finished)}) must have the same length")
        out_tokens, flags = [], []
        per_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for ttype, toks, done in zip(task_types, responses, finished):
            budget = self.max_new_tokens(ttype)
            over = len(toks) > budget or (len(toks) == budget and not done)
            out_tokens.append(list(toks[:budget]))
            flags.append(over)
            per_type[ttype][0] += int(over)
            per_type[ttype][1] += 1
        n = len(flags)
        return TruncationResult(
            tokens=out_tokens, truncated=flags,
            fraction_truncated=(sum(flags) / n) if n else 0.0,
            fraction_by_type={k: c / t for k, (c, t) in sorted(per_type.items())},
        )

    def penalize(self, rewards: torch.Tensor | Sequence[float],
                 truncated: Sequence[bool]) -> torch.Tensor:
        r = torch.as_tensor(rewards, dtype=torch.float32) if not isinstance(rewards, torch.Tensor) else rewards
        if r.dim() != 1 or r.shape[0] != len(truncated):
            raise ValueError(f"rewards must be [N] with N = len(truncated) = {len(truncated)}, "
                             f"got shape {tuple(r.shape)}")
        flags = torch.as_tensor(list(truncated), dtype=torch.bool, device=r.device)
        return r - self.config.penalty * flags.to(r.dtype)
