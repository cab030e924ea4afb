"""Multi-agent trajectory generation with rejection sampling (seed section 3.3), resumable.

One trajectory (`run_trajectory`) for (agent, task, sample j):

    user simulator (persona, the task's goals)      -> user turn
    task agent (the agent's system prompt + tools)  -> assistant turn: tool calls and/or an answer
        tool calls -> ToolRouter: real MCP server (fresh per trajectory) or the LLM tool simulator
                      (world state, injected failures); results appended as tool messages
        answer     -> the user simulator replies, or says the goals are done
    judge (rubric)                                   -> score in [0, 1]; kept when score >= threshold

Ends: "completed" (the user is done, or its turn budget is used up after an answer; judged),
"truncated" (the assistant turn budget ran out mid-work), "malformed_agent" (a reply with tool
calls that do not parse, or an empty one), "malformed_user" / "malformed_tool_sim" /
"malformed_judge" (a role's reply stayed unusable), "mcp_error" (a real server did not start),
"refused" (the endpoint refused a request of this trajectory with a 4xx, e.g. a simulated user's
text holding the model's reserved tokens or a prompt over its context). None of these stops the
run: each is a record with its reason. An endpoint that stays down (a transient EndpointError
after retries) leaves the trajectory unrecorded, so a rerun tries it again.

The run (`run_trajectories`): ids are "<task id>-s<j>"; every finished trajectory is one line of
`trajectories.jsonl` (an AppendLog: one O_APPEND write + fsync, a torn last line cut off on
reopening); a rerun skips ids already there, so a killed run resumes without duplicates. Kept
trajectories are appended to `sft.jsonl` as they finish, and `sft.jsonl` and the report are
rebuilt from the records (atomically) at the start and the end of every run, so they always agree.
Persona choice and failure injection are seeded by (seed, id): a trajectory's randomness does not
depend on concurrency or on resuming.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..jsonl import RowError, normalize_conversation, write_jsonl
from .agents import Agent, SynthTask
from .library import AppendLog, ToolLibrary
from .llm import ChatBackend, EndpointError, MalformedReply, Usage
from .mcp_io import MCPError, MCPToolbox
from .progress import Progress
from .roles import PERSONAS, Judge, ToolRouter, ToolSimulator, UserSimulator

__all__ = ["Roles", "RolloutConfig", "run_trajectory", "run_trajectories", "sft_row", "rebuild_sft",
           "trajectory_ids", "parse_agent_calls"]


@dataclass
class Roles:
    """The backend of each role (one endpoint for all, or one per role)."""

    agent: ChatBackend
    user: ChatBackend
    tool_sim: ChatBackend
    judge: ChatBackend

    @classmethod
    def single(cls, backend: ChatBackend) -> "Roles":
        return cls(backend, backend, backend, backend)


@dataclass
class RolloutConfig:
    threshold: float = 0.7            # keep a judged trajectory when score >= threshold
    failure_rate: float = 0.1         # injected failures of simulated tools
    max_turns: int = 16               # assistant turns per trajectory
    max_user_turns: int = 6           # user turns per trajectory
    samples_per_task: int = 1
    concurrency: int = 8
    seed: int = 0
    agent_temperature: float | None = None
    agent_max_tokens: int | None = None
    call_timeout_s: float = 30.0
    first_call_required: bool = False  # tool_choice="required" on the first assistant turn after each user
                                       # turn (weak models, smoke tests); the endpoint must support it

    def __post_init__(self) -> None:
        if not 0.0 <= self.failure_rate < 1.0:
            raise ValueError(f"failure_rate={self.failure_rate} must be in [0, 1)")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold} must be in [0, 1]")
        for k in ("max_turns", "max_user_turns", "samples_per_task", "concurrency"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1")


def parse_agent_calls(raw: Sequence[Any], first_index: int) -> tuple[list[dict], str]:
    """OpenAI tool calls -> K2-normalized calls (ids functions.NAME:IDX, dict arguments); (calls, problem)."""
    calls = []
    for j, tc in enumerate(raw or []):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
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


def _wire(messages: list[dict]) -> list[dict]:
    """Messages as an OpenAI endpoint expects them (tool-call arguments as JSON strings)."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            m = {**m, "tool_calls": [{**c, "function": {"name": c["function"]["name"],
                                                        "arguments": json.dumps(c["function"]["arguments"],
                                                                                ensure_ascii=False)}}
                                     for c in m["tool_calls"]]}
        out.append(m)
    return out


def trajectory_ids(tasks: Sequence[SynthTask], samples_per_task: int) -> list[tuple[str, SynthTask, int]]:
    return [(f"{t.id}-s{j}", t, j) for t in tasks for j in range(samples_per_task)]


async def run_trajectory(tid: str, task: SynthTask, agent: Agent, library: ToolLibrary, roles: Roles,
                         cfg: RolloutConfig) -> dict:
    """Play one trajectory and judge it; returns its record (see the module doc). Raises only
    EndpointError (the endpoint stayed down) and cancellation."""
    t0 = time.monotonic()
    rng = random.Random(f"traj|{cfg.seed}|{tid}")
    persona = PERSONAS[rng.randrange(len(PERSONAS))]
    usage = Usage()
    tools = {n: library[n] for n in agent.tools if n in library}
    openai_tools = [t.openai() for t in tools.values()]
    sim = ToolSimulator(roles.tool_sim, usage, random.Random(f"fail|{cfg.seed}|{tid}"), cfg.failure_rate,
                        context=agent.system_prompt[:600])
    user = UserSimulator(roles.user, persona, task.goals, usage)
    judge = Judge(roles.judge, usage)
    messages: list[dict] = [{"role": "system", "content": agent.system_prompt}]
    status, reason, verdict = "completed", "", None
    n_calls = n_user = n_asst = 0
    async with MCPToolbox(call_timeout_s=cfg.call_timeout_s) as toolbox:
        router = ToolRouter(tools, sim, toolbox)
        try:
            msg, _ = await user.next(messages)
            messages.append({"role": "user", "content": msg})
            n_user = 1
            while True:
                if n_asst >= cfg.max_turns:
                    status, reason = "truncated", f"assistant turn budget ({cfg.max_turns}) used up"
                    break
                kw: dict[str, Any] = {}
                if cfg.first_call_required and messages[-1]["role"] == "user" and openai_tools:
                    kw["tool_choice"] = "required"
                reply = await roles.agent.chat(_wire(messages), tools=openai_tools, temperature=cfg.agent_temperature,
                                               max_tokens=cfg.agent_max_tokens, **kw)
                usage.add("agent", reply)
                n_asst += 1
                calls, problem = parse_agent_calls(reply.tool_calls, n_calls)
                content = reply.content or ""
                if problem or (not calls and not content.strip()):
                    status, reason = "malformed_agent", problem or "empty assistant turn"
                    break
                am: dict[str, Any] = {"role": "assistant", "content": content}
                if calls:
                    am["tool_calls"] = calls
                messages.append(am)
                n_calls += len(calls)
                for c in calls:
                    out = await router.call(c["function"]["name"], c["function"]["arguments"])
                    messages.append({"role": "tool", "tool_call_id": c["id"], "content": out.content})
                if calls:
                    continue
                if n_user >= cfg.max_user_turns:
                    break
                msg, done = await user.next(messages)
                if done:
                    break
                messages.append({"role": "user", "content": msg})
                n_user += 1
            if status == "completed":
                verdict = await judge.score(task.goals, task.rubric, messages, list(tools))
        except MalformedReply as e:
            role = str(e).split(":", 1)[0]
            status = {"user_sim": "malformed_user", "tool_sim": "malformed_tool_sim",
                      "judge": "malformed_judge"}.get(role, "malformed")
            reason = str(e)[:500]
        except MCPError as e:
            status, reason = "mcp_error", str(e)[:1000]
        except EndpointError as e:
            if e.transient:
                raise
            status, reason = "refused", str(e)[:1000]
        stats = dict(router.stats)
    score = verdict.score if verdict is not None else None
    kept = status == "completed" and score is not None and score >= cfg.threshold
    return {"id": tid, "task_id": task.id, "agent_id": agent.id, "difficulty": task.difficulty,
            "persona": persona.name, "status": status, "reason": reason, "score": score, "kept": kept,
            "judge": verdict.to_json() if verdict is not None else None, "messages": messages, "tools": openai_tools,
            "tool_stats": stats, "turns": {"user": n_user, "assistant": n_asst}, "usage": usage.to_dict(),
            "elapsed_s": round(time.monotonic() - t0, 3)}


def sft_row(rec: dict, chat_format: Any = None, render_text: bool = False) -> dict:
    """A kept record as a chat-JSONL SFT row (normalized: K2 call ids, dict arguments).

    With `chat_format` (the target model's, k2sys.tokenizer.chat_format_for) the row is also
    tokenized with its template; "n_tokens" and "n_train_tokens" are added, and with
    `render_text` the rendered conversation as "text" (for trainers outside k2sys). Raises RowError."""
    msgs = rec["messages"]
    while msgs and msgs[-1]["role"] != "assistant":
        msgs = msgs[:-1]
    row = {"messages": msgs, "tools": rec["tools"], "id": rec["id"], "task_id": rec["task_id"],
           "agent_id": rec["agent_id"], "source": "synth/agentic", "difficulty": rec.get("difficulty"),
           "persona": rec.get("persona"), "judge_score": rec.get("score")}
    messages, tools, _ = normalize_conversation(row)
    if chat_format is not None:
        try:
            ids, mask = chat_format.tokenize(messages, tools)
        except Exception as e:  # noqa: BLE001 - a template refusing a row is a per-row rejection
            raise RowError(f"template: {type(e).__name__}: {str(e)[:200]}") from None
        row["n_tokens"], row["n_train_tokens"] = len(ids), int(sum(mask))
        if render_text:
            row["text"] = chat_format.render(messages, tools)
    return row


def rebuild_sft(records: Sequence[dict], path: Path, threshold: float, chat_format: Any = None,
                render_text: bool = False) -> tuple[int, dict]:
    """Write the SFT file from the records (atomic): kept = completed and score >= threshold.
    Returns (rows written, {id: reason} of kept records refused as rows)."""
    rows, refused, seen = [], {}, set()
    for r in records:
        if r.get("id") in seen:
            continue
        seen.add(r.get("id"))
        if r.get("status") == "completed" and r.get("score") is not None and r["score"] >= threshold:
            try:
                rows.append(sft_row(r, chat_format, render_text))
            except RowError as e:
                refused[r["id"]] = str(e)
    return write_jsonl(path, rows), refused


async def run_trajectories(library: ToolLibrary, agents: Sequence[Agent], tasks: Sequence[SynthTask], roles: Roles,
                           out_dir: str | Path, cfg: RolloutConfig, *, chat_format: Any = None,
                           render_text: bool = False, progress: bool | Progress = True,
                           limit: int | None = None) -> dict:
    """Run every (task, sample) not yet in `out_dir/trajectories.jsonl`; returns this run's summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_agent = {a.id: a for a in agents}
    log = AppendLog(out / "trajectories.jsonl")
    sft_path = out / "sft.jsonl"
    rebuild_sft(log.records, sft_path, cfg.threshold, chat_format, render_text)
    todo = [(tid, t, j) for tid, t, j in trajectory_ids(tasks, cfg.samples_per_task) if tid not in log.ids]
    missing_agents = sorted({t.agent_id for _, t, _ in todo if t.agent_id not in by_agent})
    if missing_agents:
        raise ValueError(f"tasks refer to unknown agents {missing_agents[:5]}; regenerate tasks with their agents")
    if limit is not None:
        todo = todo[:limit]
    prog = progress if isinstance(progress, Progress) else Progress("trajectories", len(todo), enabled=bool(progress))
    summary = {"skipped_done": len(log.ids), "torn_bytes_cut": log.torn, "attempted": len(todo), "written": 0,
               "kept": 0, "endpoint_errors": [], "by_status": {}}
    queue: asyncio.Queue = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)
    sft_fd = open(sft_path, "a", encoding="utf-8")

    async def worker() -> None:
        while True:
            try:
                tid, task, _ = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                rec = await run_trajectory(tid, task, by_agent[task.agent_id], library, roles, cfg)
            except EndpointError as e:
                summary["endpoint_errors"].append(f"{tid}: {str(e)[:300]}")
                prog.step(ok=False, endpoint_errors=1)
                continue
            log.append(rec)
            summary["written"] += 1
            summary["by_status"][rec["status"]] = summary["by_status"].get(rec["status"], 0) + 1
            if rec["kept"]:
                try:
                    row = sft_row(rec, chat_format, render_text)
                except RowError:
                    pass   # counted when the SFT file is rebuilt at the end
                else:
                    sft_fd.write(json.dumps(row, ensure_ascii=False) + "\n")
                    sft_fd.flush()
                    summary["kept"] += 1
            prog.step(ok=rec["kept"], kept=int(rec["kept"]))

    try:
        await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, max(1, len(todo))))))
    finally:
        sft_fd.close()
        log.close()
        prog.close()
    n_rows, refused = rebuild_sft(log.records, sft_path, cfg.threshold, chat_format, render_text)
    summary["sft_rows"] = n_rows
    summary["sft_refused"] = refused
    summary["endpoint_error_count"] = len(summary["endpoint_errors"])
    summary["endpoint_errors"] = summary["endpoint_errors"][:20]
    summary["records"] = log.records
    return summary
