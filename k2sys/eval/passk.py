"""avg@k and the unbiased pass@k estimator over an outcome table (task -> rewards of its n samples).

    rewards per task (n samples at a temperature) -> per task: mean reward, c = samples counted correct
    -> family: avg@n = mean over tasks of the per-task mean reward
               pass@k = mean over tasks of 1 - C(n-c, k) / C(n, k)   (Chen et al. 2021, for every k <= n)
    -> overall: micro (tasks of all families pooled) and macro (mean of the family figures)

Greedy decoding is the special case n = 1, temperature 0: avg@1 is the mean reward and pass@1 the share
of tasks solved. pass@k with k < n uses all n samples (lower variance than drawing exactly k); with
k = n it equals "any of the n samples is correct". A sample is correct when its reward reaches
`threshold` (1.0: partial credit does not count as solved).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from k2sys.rl.filters import pass_at_k

__all__ = ["pass_at_k", "avg_at_k", "count_correct", "family_metrics", "overall_metrics", "per_task_values"]


def count_correct(rewards: Sequence[float], threshold: float = 1.0) -> int:
    return sum(1 for r in rewards if r >= threshold)


def avg_at_k(table: Mapping[str, Sequence[float]]) -> float:
    """Mean over tasks of each task's mean reward (tasks weigh the same whatever their sample count)."""
    if not table:
        raise ValueError("avg_at_k: the outcome table is empty (no tasks were scored)")
    for tid, rs in table.items():
        if not rs:
            raise ValueError(f"avg_at_k: task {tid!r} has no samples")
    return math.fsum(math.fsum(rs) / len(rs) for rs in table.values()) / len(table)


def per_task_values(table: Mapping[str, Sequence[float]], metric: str, threshold: float = 1.0) -> dict[str, float]:
    """Each task's share of a family metric ("avg" or "pass@K"): the family figure is their mean."""
    if metric == "avg" or metric.startswith("avg@"):
        return {t: math.fsum(rs) / len(rs) for t, rs in table.items()}
    if metric.startswith("pass@"):
        k = int(metric[5:])
        return {t: pass_at_k(len(rs), count_correct(rs, threshold), k) for t, rs in table.items()}
    raise ValueError(f"metric {metric!r}: expected 'avg', 'avg@N' or 'pass@K'")


def family_metrics(table: Mapping[str, Sequence[float]], ks: Sequence[int], threshold: float = 1.0) -> dict[str, float]:
    """{"avg@n": ..., "pass@k": ... for each k in ks that every task's sample count allows}.

    n is the smallest per-task sample count (tasks normally all have the same n); a k above it is
    refused, since pass@k needs at least k samples of every task."""
    if not table:
        raise ValueError("family_metrics: the outcome table is empty (no tasks were scored)")
    n = min(len(rs) for rs in table.values())
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise ValueError(f"pass@k: k={bad} not in [1, n={n}]; sample at least max(k) per task (--n)")
    out = {f"avg@{n}": avg_at_k(table)}
    for k in sorted(set(ks)):
        out[f"pass@{k}"] = math.fsum(per_task_values(table, f"pass@{k}", threshold).values()) / len(table)
    return out


def overall_metrics(families: Mapping[str, Mapping[str, Sequence[float]]], ks: Sequence[int],
                    threshold: float = 1.0) -> dict[str, dict[str, float]]:
    """Micro: every task of every family pooled. Macro: the unweighted mean of the family figures, over
    the metrics every family has (a family with fewer samples has no avg@n of the others' n)."""
    pooled = {f"{fam}/{t}": rs for fam, table in families.items() for t, rs in table.items()}
    if not pooled:
        raise ValueError("overall_metrics: no family has scored tasks")
    micro = family_metrics(pooled, ks, threshold)
    per_family = [family_metrics(t, ks, threshold) for t in families.values() if t]
    shared = set.intersection(*(set(m) for m in per_family))
    macro = {m: math.fsum(f[m] for f in per_family) / len(per_family) for m in sorted(shared)}
    return {"micro": micro, "macro": macro}
