"""Synthesis pipelines that end in chat JSONL for SFT.

    tool-use:    generate_tasks -> run_episode (user agent, policy, tool simulator) -> judge
                 -> keep passing trajectories -> write_chat_jsonl
    task family: k2sys.tasks family.generate -> expert_solution -> family.verify == 1 -> chat rows

Every rejected item is counted by reason in the stats; nothing is dropped without a count.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..jsonl import write_chat_jsonl
from .judge import RubricJudge, Verdict
from .rollout import Policy, ScriptedPolicy, Trajectory, run_episode
from .tasks import Task, generate_tasks

__all__ = ["SynthStats", "synthesize_tool_use", "task_family_rows", "write_synth_sft"]


@dataclass
class SynthStats:
    generated: int = 0
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)   # first failed check kind -> count

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def to_dict(self) -> dict:
        return {"generated": self.generated, "kept": self.kept, "rejected": dict(self.rejected),
                "keep_rate": self.kept / self.generated if self.generated else 0.0}


def synthesize_tool_use(n_tasks: int, seed: int = 0, *,
                        policy_factory: Callable[[Task], Policy] = ScriptedPolicy,
                        judge: Callable[[Trajectory], Verdict] | None = None,
                        failure_rate: float = 0.1, max_turns: int = 12
                        ) -> tuple[list[dict], SynthStats, list[tuple[Trajectory, Verdict]]]:
    """Run `n_tasks` generated tasks and keep the trajectories the judge passes.

    Returns (chat rows of the kept trajectories, stats, every (trajectory, verdict) for audit).
    `policy_factory(task)` gives the task agent: `ScriptedPolicy` by default, or e.g.
    `lambda task: ChatCompletionsPolicy(url, model)` for an engine.
    """
    judge = judge or RubricJudge()
    stats = SynthStats()
    rows: list[dict] = []
    audit: list[tuple[Trajectory, Verdict]] = []
    for task in generate_tasks(n_tasks, seed):
        traj = run_episode(task, policy_factory(task), seed=seed, failure_rate=failure_rate, max_turns=max_turns)
        verdict = judge(traj)
        audit.append((traj, verdict))
        stats.generated += 1
        if verdict.passed:
            stats.kept += 1
            rows.append(traj.to_row(source="synth/tool_use", judge_score=verdict.score))
        else:
            # Bucket by check kind ("goal0:fact:42" -> "fact") so the stats stay readable.
            name = verdict.failed[0]
            stats.reject(name.split(":")[1] if ":" in name else name)
    return rows, stats, audit


def task_family_rows(families: Sequence[str], n_per_family: int, seed: int = 0, split: str = "train",
                     system_prompt: str | None = None) -> tuple[list[dict], SynthStats]:
    """Single-turn SFT rows from k2sys.tasks families: prompt -> expert solution, kept only when the
    family's own verifier gives the expert solution full reward."""
    from k2sys.tasks import get_family

    stats = SynthStats()
    rows: list[dict] = []
    for name in families:
        family = get_family(name)
        for task in family.generate(n_per_family, seed, split):
            stats.generated += 1
            answer = family.expert_solution(task)
            if family.verify(task, answer) < 1.0:
                stats.reject(f"{name}: expert solution fails verify")
                continue
            msgs: list[dict[str, Any]] = [{"role": "system", "content": system_prompt}] if system_prompt else []
            msgs += [{"role": "user", "content": task.prompt}, {"role": "assistant", "content": answer}]
            rows.append({"messages": msgs, "source": f"tasks/{name}", "split": split})
            stats.kept += 1
    return rows, stats


def write_synth_sft(path: str | os.PathLike, *, n_tool_use: int, families: Sequence[str] = (),
                    n_per_family: int = 0, seed: int = 0, failure_rate: float = 0.1,
                    policy_factory: Callable[[Task], Policy] = ScriptedPolicy) -> dict:
    """The built-in SFT mix in one file: judged tool-use trajectories plus task-family rows, shuffled
    with `seed` and written atomically. Returns {"rows", "tool_use": stats, "tasks": stats}."""
    tool_rows, tool_stats, _ = synthesize_tool_use(n_tool_use, seed, policy_factory=policy_factory,
                                                   failure_rate=failure_rate)
    fam_rows, fam_stats = task_family_rows(families, n_per_family, seed) if families else ([], SynthStats())
    rows = tool_rows + fam_rows
    random.Random(f"synth-mix|{seed}").shuffle(rows)
    n = write_chat_jsonl(path, rows)
    return {"rows": n, "tool_use": tool_stats.to_dict(), "tasks": fam_stats.to_dict()}
