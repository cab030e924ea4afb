"""Difficulty filter (seed 4.1): keep prompts of moderate difficulty for the current (SFT)
model, measured by pass@k; prompts that are always or never solved carry little signal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["pass_at_k", "DifficultyFilter", "FilterResult"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)
    (Chen et al. 2021), computed as a running product so large n does not overflow."""
    for name, v in (("n", n), ("c", c), ("k", k)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if n < 1:
        raise ValueError(f"n (samples) must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c (correct) must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}; draw at least k samples per prompt")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


@dataclass
class FilterResult:
    keep: list[int]          # indices of kept prompts
    pass_at_k: list[float]   # per prompt
    too_easy: int
    too_hard: int

    def stats(self) -> dict[str, float]:
        n = len(self.pass_at_k)
        return {"filter/kept": len(self.keep), "filter/total": n, "filter/too_easy": self.too_easy,
                "filter/too_hard": self.too_hard,
                "filter/kept_fraction": len(self.keep) / n if n else 0.0}


@dataclass(kw_only=True)
class DifficultyFilter:
    k: int = 1
    low: float = 0.05
    """Keep prompts with pass@k >= low (drop the never-solved)."""
    high: float = 0.95
    """Keep prompts with pass@k <= high (drop the always-solved)."""

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"DifficultyFilter.k must be an int >= 1, got {self.k!r}")
        if not (0.0 <= self.low <= self.high <= 1.0):
            raise ValueError(f"DifficultyFilter needs 0 <= low <= high <= 1, got low={self.low}, high={self.high}")

    def __call__(self, n_samples: Sequence[int], n_correct: Sequence[int]) -> FilterResult:
        if len(n_samples) != len(n_correct):
            raise ValueError(f"n_samples ({len(n_samples)}) and n_correct ({len(n_correct)}) "
                             f"must have one entry per prompt")
        keep, scores, easy, hard = [], [], 0, 0
        for i, (n, c) in enumerate(zip(n_samples, n_correct)):
            p = pass_at_k(int(n), int(c), self.k)
            scores.append(p)
            if p < self.low:
                hard += 1
            elif p > self.high:
                easy += 1
            else:
                keep.append(i)
        return FilterResult(keep=keep, pass_at_k=scores, too_easy=easy, too_hard=hard)
