"""tau-bench-style tool-use episodes from a JSONL file, played through the k2sys Gym-like Env interface.

One row per task (field names follow tau-bench's Task: user_id, instruction, actions, outputs):

    {"task_id": "retail-7", "user_id": "yusuf_1", "instruction": "Cancel order #W1 because ...",
     "user_messages": ["Hi, please cancel my order #W1.", "Yes, the reason is 'no longer needed'."],
     "system": "You are a retail support agent ...",                      (optional)
     "tools": [{"type": "function", "function": {"name", "description", "parameters"}}, ...],
     "read_only_tools": ["get_order_details"],
     "tool_results": [{"name": "get_order_details", "arguments": {"order_id": "#W1"}, "output": "{...}"},
                      {"name": "cancel_order", "output": "{\"status\": \"cancelled\"}"}],   (no arguments: any)
     "actions": [{"name": "cancel_order", "kwargs": {"order_id": "#W1", "reason": "no longer needed"}}],
     "outputs": ["cancelled"], "max_turns": 12}

    reset  -> [system?, first user message]; info["tools"] = tools
    step   -> tool calls answered from tool_results (exact arguments first, then a row without arguments,
              else a tau-bench style "Error: ..." string); an assistant turn without calls is a reply to
              the user: the next scripted user message follows, and after the last one the episode ends
    reward -> 1.0 when the multiset of state-changing calls (tools not in read_only_tools) equals the
              gold `actions` (name + arguments, key order ignored) and every `outputs` string occurs in
              the agent's replies (case-insensitive, commas ignored), else 0.0; tau-bench compares the
              database state after replaying the gold actions, which for these scripted tools is the same
              test. A malformed turn ends the episode with reward 0; running out of turns truncates it
              and the reward is judged on what happened (as tau-bench does).

The user is scripted (no user LLM), so a run is deterministic given the model's replies.
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from k2sys.envs.base import Env, EnvError, StepResult, make_env, register_env

__all__ = ["TauEpisodeEnv", "validate_tau_row", "tau_spec", "run_chat_episode", "run_chat_episodes"]

_ROW_KEYS = {"task_id", "user_id", "instruction", "user_messages", "system", "tools", "read_only_tools",
             "tool_results", "actions", "outputs", "max_turns"}


def _canon(args: Any) -> str:
    return json.dumps(args if args is not None else {}, sort_keys=True, ensure_ascii=False)


def validate_tau_row(row: dict, where: str = "tau row") -> dict:
    """The row with defaults filled in; a missing or ill-typed field raises naming it."""
    if not isinstance(row, dict):
        raise EnvError(f"{where}: expected a JSON object, got {type(row).__name__}")
    unknown = set(row) - _ROW_KEYS
    if unknown:
        raise EnvError(f"{where}: unknown fields {sorted(unknown)}; known: {sorted(_ROW_KEYS)}")
    if not isinstance(row.get("instruction"), str) and not row.get("user_messages"):
        raise EnvError(f"{where}: needs 'instruction' (str) or 'user_messages' (list of str)")
    if not isinstance(row.get("tools"), list):
        raise EnvError(f"{where}: 'tools' must be a list of OpenAI function tools")
    names = {t.get("function", {}).get("name") for t in row["tools"]}
    for i, a in enumerate(row.get("actions", [])):
        if not isinstance(a, dict) or not isinstance(a.get("name"), str) or not isinstance(a.get("kwargs", {}), dict):
            raise EnvError(f"{where}: actions[{i}] must be {{'name': str, 'kwargs': dict}}, got {a!r}")
        if a["name"] not in names:
            raise EnvError(f"{where}: actions[{i}] calls {a['name']!r}, which is not in 'tools' ({sorted(names)})")
    for i, t in enumerate(row.get("tool_results", [])):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or "output" not in t:
            raise EnvError(f"{where}: tool_results[{i}] must be {{'name', 'arguments'?, 'output'}}, got {t!r}")
    out = dict(row)
    out.setdefault("user_messages", [row.get("instruction")])
    out.setdefault("read_only_tools", [])
    out.setdefault("tool_results", [])
    out.setdefault("actions", [])
    out.setdefault("outputs", [])
    out.setdefault("max_turns", 12)
    if not all(isinstance(m, str) and m for m in out["user_messages"]):
        raise EnvError(f"{where}: 'user_messages' must be non-empty strings")
    if not isinstance(out["max_turns"], int) or out["max_turns"] < 1:
        raise EnvError(f"{where}: 'max_turns' must be an int >= 1, got {out['max_turns']!r}")
    return out


def tau_spec(row: dict) -> dict:
    return {"kind": "tau", "task": row}


class TauEpisodeEnv(Env):
    def __init__(self, row: dict):
        self.row = validate_tau_row(row, f"tau task {row.get('task_id', '?')!r}" if isinstance(row, dict) else "tau")
        self._tools = list(self.row["tools"])
        self.done = True

    @property
    def tools(self) -> list[dict]:
        return self._tools

    def reset(self, *, seed: int | None = None) -> tuple[list[dict], dict]:
        self.turns, self.user_turn, self.done = 0, 0, False
        self.writes: list[tuple[str, str]] = []
        self.replies: list[str] = []
        opening = ([{"role": "system", "content": self.row["system"]}] if self.row.get("system") else [])
        opening.append({"role": "user", "content": self.row["user_messages"][0]})
        return opening, {"tools": self._tools, "task_id": self.row.get("task_id")}

    def _lookup(self, name: str, args: Any) -> str:
        if name not in {t.get("function", {}).get("name") for t in self._tools}:
            return f"Error: unknown tool {name!r}"
        key = _canon(args)
        rows = [t for t in self.row["tool_results"] if t["name"] == name]
        hit = next((t for t in rows if "arguments" in t and _canon(t["arguments"]) == key), None)
        hit = hit or next((t for t in rows if "arguments" not in t), None)
        if hit is None:
            return f"Error: {name} failed for arguments {key}"
        out = hit["output"]
        return out if isinstance(out, str) else json.dumps(out, ensure_ascii=False)

    def _reward(self) -> tuple[float, dict]:
        ro = set(self.row["read_only_tools"])
        gold = Counter((a["name"], _canon(a.get("kwargs", {}))) for a in self.row["actions"] if a["name"] not in ro)
        actions_ok = Counter(self.writes) == gold
        said = " ".join(self.replies).lower().replace(",", "")
        missing = [o for o in self.row["outputs"] if o.lower().replace(",", "") not in said]
        ok = actions_ok and not missing
        return float(ok), {"actions_ok": actions_ok, "missing_outputs": missing, "writes": len(self.writes)}

    def step(self, action: dict) -> StepResult:
        if self.done:
            raise EnvError("TauEpisodeEnv.step: call reset() first (the episode is over or not started)")
        self.turns += 1
        if action.get("malformed"):
            self.done = True
            return [], 0.0, True, False, {"malformed": str(action["malformed"])}
        calls = list(action.get("tool_calls") or [])
        obs: list[dict] = []
        ro = set(self.row["read_only_tools"])
        for c in calls:
            fn = c.get("function") or {}
            args = fn.get("arguments")
            if isinstance(args, str):
                try:
                    args = json.loads(args or "{}")
                except json.JSONDecodeError:
                    args = {"__unparsed__": args}
            if fn.get("name") not in ro:
                self.writes.append((fn.get("name"), _canon(args)))
            obs.append({"role": "tool", "tool_call_id": c.get("id"), "content": self._lookup(fn.get("name"), args)})
        if not calls:
            self.replies.append(action.get("content") or "")
            self.user_turn += 1
            if self.user_turn >= len(self.row["user_messages"]):
                self.done = True
                reward, info = self._reward()
                return [], reward, True, False, info
            obs.append({"role": "user", "content": self.row["user_messages"][self.user_turn]})
        if self.turns >= self.row["max_turns"]:
            self.done = True
            reward, info = self._reward()
            return [], reward, False, True, info
        return obs, 0.0, False, False, {}


@register_env("tau")
def _make_tau(spec: dict) -> TauEpisodeEnv:
    if not isinstance(spec.get("task"), dict):
        raise EnvError("tau spec: 'task' must be a tau task row (dict); see k2sys.eval.tau")
    return TauEpisodeEnv(spec["task"])


def run_chat_episode(generator: Any, spec: dict, *, seed: int, temperature: float, top_p: float = 1.0,
                     max_tokens: int = 1024) -> dict:
    """Play one episode of any registered env through a chat Generator (message level, no tokens).
    Returns {"reward", "truncated", "turns", "messages", "finish_reason" (of the last turn; length also when
    the turn budget ran out), "info"}."""
    from k2sys.eval.generators import ChatRequest

    env = make_env(spec)
    obs, info = env.reset(seed=seed)
    messages, tools = list(obs), info.get("tools")
    turn = 0
    while True:
        comp = generator.chat([ChatRequest(messages=messages, tools=tools, temperature=temperature, top_p=top_p,
                                           max_tokens=max_tokens, seed=seed * 1009 + turn)])[0]
        action = dict(comp.message)
        if comp.finish_reason == "length":
            action["malformed"] = f"turn cut at max_tokens={max_tokens}"
        elif comp.finish_reason == "error":
            action["malformed"] = f"the server refused the turn: {comp.usage.get('error', '')}"
        turn += 1
        obs, reward, terminated, truncated, step_info = env.step(action)
        messages.append({k: v for k, v in action.items() if k != "malformed"})
        messages.extend(obs)
        if terminated or truncated:
            finish = "length" if truncated else comp.finish_reason
            return {"reward": float(reward), "truncated": bool(truncated), "turns": turn, "messages": messages,
                    "finish_reason": finish, "info": step_info}


def run_chat_episodes(generator: Any, specs: list[dict], seeds: list[int], *, temperature: float,
                      top_p: float = 1.0, max_tokens: int = 1024, concurrency: int = 16) -> list[dict]:
    """run_chat_episode over (spec, seed) pairs, `concurrency` episodes at a time."""
    if len(specs) != len(seeds):
        raise ValueError(f"run_chat_episodes: {len(specs)} specs but {len(seeds)} seeds")
    with ThreadPoolExecutor(max(1, min(concurrency, len(specs)))) as pool:
        return list(pool.map(lambda p: run_chat_episode(generator, p[0], seed=p[1], temperature=temperature,
                                                        top_p=top_p, max_tokens=max_tokens), zip(specs, seeds)))
