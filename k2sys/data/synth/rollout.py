"""Multi-agent trajectory generation (seed section 3.3): user agent <-> task agent <-> tool simulator.

    user agent (styled request) -> task agent = policy(messages, tools) -> assistant message
      -> tool calls? simulator executes, results appended -> policy again
      -> final answer? user agent sends the next goal, or the episode ends

The task agent is any `Policy`: a callable (messages, tools) -> assistant message dict in OpenAI
shape. In production it is an inference engine (`ChatCompletionsPolicy` speaks the
OpenAI-compatible route that both our native engine and SGLang serve); `ScriptedPolicy` is a
deterministic agent that follows the task's plan and reads every number from the tool results,
used by tests and by the tiny recipe.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from .tasks import Task, fill_args
from .tools import TOOL_LIBRARY, ToolSimulator

__all__ = ["Policy", "UserAgent", "ScriptedPolicy", "ChatCompletionsPolicy", "Trajectory", "run_episode"]

Policy = Callable[[list[dict], list[dict]], dict]


class UserAgent:
    """Plays the user: states each goal of the task in its communication style, one at a time."""

    _OPEN = {"terse": "{req}", "polite": "Hello! {req} Thank you.", "curious": "{req} How do you get that?"}
    _NEXT = {"terse": "{req}", "polite": "Thanks! One more, please: {req}", "curious": "Interesting. Next: {req}"}

    def __init__(self, task: Task):
        if task.user_style not in self._OPEN:
            raise ValueError(f"task {task.id}: user_style {task.user_style!r} not in {sorted(self._OPEN)}")
        self.task = task

    def message(self, goal_index: int) -> str | None:
        """The user turn that opens goal `goal_index`, or None when all goals are done."""
        if goal_index >= len(self.task.goals):
            return None
        table = self._OPEN if goal_index == 0 else self._NEXT
        return table[self.task.user_style].format(req=self.task.goals[goal_index].request)


class ScriptedPolicy:
    """Deterministic task agent for one task: follows each goal's plan, one tool call per turn.

    Stateless across calls (like a model, it reads the conversation): the current goal is the
    number of user turns so far; the results are the successful tool messages since the last
    user turn; a failed call is retried up to `max_retries` times, then the agent gives up and
    says so (the judge rejects such trajectories).
    """

    def __init__(self, task: Task, max_retries: int = 2):
        self.task, self.max_retries = task, max_retries

    def __call__(self, messages: list[dict], tools: list[dict]) -> dict:
        n_user = sum(m["role"] == "user" for m in messages)
        goal = self.task.goals[n_user - 1]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        results: list[Any] = []
        failures = 0
        last_error = ""
        for m in messages[last_user + 1:]:
            if m["role"] != "tool":
                continue
            out = json.loads(m["content"])
            if isinstance(out, dict) and "error" in out:
                failures, last_error = failures + 1, out["error"]
            else:
                results.append(out)
                failures = 0
        if failures > self.max_retries:
            return {"role": "assistant", "content": f"Sorry, I could not finish this: {last_error}"}
        if len(results) < len(goal.plan):
            step = goal.plan[len(results)]
            args = fill_args(step.args, results)
            return {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": step.tool, "arguments": args}}]}
        return {"role": "assistant", "content": goal.answer_template.format(r=results)}


class ChatCompletionsPolicy:
    """Task agent backed by an OpenAI-compatible `/v1/chat/completions` server (native engine or SGLang)."""

    def __init__(self, base_url: str, model: str, *, temperature: float = 0.7, max_tokens: int = 512,
                 timeout_s: float = 60.0, client: Any = None):
        import httpx
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        self.client = client or httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s)

    def __call__(self, messages: list[dict], tools: list[dict]) -> dict:
        body = {"model": self.model, "messages": messages, "tools": tools,
                "temperature": self.temperature, "max_tokens": self.max_tokens}
        r = self.client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        msg = r.json()["choices"][0]["message"]
        out: dict[str, Any] = {"role": "assistant", "content": msg.get("content") or ""}
        if msg.get("tool_calls"):
            out["tool_calls"] = msg["tool_calls"]
        return out


@dataclass
class Trajectory:
    task: Task
    messages: list[dict]      # system, user, assistant, tool ... in the normalized chat form
    tools: list[dict]
    finished: bool            # every goal got a final answer within the turn budget
    state: dict               # the simulator's final state (e.g. the notebook)
    tool_log: list[dict]
    malformed: list[str] = field(default_factory=list)   # policy outputs that were not valid messages

    def to_row(self, **meta: Any) -> dict:
        return {"messages": self.messages, "tools": self.tools, "task_id": self.task.id, **meta}


def _parse_calls(raw: Any, first_index: int) -> tuple[list[dict], str]:
    """Normalize a policy's tool calls to K2 ids and dict arguments; return (calls, problem or "")."""
    calls = []
    for j, tc in enumerate(raw or []):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            return [], f"tool call {j} has no function name"
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                return [], f"tool call {j} ({fn['name']}) arguments are not JSON: {e.msg}"
        if not isinstance(args, dict):
            return [], f"tool call {j} ({fn['name']}) arguments are not a JSON object"
        calls.append({"id": f"functions.{fn['name']}:{first_index + j}", "type": "function",
                      "function": {"name": fn["name"], "arguments": args}})
    return calls, ""


def run_episode(task: Task, policy: Policy, *, seed: int = 0, failure_rate: float = 0.0,
                max_turns: int = 12) -> Trajectory:
    """Play one task to the end (or until `max_turns` policy calls) and return the trajectory."""
    tools = task.agent.openai_tools()
    sim = ToolSimulator({t: TOOL_LIBRARY[t] for t in task.agent.tools}, random.Random(f"{task.id}|{seed}"),
                        failure_rate)
    user = UserAgent(task)
    messages: list[dict] = [{"role": "system", "content": task.agent.system_prompt},
                            {"role": "user", "content": user.message(0)}]
    goal, n_calls, malformed, finished = 0, 0, [], False
    for _ in range(max_turns):
        out = policy([dict(m) for m in messages], tools)
        content = (out.get("content") or "") if isinstance(out, dict) else None
        if not isinstance(content, str):
            malformed.append(f"policy returned {type(out).__name__}, not an assistant message")
            break
        calls, problem = _parse_calls(out.get("tool_calls"), n_calls)
        if problem:
            malformed.append(problem)
            break
        if not content and not calls:
            malformed.append("empty assistant turn")
            break
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = calls
        messages.append(msg)
        n_calls += len(calls)
        for c in calls:
            messages.append({"role": "tool", "tool_call_id": c["id"],
                             "content": sim.call(c["function"]["name"], c["function"]["arguments"])})
        if not calls:
            goal += 1
            nxt = user.message(goal)
            if nxt is None:
                finished = True
                break
            messages.append({"role": "user", "content": nxt})
    return Trajectory(task, messages, tools, finished, sim.state, sim.log, malformed)
