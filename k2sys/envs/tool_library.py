"""Tool-use episodes over a synthesized library (`k2sys synth`): the same tasks and tools the SFT
data came from, now as an RL environment. Chosen by a "library" key in a tool_use spec:

    {"kind": "tool_use", "library": DIR, "index": K,          task K of DIR/tasks.jsonl (its agent, its tools)
     "endpoint": URL | registered name, "model": ID,          LLM for simulated tools and the judge
     "judge": "llm" | "rule", "threshold": 0.7,               reward source; "pass" compares with threshold
     "failure_rate": 0.1, "max_turns": 12, "reward": "score" | "pass"}

    reset  -> [the agent's system prompt, the task's first goal]; info["tools"] = the agent's tools
    step   -> tool calls: real tools run on the task's MCP servers (a fresh server per episode),
              synthetic tools in the LLM tool simulator (world state, seeded injected failures);
              arguments are checked against the schema first. An answer without calls closes the
              current goal and the next goal is stated (the user is scripted: the task's goals in
              order, so an episode is reproducible). After the last goal the episode is judged.
    reward -> "llm": the rubric judge's score in [0, 1]; "rule" (no endpoint needed when every tool
              is real): the share of checks passed among: each goal answered, each expected tool
              called successfully, no invalid or unknown calls.

Determinism: failure injection is seeded by (task, seed); LLM replies are memoised per request in
the process, so replaying (seed, actions) reproduces observations and rewards. Without the memo
(another process), a temperature-0 endpoint is needed for replays to match.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import json
import os
import random
import threading
from pathlib import Path
from typing import Any

from k2sys.envs.base import EnvError, StepResult, ToolTurnEnv

__all__ = ["LibraryToolUseEnv", "library_specs", "make_library_env", "rule_score", "LIBRARY_SPEC_KEYS"]

LIBRARY_SPEC_KEYS = {"kind", "library", "index", "endpoint", "model", "judge", "threshold", "failure_rate",
                     "max_turns", "reward", "seed", "split"}
_REWARDS = ("score", "pass")


@functools.lru_cache(maxsize=8)
def _load(library: str, mtime_key: tuple) -> tuple[Any, dict, list]:
    from k2sys.data.synth.agents import load_agents, load_tasks
    from k2sys.data.synth.library import ToolLibrary

    d = Path(library)
    lib = ToolLibrary.load(d / "tools.jsonl")
    agents = {a.id: a for a in load_agents(d / "agents.jsonl")}
    return lib, agents, load_tasks(d / "tasks.jsonl")


def load_library(library: str) -> tuple[Any, dict, list]:
    d = Path(library)
    files = [d / "tools.jsonl", d / "agents.jsonl", d / "tasks.jsonl"]
    for f in files:
        if not f.exists():
            raise EnvError(f"tool_use spec: library {library!r} has no {f.name}; build it with `k2sys synth tools` "
                           "and `k2sys synth tasks`")
    return _load(str(d.resolve()), tuple(os.stat(f).st_mtime_ns for f in files))


def _heldout(task_id: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(f"heldout|{task_id}".encode()).digest()[:8], "big")
    return h / 2 ** 64 < fraction


def library_specs(n: int, seed: int, library: str, *, split: str = "train", heldout_fraction: float = 0.1,
                  **options: Any) -> list[dict]:
    """`n` specs over the library's tasks of a split (held out: a stable ~10% of task ids), in a
    seeded order, cycling when n exceeds the split."""
    _, _, tasks = load_library(library)
    if split not in ("train", "heldout"):
        raise EnvError(f"tool_use: split must be train or heldout, got {split!r}")
    pool = [k for k, t in enumerate(tasks) if _heldout(t.id, heldout_fraction) == (split == "heldout")]
    if not pool and n:
        raise EnvError(f"tool_use: library {library!r} has no {split} tasks")
    random.Random(f"library-specs|{seed}").shuffle(pool)
    return [{"kind": "tool_use", "library": str(library), "index": pool[k % len(pool)], **options} for k in range(n)]


_MEMO: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
_MEMO_LOCK = threading.Lock()


class _MemoBackend:
    """Replays identical requests from a process-wide memo (bounded), so replays are deterministic."""

    def __init__(self, inner: Any, key: str, size: int = 4096):
        self.inner, self.key, self.size = inner, key, size

    async def chat(self, messages: list[dict], **kw: Any) -> Any:
        k = hashlib.sha256(json.dumps([self.key, messages, kw], sort_keys=True, default=str).encode()).hexdigest()
        with _MEMO_LOCK:
            if k in _MEMO:
                _MEMO.move_to_end(k)
                return _MEMO[k]
        reply = await self.inner.chat(messages, **kw)
        with _MEMO_LOCK:
            _MEMO[k] = reply
            while len(_MEMO) > self.size:
                _MEMO.popitem(last=False)
        return reply


def rule_score(goals: list[str], rubric: dict, messages: list[dict], call_log: list[dict]) -> tuple[float, list]:
    """The rule reward: (share of checks passed, checks)."""
    checks = []
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    for g in range(len(goals)):
        if g >= len(users):
            checks.append((f"goal{g}:answered", False))
            continue
        end = users[g + 1] if g + 1 < len(users) else len(messages)
        span = messages[users[g] + 1:end]
        checks.append((f"goal{g}:answered", bool(span) and span[-1]["role"] == "assistant"
                       and not span[-1].get("tool_calls")))
    for name in rubric.get("expected_tools", []):
        checks.append((f"called:{name}", any(c["name"] == name and c["ok"] for c in call_log)))
    checks.append(("no invalid calls", not any(c["kind"] in ("invalid",) for c in call_log)))
    return sum(ok for _, ok in checks) / len(checks), checks


class LibraryToolUseEnv(ToolTurnEnv):
    def __init__(self, library: str, index: int, *, endpoint: str | None = None, model: str | None = None,
                 judge: str | None = None, threshold: float = 0.7, failure_rate: float = 0.1, max_turns: int = 12,
                 reward: str = "score"):
        lib, agents, tasks = load_library(library)
        if not 0 <= index < len(tasks):
            raise EnvError(f"tool_use spec: index {index} out of range; library {library!r} has {len(tasks)} tasks")
        if reward not in _REWARDS:
            raise EnvError(f"tool_use spec: reward must be one of {_REWARDS}, got {reward!r}")
        if max_turns < 1:
            raise EnvError(f"tool_use spec: max_turns must be >= 1, got {max_turns}")
        if not 0.0 <= failure_rate < 1.0:
            raise EnvError(f"tool_use spec: failure_rate must be in [0, 1), got {failure_rate}")
        judge = judge or ("llm" if endpoint else "rule")
        if judge not in ("llm", "rule"):
            raise EnvError(f"tool_use spec: judge must be llm or rule, got {judge!r}")
        self.task = tasks[index]
        if self.task.agent_id not in agents:
            raise EnvError(f"tool_use spec: task {self.task.id} names unknown agent {self.task.agent_id}")
        self.agent = agents[self.task.agent_id]
        self.tool_specs = {n: lib[n] for n in self.agent.tools if n in lib}
        needs_llm = judge == "llm" or any(not t.real for t in self.tool_specs.values())
        if needs_llm and not endpoint:
            raise EnvError(f"tool_use spec: task {self.task.id} has simulated tools or an llm judge; give "
                           "'endpoint' (an OpenAI-compatible URL or a registered backend name)")
        self.backend = None
        if endpoint:
            from k2sys.data.synth.llm import backend_for

            self.backend = _MemoBackend(backend_for(endpoint, model, temperature=0.0), f"{endpoint}|{model}")
        self.judge_kind, self.threshold, self.failure_rate = judge, threshold, failure_rate
        self.max_turns, self.reward_kind = max_turns, reward
        self._tools_openai = [t.openai() for t in self.tool_specs.values()]
        self._messages: list[dict] | None = None
        self._toolbox = None

    def _run(self, coro: Any, timeout_s: float = 600.0) -> Any:
        from k2sys.data.synth.mcp_io import background_loop

        return asyncio.run_coroutine_threadsafe(coro, background_loop()).result(timeout=timeout_s)

    def reset(self, *, seed: int | None = None) -> tuple[list[dict], dict]:
        from k2sys.data.synth.llm import Usage
        from k2sys.data.synth.roles import ToolSimulator

        self._close()
        seed = 0 if seed is None else int(seed)
        self.usage = Usage()
        self.sim = (ToolSimulator(self.backend, self.usage, random.Random(f"{self.task.id}|{seed}"), self.failure_rate,
                                  context=self.agent.system_prompt[:600], temperature=0.0)
                    if self.backend is not None else None)
        self.goal, self.turns, self.n_calls, self.done = 0, 0, 0, False
        self.call_log: list[dict] = []
        self.malformed: list[str] = []
        opening = [{"role": "system", "content": self.agent.system_prompt},
                   {"role": "user", "content": self.task.goals[0]}]
        self._messages = [dict(m) for m in opening]
        return opening, {"tools": self._tools_openai, "task_id": self.task.id}

    def _call(self, name: str, args: Any) -> str:
        from k2sys.data.synth.mcp_io import SyncToolbox, ToolOutcome
        from k2sys.data.synth.roles import schema_error

        tool = self.tool_specs.get(name)
        if tool is None:
            out = ToolOutcome(json.dumps({"error": f"no tool named {name!r}; available: {', '.join(self.tool_specs)}"}),
                              True, "invalid")
        elif (problem := schema_error(tool, args)) is not None:
            out = ToolOutcome(json.dumps({"error": problem}), True, "invalid")
        elif tool.real:
            if self._toolbox is None:
                self._toolbox = SyncToolbox()
            out = self._toolbox.call(tool, args)
        else:
            out = self._run(self.sim.call(tool, args))
        self.call_log.append({"name": name, "ok": not out.is_error, "kind": out.kind})
        return out.content

    def _close(self) -> None:
        if self._toolbox is not None:
            self._toolbox.close()
            self._toolbox = None

    def _end(self, truncated: bool) -> StepResult:
        from k2sys.data.synth.roles import Judge

        self.done = True
        self._close()
        info: dict[str, Any] = {"goals_done": self.goal, "tool_calls": self.n_calls, "judge": self.judge_kind}
        if self.malformed:
            score, info["failed"] = 0.0, self.malformed[:3]
        elif self.judge_kind == "llm":
            try:
                res = self._run(Judge(self.backend, self.usage).score(self.task.goals, self.task.rubric,
                                                                      self._messages, list(self.tool_specs)))
                score, info["checks"] = res.score, res.checks[:8]
            except ValueError as e:   # MalformedReply: the judge failed, not the policy
                score, info["judge_error"] = 0.0, str(e)[:300]
        else:
            score, checks = rule_score(self.task.goals, self.task.rubric, self._messages, self.call_log)
            info["failed"] = [n for n, ok in checks if not ok][:8]
        info.update(score=score, passed=score >= self.threshold)
        reward = float(score >= self.threshold) if self.reward_kind == "pass" else float(score)
        return [], reward, not truncated, truncated, info

    def _execute(self, name: str, arguments: Any) -> str:
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass  # the tool (or its simulator) reports the bad arguments
        return self._call(name, arguments)

    def _next_user(self, goal: int) -> str | None:
        return self.task.goals[goal] if goal < len(self.task.goals) else None

    @property
    def tools(self) -> list[dict]:  # type: ignore[override]
        return self._tools_openai

    def __del__(self) -> None:
        try:
            self._close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


def make_library_env(spec: dict) -> LibraryToolUseEnv:
    unknown = set(spec) - LIBRARY_SPEC_KEYS
    if unknown:
        raise EnvError(f"tool_use spec: unknown keys {sorted(unknown)}")
    if not isinstance(spec.get("library"), str) or not spec["library"]:
        raise EnvError("tool_use spec: 'library' must be the directory of a `k2sys synth` library")
    if not isinstance(spec.get("index"), int) or spec["index"] < 0:
        raise EnvError(f"tool_use spec: 'index' must be an int >= 0, got {spec.get('index')!r}")
    return LibraryToolUseEnv(spec["library"], spec["index"], endpoint=spec.get("endpoint"), model=spec.get("model"),
                             judge=spec.get("judge"), threshold=float(spec.get("threshold", 0.7)),
                             failure_rate=float(spec.get("failure_rate", 0.1)),
                             max_turns=int(spec.get("max_turns", 12)), reward=spec.get("reward", "score"))
