"""Rubric judge (seed section 3.3): keep only trajectories that meet their task's rubric.

The judge reads what a reviewer could read: the conversation, the tool results in it, and the
environment's final state; never the solution plan. Per goal (the span after each user turn):

    answered        the span ends with an assistant message without tool calls
    call:NAME       each expected call was made with matching arguments and did not fail
    own tools only  no call to a tool outside the agent's tool set
    no bad calls    no tool result is an argument/usage error (transient outages are fine:
                    a retry is good behaviour to learn)
    budget          successful calls <= max_tool_calls
    fact:X          each fact is stated in the final answer (numbers compared as numbers)
    note:T          the notebook holds note T containing the expected text

and, for the episode, `finished` (every goal answered within the turn budget, no malformed output).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .rollout import Trajectory
from .tasks import Rubric

__all__ = ["Verdict", "RubricJudge", "args_match", "answer_states"]

_NUM_RE = re.compile(r"-?\d+(?:\.\d+)?")
TRANSIENT_MARK = "temporarily unavailable"


@dataclass
class Verdict:
    checks: list[tuple[str, bool]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(ok for _, ok in self.checks)

    @property
    def score(self) -> float:
        return sum(ok for _, ok in self.checks) / len(self.checks) if self.checks else 0.0

    @property
    def failed(self) -> list[str]:
        return [name for name, ok in self.checks if not ok]


def _num(x: Any) -> float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str) and _NUM_RE.fullmatch(x.strip()):
        return float(x)
    return None


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def args_match(expected: dict, actual: dict) -> bool:
    """Every expected argument is present: numbers within 1e-6 relative, strings case-insensitive
    and whitespace-insensitive (so "8*3" matches "8 * 3"); extra arguments are allowed."""
    for k, want in expected.items():
        if k not in actual:
            return False
        got = actual[k]
        nw, ng = _num(want), _num(got)
        if nw is not None and ng is not None:
            if not _close(nw, ng):
                return False
        elif isinstance(want, str) and isinstance(got, str):
            if want.replace(" ", "").casefold() != got.replace(" ", "").casefold():
                return False
        elif want != got:
            return False
    return True


def answer_states(answer: str, fact: str) -> bool:
    """A numeric fact must appear as a number in the answer; other facts as a case-insensitive substring."""
    want = _num(fact)
    if want is None:
        return fact.casefold() in answer.casefold()
    return any(_close(want, float(m)) for m in _NUM_RE.findall(answer.replace(",", "")))


class RubricJudge:
    """Callable: trajectory -> Verdict. Deterministic; an LLM judge can replace it with the same signature."""

    def __call__(self, traj: Trajectory) -> Verdict:
        v = Verdict()
        v.checks.append(("finished", traj.finished and not traj.malformed))
        allowed = set(traj.task.agent.tools)
        users = [i for i, m in enumerate(traj.messages) if m["role"] == "user"]
        for g, goal in enumerate(traj.task.goals):
            if g >= len(users):
                v.checks.append((f"goal{g}:reached", False))
                continue
            end = users[g + 1] if g + 1 < len(users) else len(traj.messages)
            self._goal(v, f"goal{g}", goal.rubric, traj.messages[users[g] + 1:end], allowed)
        for g, goal in enumerate(traj.task.goals):
            for title, text in goal.rubric.final_notes.items():
                note = traj.state.get("notes", {}).get(title)
                v.checks.append((f"goal{g}:note:{title}", isinstance(note, str) and answer_states(note, text)))
        return v

    def _goal(self, v: Verdict, tag: str, rubric: Rubric, span: list[dict], allowed: set[str]) -> None:
        results = {m["tool_call_id"]: m["content"] for m in span if m["role"] == "tool"}
        calls = []   # (name, args, outcome) with outcome ok | transient | error
        for m in span:
            for c in m.get("tool_calls", []) if m["role"] == "assistant" else []:
                content = results.get(c["id"], "")
                try:
                    out = json.loads(content)
                except json.JSONDecodeError:
                    out = None
                if isinstance(out, dict) and "error" in out:
                    outcome = "transient" if TRANSIENT_MARK in str(out["error"]) else "error"
                else:
                    outcome = "ok" if c["id"] in results else "error"
                calls.append((c["function"]["name"], c["function"]["arguments"], outcome))
        final = span[-1] if span else None
        answered = bool(final and final["role"] == "assistant" and not final.get("tool_calls"))
        v.checks.append((f"{tag}:answered", answered))
        for e in rubric.expected_calls:
            ok = any(n == e.name and o == "ok" and args_match(e.args, a) for n, a, o in calls)
            v.checks.append((f"{tag}:call:{e.name}", ok))
        v.checks.append((f"{tag}:own tools only", all(n in allowed for n, _, _ in calls)))
        v.checks.append((f"{tag}:no bad calls", all(o != "error" for _, _, o in calls)))
        v.checks.append((f"{tag}:budget", sum(o == "ok" for _, _, o in calls) <= rubric.max_tool_calls))
        answer = final["content"] if answered else ""
        for fact in rubric.answer_facts:
            v.checks.append((f"{tag}:fact:{fact}", answered and answer_states(answer, fact)))
