"""Gym-like environments for agentic multi-turn rollouts.

    env = make_env(spec)                           # spec: a JSON-able dict, e.g. {"kind": "tool_use", ...}
    obs, info = env.reset(seed=s)                  # obs: the messages that open the episode
    obs, reward, terminated, truncated, info = env.step(action)

`action` is the policy's assistant message ({"role": "assistant", "content", "tool_calls"?}, or
with a "malformed" reason when the policy's text did not parse); `obs` are the messages the
environment answers with (tool results, the next user turn), empty when the episode is over.
`info["tools"]` (reset) is the OpenAI-style tool list the policy may call. Rewards come on the
step that ends the episode (terminated: the task is over; truncated: the turn budget ran out).

Environments see messages, never tokens: k2sys.envs.agent_loop renders messages into tokens and
parses generated tokens back. Determinism contract: reset(seed) followed by the same actions gives
the same observations and rewards, so a paused episode is restored by replaying its actions
(`replay`), and partial rollouts keep only (spec, seed, actions) besides the tokens.
"""

from __future__ import annotations

import abc
from typing import Any, Callable

__all__ = ["Env", "EnvError", "StepResult", "register_env", "make_env", "env_kinds", "replay"]

StepResult = tuple[list[dict], float, bool, bool, dict]


class EnvError(ValueError):
    """A bad environment spec or a call out of order; the message names the field or the fix."""


class Env(abc.ABC):
    """One episode at a time; see the module doc for the contract."""

    spec: dict

    @abc.abstractmethod
    def reset(self, *, seed: int | None = None) -> tuple[list[dict], dict]:
        """Start an episode: (opening messages, info with "tools")."""

    @abc.abstractmethod
    def step(self, action: dict) -> StepResult:
        """Apply the policy's assistant message: (messages, reward, terminated, truncated, info)."""

    @property
    def tools(self) -> list[dict] | None:
        return None


_REGISTRY: dict[str, Callable[[dict], Env]] = {}


class ToolTurnEnv(Env):
    """A multi-turn tool-use episode: each assistant turn either calls tools (their results come back
    as tool messages) or answers, which moves the user to its next goal. Subclasses give how a tool
    call runs (`_execute`), the user's next message (`_next_user`, None ends the episode) and the
    scoring (`_end`); they keep `_messages`, `done`, `turns`, `max_turns`, `malformed`, `n_calls`, `goal`."""

    def _execute(self, name: str, arguments: Any) -> str:
        raise NotImplementedError

    def _next_user(self, goal: int) -> str | None:
        raise NotImplementedError

    def _end(self, truncated: bool) -> StepResult:
        raise NotImplementedError

    def step(self, action: dict) -> StepResult:
        if self._messages is None or self.done:
            raise EnvError(f"{type(self).__name__}.step: call reset() first (the episode is over or not started)")
        self.turns += 1
        if action.get("malformed"):
            self.malformed.append(str(action["malformed"]))
            return self._end(truncated=False)
        calls = list(action.get("tool_calls") or [])
        content = action.get("content") or ""
        if not calls and not content:
            self.malformed.append("empty assistant turn")
            return self._end(truncated=False)
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = calls
        self._messages.append(msg)
        obs: list[dict] = [{"role": "tool", "tool_call_id": c["id"],
                            "content": self._execute(c["function"]["name"], c["function"]["arguments"])}
                           for c in calls]
        self.n_calls += len(calls)
        if not calls:
            self.goal += 1
            nxt = self._next_user(self.goal)
            if nxt is None:
                return self._end(truncated=False)
            obs.append({"role": "user", "content": nxt})
        self._messages.extend(dict(m) for m in obs)
        if self.turns >= self.max_turns:
            return self._end(truncated=True)
        return obs, 0.0, False, False, {}


def register_env(kind: str) -> Callable[[Callable[[dict], Env]], Callable[[dict], Env]]:
    """Decorator: `factory(spec) -> Env` builds environments whose spec has {"kind": kind}."""
    def deco(factory: Callable[[dict], Env]) -> Callable[[dict], Env]:
        if kind in _REGISTRY and _REGISTRY[kind] is not factory:
            raise EnvError(f"environment kind {kind!r} is registered twice")
        _REGISTRY[kind] = factory
        return factory
    return deco


def env_kinds() -> list[str]:
    return sorted(_REGISTRY)


def make_env(spec: dict) -> Env:
    """Build the environment a spec names (specs are what rollouts store and resume from)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
        raise EnvError(f"env spec must be a dict with a 'kind' string, got {spec!r}")
    factory = _REGISTRY.get(spec["kind"])
    if factory is None:
        raise EnvError(f"env spec kind {spec['kind']!r} is unknown; registered: {env_kinds()}")
    env = factory(spec)
    env.spec = dict(spec)
    return env


def replay(spec: dict, seed: int, actions: list[dict]) -> tuple[Env, list[Any]]:
    """A fresh env of `spec` brought to the state after `actions` (reset(seed), then each step).
    Returns (env, the step results): a resumed partial rollout continues from this env."""
    env = make_env(spec)
    env.reset(seed=seed)
    results = []
    for i, a in enumerate(actions):
        res = env.step(a)
        results.append(res)
        if (res[2] or res[3]) and i != len(actions) - 1:
            raise EnvError(f"replay: the episode ended at action {i} of {len(actions)}; the env is not "
                           "deterministic in (seed, actions) or the actions belong to another spec")
    return env, results
