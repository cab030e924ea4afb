"""The model roles of a multi-agent rollout (seed section 3.3), each an LLM behind a ChatBackend.

    UserSimulator   plays a user with a persona (communication style, preferences) who pursues the
                    task's goals turn by turn: {"message": ..., "done": bool}. It sees only what a
                    user sees (its own turns and the assistant's answers, not tool traffic).
    ToolSimulator   executes calls to synthetic tools: arguments are first checked against the
                    tool's JSON schema (a bad call gets the validation error, no LLM involved); then,
                    at `failure_rate`, a seeded injected failure (timeout, rate limit, outage,
                    partial result); else the LLM answers {"result", "state", "error"} given the
                    tool spec, the call and the world state, and the state it returns replaces the
                    old one, so later calls see earlier effects.
    ToolRouter      name -> real MCP server (MCPToolbox) or the ToolSimulator; an unknown tool name
                    or invalid arguments come back as an error result, as a real API would answer.
    Judge           scores a finished trajectory against the task rubric: per-criterion verdicts
                    and a 0-10 score, normalised to [0, 1].

Replies that stay malformed after one re-ask raise MalformedReply; the rollout records it as the
trajectory's failure reason (the run goes on).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from .library import LibraryTool
from .llm import ChatBackend, Usage, ask_json, neutralize
from .mcp_io import ToolOutcome

__all__ = ["Persona", "PERSONAS", "UserSimulator", "ToolSimulator", "ToolRouter", "Judge", "JudgeResult",
           "USER_SCHEMA", "TOOLSIM_SCHEMA", "JUDGE_SCHEMA", "FAILURE_KINDS", "render_transcript", "neutralize", "schema_error"]


@dataclass(frozen=True)
class Persona:
    name: str
    style: str


PERSONAS = (
    Persona("terse_expert", "an expert in a hurry: short messages, no pleasantries, precise values"),
    Persona("chatty_novice", "a friendly beginner: explains context, asks what things mean, uses everyday words"),
    Persona("meticulous_planner", "detail-oriented: states every constraint up front, asks for confirmation of changes"),
    Persona("impatient_manager", "impatient: wants results fast, pushes back on long answers"),
    Persona("non_native_speaker", "writes simple English with small grammar mistakes, sometimes unclear"),
    Persona("skeptic", "doubts answers: asks how the assistant knows, asks it to double-check"),
    Persona("piecemeal", "reveals requirements one at a time, only when the previous one is handled"),
    Persona("polite_elder", "very polite and formal, thanks the assistant, asks for plain explanations"),
)

USER_SCHEMA = {
    "type": "object",
    "properties": {"message": {"type": "string", "maxLength": 1500}, "done": {"type": "boolean"}},
    "required": ["message", "done"],
}

TOOLSIM_SCHEMA = {
    "type": "object",
    "properties": {"result": {}, "state": {"type": "object"}, "error": {"type": ["string", "null"], "maxLength": 500}},
    "required": ["result", "state"],
}

JUDGE_SCHEMA = {
    "type": "object",
    "properties": {
        "checks": {"type": "array", "maxItems": 20, "items": {
            "type": "object",
            "properties": {"criterion": {"type": "string", "maxLength": 300}, "passed": {"type": "boolean"},
                           "reason": {"type": "string", "maxLength": 400}},
            "required": ["criterion", "passed"]}},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "summary": {"type": "string", "maxLength": 600}},
    "required": ["checks", "score"],
}

FAILURE_KINDS = (
    ("timeout", "the service did not answer within 30 s; try again"),
    ("rate_limited", "rate limit exceeded (429); retry after a short wait"),
    ("unavailable", "service temporarily unavailable (503); retry later"),
    ("internal", "internal error while processing the request; the operation was not applied"),
)


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 20] + f"... [{len(s) - n + 20} more chars]"


def render_transcript(messages: Sequence[dict], *, tool_traffic: bool = True, limit: int = 1500) -> str:
    """A readable transcript for the judge (everything) or the user simulator (no tool traffic)."""
    out = []
    for m in messages:
        role = m["role"]
        if role == "system":
            continue
        if role == "tool":
            if tool_traffic:
                out.append(f"[tool result {m.get('tool_call_id', '')}] {_clip(str(m['content']), limit)}")
            continue
        if role == "assistant":
            if m.get("content"):
                out.append(f"ASSISTANT: {_clip(m['content'], limit * 2)}")
            if tool_traffic:
                for c in m.get("tool_calls") or []:
                    args = c["function"]["arguments"]
                    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                    out.append(f"[tool call {c['id']}] {c['function']['name']}({_clip(args, limit)})")
            continue
        out.append(f"USER: {_clip(str(m['content']), limit * 2)}")
    return neutralize("\n".join(out))


class UserSimulator:
    """One user for one trajectory (persona + the task's goals)."""

    def __init__(self, llm: ChatBackend, persona: Persona, goals: Sequence[str], usage: Usage, *,
                 temperature: float | None = None):
        self.llm, self.persona, self.goals, self.usage, self.temperature = llm, persona, list(goals), usage, temperature

    def _prompt(self, messages: Sequence[dict]) -> list[dict]:
        goals = "\n".join(f"{i + 1}. {g}" for i, g in enumerate(self.goals))
        sys = (f"You are role-playing a USER talking to an AI assistant. Your persona: {self.persona.style}.\n"
               f"Your goals, to pursue in this order:\n{goals}\n"
               "Rules: write only the user's next message, in your persona's voice. Ask for one goal (or the next "
               "part of it) at a time; give details when the assistant asks; move to the next goal once the "
               "current one is handled. Never do the assistant's work and never mention these instructions. "
               "Set done=true (message may be a short closing) when every goal is handled, or when the "
               "assistant clearly cannot help.\n"
               'Reply with only JSON: {"message": "...", "done": false}')
        convo = render_transcript(messages, tool_traffic=False)
        ask = ("The conversation so far:\n" + convo + "\n\nWrite your next message.") if convo else \
            "Start the conversation: write your first message."
        return [{"role": "system", "content": neutralize(sys)}, {"role": "user", "content": ask}]

    async def next(self, messages: Sequence[dict]) -> tuple[str, bool]:
        first = not any(m["role"] == "user" for m in messages)

        def check(obj: Any) -> None:
            if not obj["message"].strip() and (first or not obj["done"]):
                raise ValueError("message is empty")
        obj = await ask_json(self.llm, self._prompt(messages), schema=USER_SCHEMA, role="user_sim", usage=self.usage,
                             check=check, temperature=self.temperature)
        return neutralize(obj["message"].strip()[:4000]), bool(obj["done"]) and not first


def schema_error(tool: LibraryTool, args: Any) -> str | None:
    import jsonschema

    if not isinstance(args, dict):
        return f"{tool.name}: arguments must be a JSON object"
    try:
        jsonschema.validate(args, tool.parameters)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        return f"{tool.name}: invalid arguments{' at ' + where if where else ''}: {e.message[:300]}"
    except jsonschema.SchemaError as e:
        return f"{tool.name}: the tool's schema is broken ({e.message[:100]})"
    return None


class ToolSimulator:
    """Simulated execution of synthetic tools for one trajectory; keeps the world state."""

    def __init__(self, llm: ChatBackend, usage: Usage, rng: random.Random, failure_rate: float = 0.1, *,
                 context: str = "", temperature: float | None = 0.2):
        if not 0.0 <= failure_rate < 1.0:
            raise ValueError(f"failure_rate={failure_rate} must be in [0, 1)")
        self.llm, self.usage, self.rng, self.failure_rate = llm, usage, rng, failure_rate
        self.context, self.temperature = context, temperature
        self.state: dict = {}
        self.log: list[dict] = []

    async def call(self, tool: LibraryTool, args: dict) -> ToolOutcome:
        # One draw per valid call, so the failure pattern depends only on the call sequence.
        if self.failure_rate and self.rng.random() < self.failure_rate:
            kind, text = FAILURE_KINDS[self.rng.randrange(len(FAILURE_KINDS))]
            self.log.append({"tool": tool.name, "injected": kind})
            return ToolOutcome(json.dumps({"error": f"{tool.name}: {text}", "code": kind, "retryable": True}), True,
                               "injected", {"failure": kind})
        sys = ("You simulate the backend of a software tool for testing an AI agent. Act exactly like the real "
               "service: return realistic, specific, self-consistent data (ids, timestamps, amounts); respect "
               "the world state (what earlier calls created or changed) and update it with this call's effects; "
               "reject impossible requests (unknown ids, insufficient funds, conflicts) with an error message "
               "instead of a result.\n"
               + (f"Scenario: {self.context}\n" if self.context else "")
               + 'Reply with only JSON: {"result": <the tool\'s return value, or null on error>, '
                 '"state": <the complete world state after the call, an object>, "error": null or "message"}')
        user = (f"Tool: {tool.name}\nDescription: {tool.description}\n"
                f"Parameters schema: {json.dumps(tool.parameters, ensure_ascii=False)[:2500]}\n"
                f"World state before the call: {json.dumps(self.state, ensure_ascii=False)[:6000]}\n"
                f"Call arguments: {json.dumps(args, ensure_ascii=False)}")
        user = neutralize(user)
        obj = await ask_json(self.llm, [{"role": "system", "content": sys}, {"role": "user", "content": user}],
                             schema=TOOLSIM_SCHEMA, role="tool_sim", usage=self.usage, temperature=self.temperature)
        self.state = obj["state"]
        err = obj.get("error")
        self.log.append({"tool": tool.name, "error": err})
        if err:
            return ToolOutcome(neutralize(json.dumps({"error": str(err)}, ensure_ascii=False)), True, "error")
        return ToolOutcome(neutralize(json.dumps(obj["result"], ensure_ascii=False)), False, "ok")


@dataclass
class ToolRouter:
    """Routes one trajectory's calls to the real server or the simulator, and counts them."""

    tools: dict[str, LibraryTool]
    simulator: ToolSimulator | None
    toolbox: Any = None                      # MCPToolbox (async) for real tools
    stats: dict = field(default_factory=lambda: {"calls": 0, "real": 0, "simulated": 0, "failed": 0,
                                                 "injected": 0, "invalid": 0, "unknown": 0})

    async def call(self, name: str, args: Any) -> ToolOutcome:
        self.stats["calls"] += 1
        tool = self.tools.get(name)
        if tool is None:
            self.stats["unknown"] += 1
            self.stats["failed"] += 1
            return ToolOutcome(json.dumps({"error": f"no tool named {name!r}; available: {', '.join(self.tools)}"}),
                               True, "invalid")
        problem = schema_error(tool, args)
        if problem is not None:
            self.stats["invalid"] += 1
            self.stats["failed"] += 1
            return ToolOutcome(json.dumps({"error": problem}, ensure_ascii=False), True, "invalid")
        if tool.real:
            if self.toolbox is None:
                raise RuntimeError(f"{name} is a real MCP tool but no MCPToolbox was given")
            self.stats["real"] += 1
            out = await self.toolbox.call(tool, args)
        else:
            if self.simulator is None:
                raise RuntimeError(f"{name} is simulated but no ToolSimulator was given")
            self.stats["simulated"] += 1
            out = await self.simulator.call(tool, args)
        if out.is_error:
            self.stats["failed"] += 1
            if out.kind == "injected":
                self.stats["injected"] += 1
        return out


@dataclass
class JudgeResult:
    score: float                   # in [0, 1]
    checks: list[dict]
    summary: str = ""

    def to_json(self) -> dict:
        return {"score": self.score, "checks": self.checks, "summary": self.summary}


class Judge:
    """Rubric judge (LLM): per-criterion verdicts and a score; `keep` is score >= threshold."""

    def __init__(self, llm: ChatBackend, usage: Usage, *, temperature: float | None = 0.0):
        self.llm, self.usage, self.temperature = llm, usage, temperature

    async def score(self, goals: Sequence[str], rubric: dict, messages: Sequence[dict],
                    tools: Sequence[str]) -> JudgeResult:
        crit = "\n".join(f"- {c}" for c in rubric.get("success_criteria", []))
        chk = "\n".join(f"- {c}" for c in rubric.get("checkpoints", []))
        sys = ("You are a strict judge of an AI assistant's conversation with a user, in which the assistant "
               "used tools. Judge only from the transcript (tool results are the ground truth of what happened). "
               "For each success criterion and checkpoint, decide passed true/false with a short reason. Also "
               "penalise: invented facts not supported by tool results, ignoring tool errors, claiming actions "
               "that did not happen, unnecessary or repeated calls, not answering the user. Then give an overall "
               "score from 0 (useless) to 10 (flawless).\n"
               'Reply with only JSON: {"checks": [{"criterion": "...", "passed": true, "reason": "..."}], '
               '"score": 0-10, "summary": "..."}')
        user = ("User goals:\n" + "\n".join(f"{i + 1}. {g}" for i, g in enumerate(goals))
                + f"\n\nSuccess criteria:\n{crit or '- (none)'}\nCheckpoints:\n{chk or '- (none)'}\n"
                f"Expected tools: {', '.join(rubric.get('expected_tools', [])) or '(any)'}\n"
                f"Tools available to the assistant: {', '.join(tools)}\n\n"
                f"Transcript:\n{render_transcript(messages, tool_traffic=True)}")
        prompt = [{"role": "system", "content": sys}, {"role": "user", "content": neutralize(user)}]
        obj = await ask_json(self.llm, prompt, schema=JUDGE_SCHEMA, role="judge", usage=self.usage, temperature=self.temperature)
        checks = [{"criterion": c["criterion"][:300], "passed": bool(c["passed"]),
                   "reason": str(c.get("reason", ""))[:400]} for c in obj["checks"][:20]]
        return JudgeResult(round(float(obj["score"]) / 10.0, 4), checks, str(obj.get("summary", ""))[:600])
