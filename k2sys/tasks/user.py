"""A user's own RL prompts and reward as a task family (`k2sys run custom`).

Prompts come from the user's data file (k2sys.data.sources.load_prompts: JSONL, Parquet or a
`datasets` directory, with key mapping); the reward is any spec k2sys.rewards.registry.make_reward
takes (a built-in, a Python `module:function`, an HTTP reward service). The family plugs into the
same rollout, filter and eval code as the built-in families; rewards are computed one batch per
call (`verify_batch`), failures score 0 and are counted in `reward.stats()`.
"""

from __future__ import annotations

import json
import random
from typing import Any

from k2sys.tasks.base import Task, TaskFamily


class UserPrompts(TaskFamily):
    name = "user"

    def __init__(self, reward: Any, reward_spec: str = ""):
        self.reward = reward
        self.reward_spec = reward_spec

    def params(self) -> dict[str, Any]:
        return {"reward": self.reward_spec}

    def sample(self, rng: random.Random) -> Task:
        raise NotImplementedError("user prompts come from the data file (tasks_from_records), not a generator")

    @staticmethod
    def tasks_from_records(records: list) -> list[Task]:
        """Tasks of PromptRecords; a message-list prompt is kept whole in meta['messages']."""
        out = []
        for r in records:
            meta = {"label": r.label, "metadata": r.metadata, "id": r.id}
            if isinstance(r.prompt, list):
                meta["messages"] = r.prompt
                text = "\n".join(str(m.get("content") or "") for m in r.prompt)
            else:
                text = r.prompt
            answer = r.label if isinstance(r.label, str) else json.dumps(r.label)
            out.append(Task(prompt=text, answer=answer, family=UserPrompts.name, meta=meta))
        return out

    def _items(self, tasks: list[Task], responses: list[str]) -> list:
        from k2sys.rewards.registry import RewardItem

        return [RewardItem(prompt=t.meta.get("messages", t.prompt), response=r, label=t.meta.get("label"),
                           metadata=t.meta.get("metadata", {})) for t, r in zip(tasks, responses)]

    def verify_batch(self, tasks: list[Task], responses: list[str]) -> list[float]:
        return list(self.reward(self._items(tasks, responses)).rewards)

    def verify(self, task: Task, response: str) -> float:
        return self.verify_batch([task], [response])[0]

    def expert_solution(self, task: Task) -> str:
        raise ValueError("user prompts have no expert solution; give SFT data with data.sft=FILE")
