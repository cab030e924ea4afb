"""Agents and rubric tasks from the tool library (seed section 3.2).

    sample_tool_subsets   tool subsets that cover the library: each agent starts from a least-used
                          tool, adds tools of its domain, then of its category, then one from
                          elsewhere (so agents must choose among unrelated tools). A tool is taken
                          only while no other tool is used less (ties broken by a seeded RNG), so
                          with n_agents * k_min >= len(library) every tool is in some agent.
    generate_agent        the LLM writes the agent's name and system prompt for its tools
    generate_tasks_for    the LLM writes tasks from easy to hard for one agent; each task has the
                          user's goals (in order) and a rubric: success criteria, expected tools (of
                          the agent's own), checkpoints. A task naming a tool the agent lacks is
                          refused and reported.

Stored as `agents.jsonl` and `tasks.jsonl` next to `tools.jsonl`.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from .library import LibraryTool, ToolLibrary
from .llm import ChatBackend, EndpointError, MalformedReply, Usage, ask_json, neutralize

__all__ = ["Agent", "SynthTask", "sample_tool_subsets", "generate_agent", "generate_tasks_for",
           "build_agents_and_tasks", "AGENT_SCHEMA", "TASKS_SCHEMA", "DIFFICULTIES", "load_agents", "load_tasks"]

DIFFICULTIES = ("easy", "medium", "hard")


@dataclass
class Agent:
    id: str
    name: str
    system_prompt: str
    tools: list[str]
    focus: str = ""
    provenance: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Agent":
        return cls(d["id"], d["name"], d["system_prompt"], list(d["tools"]), d.get("focus", ""), d.get("provenance", {}))


@dataclass
class SynthTask:
    id: str
    agent_id: str
    difficulty: str
    goals: list[str]                      # what the user wants, in the order the user asks for it
    rubric: dict                          # success_criteria, expected_tools, checkpoints
    provenance: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "SynthTask":
        return cls(d["id"], d["agent_id"], d["difficulty"], list(d["goals"]), dict(d["rubric"]), d.get("provenance", {}))


AGENT_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 60},
                   "system_prompt": {"type": "string", "minLength": 20, "maxLength": 2000}},
    "required": ["name", "system_prompt"],
}

TASKS_SCHEMA = {
    "type": "object",
    "properties": {"tasks": {"type": "array", "minItems": 1, "maxItems": 12, "items": {
        "type": "object",
        "properties": {
            "difficulty": {"type": "string", "enum": list(DIFFICULTIES)},
            "goals": {"type": "array", "minItems": 1, "maxItems": 6,
                      "items": {"type": "string", "minLength": 5, "maxLength": 500}},
            "rubric": {"type": "object", "properties": {
                "success_criteria": {"type": "array", "minItems": 1, "maxItems": 8,
                                     "items": {"type": "string", "minLength": 3, "maxLength": 300}},
                "expected_tools": {"type": "array", "maxItems": 10, "items": {"type": "string"}},
                "checkpoints": {"type": "array", "maxItems": 8, "items": {"type": "string", "maxLength": 300}}},
                "required": ["success_criteria", "expected_tools", "checkpoints"]}},
        "required": ["difficulty", "goals", "rubric"]}}},
    "required": ["tasks"],
}


_TASKS_ACCEPT = {"type": "object", "required": ["tasks"],
                 "properties": {"tasks": {"type": "array", "minItems": 1, "items": {"type": "object"}}}}


def sample_tool_subsets(library: ToolLibrary, n_agents: int, k_min: int = 3, k_max: int = 6, seed: int = 0,
                        n_foreign: int = 1) -> list[list[str]]:
    """Tool-name subsets for `n_agents` agents covering the library (see the module doc)."""
    if k_min < 1 or k_max < k_min:
        raise ValueError(f"need 1 <= k_min <= k_max, got {k_min}, {k_max}")
    tools = library.tools
    if not tools:
        return []
    rng = random.Random(f"agents|{seed}")
    used = {t.name: 0 for t in tools}
    tiebreak = {t.name: rng.random() for t in tools}
    out = []

    def pick(pool: Sequence[LibraryTool], n: int, chosen: list[str]) -> list[str]:
        # Only tools at the library-wide lowest use count qualify, so no tool is used twice while
        # another is still unused; among them, least recently favoured first (seeded tiebreak).
        avail = [t.name for t in tools if t.name not in chosen]
        if not avail or n <= 0:
            return []
        level = min(used[nm] for nm in avail)
        cand = sorted((t.name for t in pool if t.name not in chosen and used[t.name] == level),
                      key=lambda nm: tiebreak[nm])
        return cand[:n]

    for _ in range(n_agents):
        k = min(len(tools), rng.randint(k_min, k_max))
        chosen = pick(tools, 1, [])
        a = library[chosen[0]]
        n_foreign_here = min(n_foreign, k - 2) if k >= 3 else 0
        chosen += pick([t for t in tools if t.domain == a.domain], k - 1 - n_foreign_here, chosen)
        chosen += pick([t for t in tools if t.category == a.category], k - n_foreign_here - len(chosen), chosen)
        chosen += pick([t for t in tools if t.category != a.category], k - len(chosen), chosen)
        while len(chosen) < k:
            chosen += pick(tools, 1, chosen)
        for nm in chosen:
            used[nm] += 1
            tiebreak[nm] = rng.random()
        out.append(chosen)
    return out


def _tool_lines(tools: Sequence[LibraryTool], with_schema: bool) -> str:
    lines = []
    for t in tools:
        line = f"- {t.name}: {t.description}"
        if with_schema:
            line += f"\n  arguments: {json.dumps(t.parameters.get('properties', {}), ensure_ascii=False)[:800]}"
            if t.parameters.get("required"):
                line += f"\n  required: {t.parameters['required']}"
        lines.append(line)
    return "\n".join(lines)


_AGENT_PROMPT = """Create an AI assistant (an agent) that works with exactly these tools:
{tools}
Write its name and its system prompt: who it serves, what it can do with these tools, how it
behaves (checks facts with its tools, asks for missing details, confirms what it changed, admits
what it cannot do), in 3-8 sentences. Style hint: {style}.
Reply with only JSON: {{"name": "...", "system_prompt": "..."}}"""

_TASKS_PROMPT = """An AI assistant has this system prompt:
\"\"\"{system_prompt}\"\"\"
and these tools:
{tools}

Write {n} tasks that a user could bring to this assistant, ordered from easy to hard:
- easy: one goal, one or two tool calls; medium: two goals or a chain of calls whose later calls
  use earlier results; hard: several goals, state changes to verify, or a failure to work around.
- goals: what the user wants, in the order the user will ask; concrete values (names, dates,
  amounts) so the task can be checked.
- rubric: success_criteria (checkable statements about the final outcome), expected_tools (names of
  the tools above a good solution uses), checkpoints (intermediate facts a judge can verify).
Reply with only JSON: {{"tasks": [{{"difficulty": "easy|medium|hard", "goals": ["..."],
"rubric": {{"success_criteria": ["..."], "expected_tools": ["..."], "checkpoints": ["..."]}}}}]}}"""

_STYLES = ("formal and precise", "friendly and brief", "proactive, suggests next steps", "cautious, confirms "
           "before changing anything", "expert and terse", "patient teacher")


async def generate_agent(llm: ChatBackend, agent_id: str, tools: Sequence[LibraryTool], *, usage: Usage,
                         rng: random.Random, model_tag: dict | None = None) -> Agent:
    obj = await ask_json(llm, [{"role": "user", "content": _AGENT_PROMPT.format(
        tools=_tool_lines(tools, False), style=rng.choice(_STYLES))}], schema=AGENT_SCHEMA, role="agentgen",
        usage=usage)
    cats = sorted({t.category for t in tools})
    return Agent(agent_id, neutralize(obj["name"].strip()[:80]), neutralize(obj["system_prompt"].strip()[:4000]),
                 [t.name for t in tools],
                 focus=", ".join(cats), provenance={**(model_tag or {}),
                                                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


async def generate_tasks_for(llm: ChatBackend, agent: Agent, library: ToolLibrary, n_tasks: int, *, usage: Usage,
                             model_tag: dict | None = None) -> tuple[list[SynthTask], list[str]]:
    """(tasks sorted easy -> hard, problems): a task naming a tool the agent lacks is refused."""
    tools = [library[n] for n in agent.tools]
    own = set(agent.tools)

    import jsonschema

    from .llm import relax

    item_schema = relax(TASKS_SCHEMA["properties"]["tasks"]["items"])
    # Asked of the endpoint: expected_tools limited to the agent's own tool names.
    request = json.loads(json.dumps(TASKS_SCHEMA))
    request["properties"]["tasks"]["items"]["properties"]["rubric"]["properties"]["expected_tools"]["items"] = {
        "type": "string", "enum": sorted(own)}

    def usable(t: Any) -> bool:
        return jsonschema.Draft202012Validator(item_schema).is_valid(t)

    def check(obj: Any) -> None:
        good = [t for t in obj["tasks"] if usable(t)]
        if not good:
            raise ValueError("no task has difficulty, goals and a rubric with success_criteria, expected_tools, "
                             "checkpoints")
        if not any(set(t["rubric"]["expected_tools"]) <= own for t in good):
            raise ValueError(f"every task's expected_tools names tools the agent does not have; use only "
                             f"{sorted(own)}")

    obj = await ask_json(llm, [{"role": "user", "content": _TASKS_PROMPT.format(
        system_prompt=agent.system_prompt, tools=_tool_lines(tools, True), n=n_tasks)}],
        schema=_TASKS_ACCEPT, request_schema=request, role="taskgen", usage=usage, check=check)
    problems, tasks = [], []
    order = {d: i for i, d in enumerate(DIFFICULTIES)}
    raw = []
    for k, t in enumerate(obj["tasks"][:n_tasks]):
        if usable(t):
            raw.append(t)
        else:
            problems.append(f"{agent.id} task {k}: does not follow the task format")
    raw.sort(key=lambda t: order[t["difficulty"]])
    for k, t in enumerate(raw):
        extra = sorted(set(t["rubric"]["expected_tools"]) - own)
        if extra:
            problems.append(f"{agent.id} task {k}: expected_tools {extra} are not the agent's tools")
            continue
        def texts(xs: list[str]) -> list[str]:
            return [neutralize(x.strip()[:500]) for x in xs if x.strip()][:8]
        rubric = {"success_criteria": texts(t["rubric"]["success_criteria"]),
                  "expected_tools": list(dict.fromkeys(t["rubric"]["expected_tools"])),
                  "checkpoints": texts(t["rubric"]["checkpoints"])}
        goals = [neutralize(g.strip()[:1000]) for g in t["goals"] if g.strip()][:6]
        if not goals or not rubric["success_criteria"]:
            problems.append(f"{agent.id} task {k}: empty goals or success criteria")
            continue
        tasks.append(SynthTask(f"{agent.id}-t{len(tasks)}", agent.id, t["difficulty"], goals, rubric,
                               {**(model_tag or {}), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    return tasks, problems


async def build_agents_and_tasks(llm: ChatBackend, library: ToolLibrary, *, n_agents: int, tasks_per_agent: int,
                                 k_min: int = 3, k_max: int = 6, seed: int = 0, concurrency: int = 8,
                                 usage: Usage | None = None, model_tag: dict | None = None,
                                 progress: Any = None, first_id: int = 0) -> tuple[list[Agent], list[SynthTask], dict]:
    """Agents over covering tool subsets, then tasks per agent; failures are reported, not raised."""
    usage = usage if usage is not None else Usage()
    subsets = sample_tool_subsets(library, n_agents, k_min, k_max, seed)
    sem = asyncio.Semaphore(max(1, concurrency))
    problems: list[str] = []
    if progress is not None:
        progress.add_total(len(subsets))

    async def one(k: int, names: list[str]) -> tuple[Agent | None, list[SynthTask]]:
        aid = f"a{first_id + k:05d}"
        rng = random.Random(f"agent|{seed}|{aid}")
        async with sem:
            try:
                agent = await generate_agent(llm, aid, [library[n] for n in names], usage=usage, rng=rng,
                                             model_tag=model_tag)
                tasks, probs = await generate_tasks_for(llm, agent, library, tasks_per_agent, usage=usage,
                                                        model_tag=model_tag)
                problems.extend(probs)
            except (MalformedReply, EndpointError) as e:
                problems.append(f"{aid}: {type(e).__name__}: {e}")
                if progress is not None:
                    progress.step(ok=False)
                return None, []
        if progress is not None:
            progress.step(ok=bool(tasks))
        return (agent, tasks) if tasks else (None, [])

    results = await asyncio.gather(*(one(k, s) for k, s in enumerate(subsets)))
    agents = [a for a, _ in results if a is not None]
    tasks = [t for _, ts in results for t in ts]
    covered = {n for a in agents for n in a.tools}
    stats = {"agents": len(agents), "tasks": len(tasks), "problems": problems[:100], "n_problems": len(problems),
             "tool_coverage": round(len(covered) / max(1, len(library)), 4),
             "by_difficulty": {d: sum(t.difficulty == d for t in tasks) for d in DIFFICULTIES}}
    return agents, tasks, stats


def load_agents(path: Any) -> list[Agent]:
    from .library import read_jsonl

    return [Agent.from_json(o) for _, o in read_jsonl(path)]


def load_tasks(path: Any) -> list[SynthTask]:
    from .library import read_jsonl

    return [SynthTask.from_json(o) for _, o in read_jsonl(path)]
