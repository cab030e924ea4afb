"""Environments over the built-in tasks: multi-turn tool use, and single-turn task families.

ToolUseEnv (kind "tool_use"): a synthesized tool-use task (k2sys.data.synth) played by the policy.
    reset  -> [system prompt, the user's first goal]; info["tools"] = the agent's tools
    step   -> the policy's tool calls run in the tool simulator (results as tool messages); an
              answer without calls closes the goal and the user agent states the next one; after
              the last goal (or a malformed turn) the episode ends and the rubric judge scores the
              whole conversation: reward = the share of rubric checks passed ("score") or 1/0
              ("pass"). Running out of turns truncates with the same judged reward.
    spec   {"kind": "tool_use", "seed": S, "index": K, "failure_rate": 0.1, "max_turns": 12,
            "reward": "score" | "pass"}: task K of generate_tasks(seed=S).
    With a "library" key the task and its tools come from a `k2sys synth` library instead (real MCP
    tools, simulated synthetic tools, rubric judge): see k2sys.envs.tool_library.

TaskEnv (kind "task"): one k2sys.tasks family task as a one-turn episode, reward = the verifier
    on the answer (the same prompt tokens as k2sys.tasks.format.prompt_ids).
    spec   {"kind": "task", "task": Task.to_dict(), "params": {family difficulty parameters}}
"""

from __future__ import annotations

import functools
import random
from typing import Any

from k2sys.data.synth.judge import RubricJudge
from k2sys.data.synth.rollout import Trajectory, UserAgent
from k2sys.data.synth.tasks import Task as SynthTask
from k2sys.data.synth.tasks import generate_tasks
from k2sys.data.synth.tools import TOOL_LIBRARY, ToolSimulator
from k2sys.envs.base import Env, EnvError, StepResult, ToolTurnEnv, register_env

__all__ = ["ToolUseEnv", "TaskEnv", "tool_use_specs", "synth_task"]

_REWARDS = ("score", "pass")


@functools.lru_cache(maxsize=64)
def _tasks(seed: int, n: int) -> tuple[SynthTask, ...]:
    return tuple(generate_tasks(n, seed))


def synth_task(seed: int, index: int) -> SynthTask:
    """Task `index` of generate_tasks(seed=seed) (a prefix of the same deterministic stream)."""
    n = 1 << max(6, index.bit_length())  # cache by power-of-two prefix lengths
    return _tasks(seed, max(n, index + 1))[index]


def tool_use_specs(n: int, seed: int, *, library: str | None = None, split: str = "train", **options: Any) -> list[dict]:
    """Specs of the first `n` tool-use tasks of `seed` (options: failure_rate, max_turns, reward).

    With `library` (a `k2sys synth` directory): `n` tasks of its `split` ("train" or "heldout", a
    stable ~10% of task ids) in an order seeded by `seed`; options may add endpoint, model, judge,
    threshold (k2sys.envs.tool_library)."""
    if library:
        from k2sys.envs.tool_library import library_specs

        return library_specs(n, seed, library, split=split, **options)
    return [{"kind": "tool_use", "seed": seed, "index": k, **options} for k in range(n)]


class ToolUseEnv(ToolTurnEnv):
    def __init__(self, task: SynthTask, *, failure_rate: float = 0.1, max_turns: int = 12, reward: str = "score"):
        if reward not in _REWARDS:
            raise EnvError(f"tool_use spec: reward must be one of {_REWARDS}, got {reward!r}")
        if max_turns < 1:
            raise EnvError(f"tool_use spec: max_turns must be >= 1, got {max_turns}")
        if not 0.0 <= failure_rate < 1.0:
            raise EnvError(f"tool_use spec: failure_rate must be in [0, 1), got {failure_rate}")
        self.task, self.failure_rate, self.max_turns, self.reward_kind = task, failure_rate, max_turns, reward
        self.judge = RubricJudge()
        self._tools = task.agent.openai_tools()
        self._messages: list[dict] | None = None

    @property
    def tools(self) -> list[dict]:
        return self._tools

    def reset(self, *, seed: int | None = None) -> tuple[list[dict], dict]:
        seed = 0 if seed is None else int(seed)
        self.sim = ToolSimulator({t: TOOL_LIBRARY[t] for t in self.task.agent.tools},
                                 random.Random(f"{self.task.id}|{seed}"), self.failure_rate)
        self.user = UserAgent(self.task)
        self.goal, self.turns, self.n_calls, self.done = 0, 0, 0, False
        self.malformed: list[str] = []
        opening = [{"role": "system", "content": self.task.agent.system_prompt},
                   {"role": "user", "content": self.user.message(0)}]
        self._messages = [dict(m) for m in opening]
        return opening, {"tools": self._tools, "task_id": self.task.id}

    def _end(self, truncated: bool) -> StepResult:
        self.done = True
        traj = Trajectory(self.task, self._messages, self._tools, finished=not truncated and not self.malformed,
                          state=self.sim.state, tool_log=self.sim.log, malformed=self.malformed)
        verdict = self.judge(traj)
        reward = float(verdict.passed) if self.reward_kind == "pass" else verdict.score
        info = {"passed": verdict.passed, "score": verdict.score, "failed": verdict.failed[:8],
                "goals_done": self.goal, "tool_calls": self.n_calls}
        return [], reward, not truncated, truncated, info

    def _execute(self, name: str, arguments: Any) -> str:
        return self.sim.call(name, arguments)

    def _next_user(self, goal: int) -> str | None:
        return self.user.message(goal)


@register_env("tool_use")
def _make_tool_use(spec: dict) -> Env:
    if "library" in spec:
        from k2sys.envs.tool_library import make_library_env

        return make_library_env(spec)
    for key in ("seed", "index"):
        if not isinstance(spec.get(key), int) or spec[key] < 0:
            raise EnvError(f"tool_use spec: {key!r} must be an int >= 0, got {spec.get(key)!r}")
    unknown = set(spec) - {"kind", "seed", "index", "failure_rate", "max_turns", "reward"}
    if unknown:
        raise EnvError(f"tool_use spec: unknown keys {sorted(unknown)}")
    return ToolUseEnv(synth_task(spec["seed"], spec["index"]), failure_rate=float(spec.get("failure_rate", 0.1)),
                      max_turns=int(spec.get("max_turns", 12)), reward=spec.get("reward", "score"))


class TaskEnv(Env):
    """A k2sys.tasks family task as a one-turn episode (the single-turn RL tasks through the same loop)."""

    def __init__(self, task_dict: dict, params: dict | None = None):
        from k2sys.tasks import get_family
        from k2sys.tasks.base import Task

        self.task = Task.from_dict(task_dict)
        self.family = get_family(self.task.family, **(params or {}))
        self.done = True

    def reset(self, *, seed: int | None = None) -> tuple[list[dict], dict]:
        from k2sys.tasks.format import task_messages

        self.done = False
        return task_messages(self.task), {"tools": None, "task_id": f"{self.task.family}:{self.task.prompt}"}

    def step(self, action: dict) -> StepResult:
        if self.done:
            raise EnvError("TaskEnv.step: call reset() first (one turn per episode)")
        self.done = True
        if action.get("malformed") or action.get("tool_calls"):
            return [], 0.0, True, False, {"malformed": action.get("malformed") or "tool call in a no-tool task"}
        return [], float(self.family.verify(self.task, action.get("content") or "")), True, False, {}


@register_env("task")
def _make_task(spec: dict) -> TaskEnv:
    if not isinstance(spec.get("task"), dict):
        raise EnvError("task spec: 'task' must be a Task.to_dict() dict")
    if not isinstance(spec.get("params", {}), dict):
        raise EnvError("task spec: 'params' must be the family's difficulty parameters (a dict)")
    return TaskEnv(spec["task"], spec.get("params"))
