"""Sampling-temperature decay (seed 4.3): explore with a high temperature early, converge
with a lower one later. t(step) goes from t_start at step 0 to t_end at total_steps and
stays at t_end afterwards."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["TemperatureSchedule"]


@dataclass(kw_only=True)
class TemperatureSchedule:
    t_start: float = 1.0
    t_end: float = 0.7
    total_steps: int = 100
    kind: Literal["linear", "exponential", "cosine"] = "linear"
    """linear: straight line; exponential: geometric t_start*(t_end/t_start)^(s/S);
    cosine: half-cosine, flat near both ends."""

    def __post_init__(self) -> None:
        for name in ("t_start", "t_end"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0 or math.isinf(v):
                raise ValueError(f"TemperatureSchedule.{name} must be a finite number > 0, got {v!r}")
        if not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ValueError(f"TemperatureSchedule.total_steps must be an int >= 1, got {self.total_steps!r}")
        if self.kind not in ("linear", "exponential", "cosine"):
            raise ValueError(f"TemperatureSchedule.kind must be linear, exponential or cosine, got {self.kind!r}")

    def __call__(self, step: int) -> float:
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        p = min(step, self.total_steps) / self.total_steps
        a, b = float(self.t_start), float(self.t_end)
        if self.kind == "linear":
            return a + (b - a) * p
        if self.kind == "exponential":
            return a * (b / a) ** p
        return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * p))
