"""Harness adapters of the recipe's held-out items (k2sys.eval.harness.evaluate_heldout): generated task
families scored by their own verifiers, and environment episodes (tool_use, code).

    Task   -> EvalItem(id = hash of family + prompt, messages = the task's chat turn, reference = the Task)
           -> Score(the family's reward of the raw response; family figures from score_details, if any)
    spec   -> EvalItem(id = position + hash of the spec, reference = the spec) -> played as an episode (env reward)
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import ClassVar

from k2sys.eval.adapters import Adapter, EvalItem, Score
from k2sys.tasks.base import Task, TaskFamily

__all__ = ["TaskFamilyAdapter", "EnvAdapter"]


def _task_id(family: str, prompt: str) -> str:
    # prompts are distinct within a family and fixed by the run's seed: a stable id across evaluations
    return hashlib.sha256(f"{family}\x00{prompt}".encode()).hexdigest()[:16]


class TaskFamilyAdapter(Adapter):
    """A generated task family's held-out tasks as harness items, scored by the family's verifier exactly as
    RL scores a rollout (raw decoded text; cut responses 0). A family with `score_details(tasks, responses)
    -> [(reward, extras)]` adds its own per-sample figures, averaged over all samples (a cut one counts 0)."""

    name = "task_family"
    cut_scores_zero: ClassVar[bool] = True

    def __init__(self, family: TaskFamily):
        self.family = family

    def items(self, tasks: list[Task]) -> list[EvalItem]:
        from k2sys.tasks.format import task_messages

        return [EvalItem(id=_task_id(self.family.name, t.prompt), messages=task_messages(t), reference=t)
                for t in tasks]

    def item(self, where: str, rec: dict, index: int) -> EvalItem:
        t = Task.from_dict(rec)
        return self.items([t])[0]

    def score_many(self, items: list[EvalItem], texts: list[str]) -> list[Score]:
        # one verify call per sample round: families that compare the responses of one prompt with each
        # other (open_ended) must see each evaluation sample alone, against the reference
        rounds: dict[int, list[int]] = {}
        seen: Counter = Counter()
        for i, it in enumerate(items):
            rounds.setdefault(seen[it.id], []).append(i)
            seen[it.id] += 1
        out: list[Score] = [Score(0.0)] * len(items)
        details = getattr(self.family, "score_details", None)
        for idx in rounds.values():
            tasks, resp = [items[i].reference for i in idx], [texts[i] for i in idx]
            if details is not None:
                for i, (r, extras) in zip(idx, details(tasks, resp)):
                    out[i] = Score(float(r), extras=dict(extras))
            else:
                for i, r in zip(idx, self.family.verify_batch(tasks, resp)):
                    out[i] = Score(float(r))
        return out

    def info(self) -> dict:
        return {"family": self.family.name, "params": self.family.params()}


class EnvAdapter(Adapter):
    """Held-out env specs of one environment kind (tool_use, code) as episodic harness items."""

    name = "env"
    episodic = True

    def __init__(self, kind: str):
        self.kind = kind

    def items(self, specs: list[dict]) -> list[EvalItem]:
        # position + content: distinct even if two specs coincide, stable across evaluations of one run
        digest = [hashlib.sha256(json.dumps(s, sort_keys=True, default=str).encode()).hexdigest() for s in specs]
        return [EvalItem(id=f"{i}-{d[:12]}", messages=[], reference=s) for i, (s, d) in enumerate(zip(specs, digest))]

    def item(self, where: str, rec: dict, index: int) -> EvalItem:
        return self.items([rec])[0]

    def spec(self, item: EvalItem) -> dict:
        return item.reference

    def info(self) -> dict:
        return {"kind": self.kind}
