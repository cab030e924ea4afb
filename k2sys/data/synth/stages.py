"""The three stages of agentic data synthesis over one library directory (seed section 3):

    build_tools         tools.jsonl (+ tools_coverage.png/.json, tools_report.json):
                        MCP servers' tools (real) + LLM tools by category -> domain -> tools,
                        validated and deduplicated against what the library already holds
    build_tasks         agents.jsonl + tasks.jsonl (+ tasks_report.json): covering tool subsets ->
                        LLM agents -> LLM rubric tasks, easy to hard; new agents are appended
                        (ids continue), so earlier trajectories keep pointing at their tasks
    build_trajectories  trajectories.jsonl (every finished trajectory, resumable) + sft.jsonl (kept
                        ones, chat format) + report.json / report.md

Each stage reads what the earlier ones wrote, so they can run as separate commands (`k2sys synth
tools|tasks|trajectories`), on different machines or endpoints.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from .agents import build_agents_and_tasks, load_agents, load_tasks
from .library import DEFAULT_DEDUP_THRESHOLD, ToolLibrary, write_json_atomic
from .llm import ChatBackend, Usage
from .mcp_io import MCPError, MCPServerSpec, import_mcp_tools
from .progress import Progress
from .report import write_report
from .toolgen import DEFAULT_CATEGORIES, synthesize_tools
from .trajectories import Roles, RolloutConfig, run_trajectories

__all__ = ["build_tools", "build_tasks", "build_trajectories", "library_paths"]


def library_paths(out_dir: str | Path) -> dict[str, Path]:
    d = Path(out_dir)
    return {"tools": d / "tools.jsonl", "coverage": d / "tools_coverage.png", "agents": d / "agents.jsonl",
            "tasks": d / "tasks.jsonl", "trajectories": d / "trajectories.jsonl", "sft": d / "sft.jsonl",
            "report": d / "report.json"}


async def build_tools(out_dir: str | Path, *, llm: ChatBackend | None = None, mcp_servers: Sequence[MCPServerSpec] = (),
                      categories: Sequence[str] = DEFAULT_CATEGORIES, n_domains: int = 3, n_tools: int = 5,
                      threshold: float = DEFAULT_DEDUP_THRESHOLD, concurrency: int = 8, plot: bool = True,
                      model_tag: dict | None = None, progress: bool = True, seed: int = 0) -> dict:
    paths = library_paths(out_dir)
    lib = ToolLibrary.load(paths["tools"], missing_ok=True)
    usage = Usage()
    rep: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "before": len(lib),
                           "mcp_servers": {}, "candidates": 0}
    candidates = []
    for spec in mcp_servers:
        try:
            got = await import_mcp_tools(spec)
        except MCPError as e:
            rep["mcp_servers"][spec.name] = {"error": str(e)[:1000]}
            continue
        rep["mcp_servers"][spec.name] = {"tools": len(got), "command": spec.command}
        candidates += got
    gen_rep = None
    if llm is not None and n_domains > 0 and n_tools > 0 and categories:
        prog = Progress("tools", 0, enabled=progress)
        existing_domains: dict[str, list[str]] = {}
        for t in lib.tools:
            if t.source == "synthetic" and t.domain not in existing_domains.setdefault(t.category, []):
                existing_domains[t.category].append(t.domain)
        synth, gen_rep = await synthesize_tools(llm, categories, n_domains=n_domains, n_tools=n_tools,
                                                concurrency=concurrency, usage=usage, model_tag=model_tag,
                                                existing_domains=existing_domains, progress=prog)
        prog.close()
        candidates += synth
    rep["candidates"] = len(candidates)
    add = lib.add(candidates, threshold=threshold)
    lib.save(paths["tools"])
    rep.update({"added": len(add.added), "renamed": add.renamed[:50], "duplicates": len(add.duplicates),
                "duplicate_pairs": add.duplicates[:50], "invalid": len(add.invalid), "invalid_reasons": add.invalid[:50],
                "dedup_threshold": threshold, "library": lib.counts(), "usage": usage.to_dict()})
    if gen_rep is not None:
        rep.update({"domains": gen_rep.domains, "malformed": gen_rep.malformed[:50],
                    "endpoint_errors": gen_rep.endpoint_errors[:20]})
        rep["invalid_reasons"] = (gen_rep.invalid + add.invalid)[:50]
        rep["invalid"] = len(gen_rep.invalid) + len(add.invalid)
    if plot and len(lib):
        from .coverage import coverage_map   # sklearn + matplotlib: imported only when drawing

        rep["coverage"] = coverage_map(lib.tools, paths["coverage"], seed=seed)
    write_json_atomic(Path(out_dir) / "tools_report.json", rep)
    return rep


async def build_tasks(out_dir: str | Path, llm: ChatBackend, *, n_agents: int, tasks_per_agent: int, k_min: int = 3,
                      k_max: int = 6, seed: int = 0, concurrency: int = 8, fresh: bool = False,
                      model_tag: dict | None = None, progress: bool = True) -> dict:
    paths = library_paths(out_dir)
    lib = ToolLibrary.load(paths["tools"])
    if not len(lib):
        raise ValueError(f"{paths['tools']}: the library is empty; run `k2sys synth tools` first")
    old_agents = [] if fresh or not paths["agents"].exists() else load_agents(paths["agents"])
    old_tasks = [] if fresh or not paths["tasks"].exists() else load_tasks(paths["tasks"])
    usage = Usage()
    prog = Progress("agents", 0, enabled=progress)
    # New subsets are seeded by (seed, how many agents exist), so appending draws fresh ones.
    agents, tasks, stats = await build_agents_and_tasks(
        llm, lib, n_agents=n_agents, tasks_per_agent=tasks_per_agent, k_min=k_min, k_max=k_max,
        seed=seed * 1_000_003 + len(old_agents), concurrency=concurrency, usage=usage, model_tag=model_tag,
        progress=prog, first_id=len(old_agents))
    prog.close()
    from ..jsonl import write_jsonl

    write_jsonl(paths["agents"], [a.to_json() for a in old_agents + agents])
    write_jsonl(paths["tasks"], [t.to_json() for t in old_tasks + tasks])
    all_agents = old_agents + agents
    covered = {n for a in all_agents for n in a.tools}
    rep = {**stats, "new_agents": len(agents), "new_tasks": len(tasks), "total_agents": len(all_agents),
           "total_tasks": len(old_tasks) + len(tasks), "tool_coverage": round(len(covered) / len(lib), 4),
           "usage": usage.to_dict()}
    write_json_atomic(Path(out_dir) / "tasks_report.json", rep)
    return rep


async def build_trajectories(out_dir: str | Path, roles: Roles, cfg: RolloutConfig, *, tokenizer: Any = None,
                             render_text: bool = False, limit: int | None = None, progress: bool = True) -> dict:
    """Run the trajectories not yet done; write sft.jsonl and the report. `tokenizer`: a tokenizer
    directory (or ChatFormat) of the target model; SFT rows are then checked against its template
    (and, with `render_text`, carry the rendered conversation)."""
    paths = library_paths(out_dir)
    lib = ToolLibrary.load(paths["tools"])
    for key in ("agents", "tasks"):
        if not paths[key].exists():
            raise FileNotFoundError(f"{paths[key]}: no {key} yet; run `k2sys synth tasks` first")
    agents, tasks = load_agents(paths["agents"]), load_tasks(paths["tasks"])
    fmt = None
    if render_text and tokenizer is None:
        raise ValueError("render_text needs the target model's tokenizer (--tokenizer DIR)")
    if tokenizer is not None:
        from k2sys.tokenizer import chat_format_for

        fmt = chat_format_for(tokenizer)
    run = await run_trajectories(lib, agents, tasks, roles, out_dir, cfg, chat_format=fmt, render_text=render_text,
                                 progress=progress, limit=limit)
    rep = write_report(out_dir, threshold=cfg.threshold, records=run["records"], run=run)
    return {"run": {k: v for k, v in run.items() if k != "records"}, "report": rep}
