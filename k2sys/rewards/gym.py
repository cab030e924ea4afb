"""Verifiable-rewards gym (seed 4.1): one registry from task family to verifier, so the RL
loop scores any batch with ``gym.score_batch(tasks, responses)`` whatever the families.

It also holds the RL-side protocol of reward families that keep state across iterations or need the
policy (the coordinator calls these, k2sys.coordinator.driver; a family implements any subset):

    family.bind_run(state_dir, committed_iter)   at RL start / resume: load state as of the last commit
    family.iteration_tasks(it, rng) -> [Task]    extra prompts this iteration (safety: evolved attacks)
    family.after_rollout(it, records, ctx) -> {} after the rollout, before the train step: may replace
                                                 record.reward (the policy critic), add training rows
                                                 to ctx.train_rows (critic refresh), grow state
    family.reward_stats() -> {}                  cumulative counters (reward_failures/<name>, ...)

Records pair every single-turn sample of the iteration with its task and decoded response
(``rollout_records``); ``run_rollout_hooks`` calls every family's hook on all records (a critic learns
from other families' verifiable rewards) and writes replaced rewards back into the samples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from k2sys.rewards.code_reward import CodeVerifier
from k2sys.rewards.critic import RubricCritic
from k2sys.rewards.instruction import InstructionVerifier, JudgeFn
from k2sys.rewards.sandbox import SandboxConfig
from k2sys.tasks.base import Task, get_family, list_families

__all__ = ["Verifier", "RewardGym", "default_gym", "RolloutRecord", "HookContext", "bind_reward_state",
           "iteration_tasks", "rollout_records", "run_rollout_hooks", "reward_stats", "sequence_logprobs",
           "rows_batch"]

Verifier = Callable[[Task, str], float]
Rows = list[tuple[list[int], list[int]]]


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
    """Every registered verifiable task family (math/logic, instruction following, faithfulness,
    safety), code through the sandbox, and, when a critic is given, subjective tasks (family
    "open_ended"; families judged by a critic are verifiable=False and not registered without one).
    instruction_judge: a judge for soft constraints; instruction tasks then go to a verifier with it."""
    gym = RewardGym()
    for name in list_families():
        fam = get_family(name)
        if getattr(fam, "verifiable", True):
            gym.register(name, fam.verify)
    gym.register(CodeVerifier.family, CodeVerifier(sandbox), replace=True)
    if instruction_judge is not None or InstructionVerifier.family not in gym.families():
        gym.register(InstructionVerifier.family, InstructionVerifier(judge=instruction_judge, sandbox=sandbox),
                     replace=True)
    if critic is not None:
        gym.register("open_ended", critic, replace=True)
    return gym


# ---- RL hooks ------------------------------------------------------------------------------------
@dataclass
class RolloutRecord:
    task: Task
    response: str
    reward: float
    """The sample's reward (after the budget penalty); a hook may replace it."""
    truncated: bool = False
    index: int = -1
    """Position of the sample in the rollout's sample list."""


@dataclass
class HookContext:
    logprobs: Callable[[Rows], list[float]] | None = None
    """Summed log-prob of each (ids, mask) row's masked tokens under the current policy (the trainer's
    weights, the same the engine sampled with); None where no trainer is at hand."""
    tokenize: Callable[[list[dict]], tuple[list[int], list[int]]] | None = None
    """Chat messages -> (ids, mask on assistant tokens) in the policy's chat format."""
    train_rows: Rows = field(default_factory=list)
    """Extra (ids, mask) rows hooks want in this iteration's train step (the PTX path)."""


def _hooks(families: Mapping[str, Any], name: str) -> list[Any]:
    return [fam for fam in families.values() if callable(getattr(fam, name, None))]


def has_hooks(families: Mapping[str, Any]) -> bool:
    return bool(_hooks(families, "after_rollout") or _hooks(families, "iteration_tasks"))


def bind_reward_state(families: Mapping[str, Any], state_dir: str | Path, committed_iter: int) -> None:
    for fam in _hooks(families, "bind_run"):
        fam.bind_run(Path(state_dir), committed_iter)


def iteration_tasks(families: Mapping[str, Any], it: int, seed: int) -> list[Task]:
    """Extra tasks of iteration `it` (deterministic in seed and it, so a resumed run draws the same)."""
    out: list[Task] = []
    for fam in _hooks(families, "iteration_tasks"):
        out += fam.iteration_tasks(it, random.Random(f"{seed}|{fam.name}|{it}"))
    return out


def rollout_records(groups: Sequence[Sequence[Any]], samples: Sequence[Any], tokenizer: Any,
                    stop_ids: Sequence[int]) -> list[RolloutRecord]:
    """A record per single-turn sample (episodes carry no Task and are left out)."""
    from k2sys.tasks.format import response_text

    task_of: dict[int, Task] = {}
    for g in groups:
        if g and "task" in g[0].meta:
            task_of[g[0].group_id] = Task.from_dict(g[0].meta["task"])
    out = []
    for i, s in enumerate(samples):
        t = task_of.get(s.group_id)
        if t is not None and t.family == s.family:
            out.append(RolloutRecord(task=t, response=response_text(tokenizer, s.response_tokens, list(stop_ids)),
                                     reward=float(s.reward), truncated=bool(s.truncated), index=i))
    return out


def run_rollout_hooks(families: Mapping[str, Any], it: int, records: list[RolloutRecord], samples: Sequence[Any],
                      ctx: HookContext) -> dict[str, float]:
    """Every family's after_rollout on all records; replaced rewards go back into the samples (not for
    truncated samples: their budget penalty stands)."""
    before = [r.reward for r in records]
    stats: dict[str, float] = {}
    for fam in _hooks(families, "after_rollout"):
        stats.update(fam.after_rollout(it, records, ctx) or {})
    changed = 0
    for r, old in zip(records, before):
        if r.reward != old and not r.truncated and 0 <= r.index < len(samples):
            s = samples[r.index]
            s.meta["verifier_reward"] = old
            s.reward = float(r.reward)
            changed += 1
    if changed:
        stats["hooks/rewards_replaced"] = changed
    if ctx.train_rows:
        stats["hooks/train_rows"] = len(ctx.train_rows)
    return stats


def reward_stats(families: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in _hooks(families, "reward_stats"):
        out.update(fam.reward_stats())
    return out


def rows_batch(rows: Rows, pad_id: int) -> dict[str, torch.Tensor]:
    """(ids, mask) rows -> the trainer's batch (tokens, labels, loss_mask over targets, position_ids)."""
    T = max(len(ids) for ids, _ in rows)
    B = len(rows)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T)
    for i, (ids, m) in enumerate(rows):
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(m) - 1] = torch.tensor(m[1:], dtype=torch.float32)  # target t+1 predicted at t
    labels = torch.full_like(tokens, pad_id)
    labels[:, :-1] = tokens[:, 1:]
    return {"tokens": tokens, "labels": labels, "loss_mask": mask,
            "position_ids": torch.arange(T).expand(B, T).contiguous()}


def sequence_logprobs(token_logprobs: Callable[[dict], torch.Tensor], rows: Rows, pad_id: int,
                      chunk: int = 32) -> list[float]:
    """Summed log-probs of each row's masked tokens, through a trainer's logprobs(batch) -> [B, T]."""
    out: list[float] = []
    for k in range(0, len(rows), chunk):
        b = rows_batch(rows[k:k + chunk], pad_id)
        lp = token_logprobs(b)
        out += (lp * b["loss_mask"]).sum(-1).tolist()
    return out
