"""The synthesis report: what the library, agents, tasks and trajectories of an output directory
hold, rebuilt from the files themselves (so a resumed run reports its totals).

    report.json   machine-readable: tools (by source, category), agents, tasks (by difficulty),
                  trajectories (generated, kept, keep rate, by status, by difficulty), judge score
                  histogram (10 bins over [0, 1]), tool calls (real / simulated / failed / injected),
                  tokens (endpoint usage per role and stage; SFT tokens when a template was given)
    report.md     the same for people, with the histogram drawn in text
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .library import read_jsonl, write_json_atomic
from .llm import Usage

__all__ = ["build_report", "score_histogram", "write_report"]


def score_histogram(scores: Sequence[float], bins: int = 10) -> list[dict]:
    counts = [0] * bins
    for s in scores:
        counts[min(bins - 1, max(0, int(round(s * bins, 9))))] += 1
    return [{"lo": round(i / bins, 2), "hi": round((i + 1) / bins, 2), "count": c} for i, c in enumerate(counts)]


def _load_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def build_report(out_dir: str | Path, *, threshold: float | None = None, records: Sequence[dict] | None = None,
                 run: dict | None = None) -> dict:
    out = Path(out_dir)
    rep: dict[str, Any] = {"dir": str(out)}
    usage = Usage()
    tools_rep = _load_json(out / "tools_report.json")
    if (out / "tools.jsonl").exists():
        tools = [o for _, o in read_jsonl(out / "tools.jsonl")]
        by_source: dict[str, int] = {}
        by_cat: dict[str, int] = {}
        for t in tools:
            by_source[t.get("source", "?")] = by_source.get(t.get("source", "?"), 0) + 1
            by_cat[t.get("category", "?")] = by_cat.get(t.get("category", "?"), 0) + 1
        rep["tools"] = {"total": len(tools), "by_source": by_source, "categories": len(by_cat),
                        "domains": len({(t.get("category"), t.get("domain")) for t in tools}),
                        "by_category": dict(sorted(by_cat.items())),
                        "last_build": {k: tools_rep.get(k) for k in ("candidates", "added", "duplicates", "invalid",
                                                                    "malformed", "mcp_servers") if k in tools_rep}}
        usage.merge(tools_rep.get("usage", {}))
    tasks_rep = _load_json(out / "tasks_report.json")
    if (out / "agents.jsonl").exists():
        agents = [o for _, o in read_jsonl(out / "agents.jsonl")]
        rep["agents"] = {"total": len(agents), "tools_per_agent": round(
            sum(len(a["tools"]) for a in agents) / max(1, len(agents)), 2), "tool_coverage": tasks_rep.get("tool_coverage")}
    if (out / "tasks.jsonl").exists():
        tasks = [o for _, o in read_jsonl(out / "tasks.jsonl")]
        by_d: dict[str, int] = {}
        for t in tasks:
            by_d[t["difficulty"]] = by_d.get(t["difficulty"], 0) + 1
        rep["tasks"] = {"total": len(tasks), "by_difficulty": by_d, "problems": tasks_rep.get("n_problems", 0)}
        usage.merge(tasks_rep.get("usage", {}))
    if records is None and (out / "trajectories.jsonl").exists():
        records = [o for _, o in read_jsonl(out / "trajectories.jsonl")]
    if records is not None:
        if threshold is None:
            threshold = _load_json(out / "report.json").get("trajectories", {}).get("threshold", 0.7)
        judged = [r for r in records if r.get("score") is not None]
        kept = [r for r in records if r.get("status") == "completed" and r.get("score") is not None
                and r["score"] >= threshold]
        by_status: dict[str, int] = {}
        by_diff: dict[str, dict[str, int]] = {}
        calls = {"calls": 0, "real": 0, "simulated": 0, "failed": 0, "injected": 0, "invalid": 0, "unknown": 0}
        for r in records:
            by_status[r.get("status", "?")] = by_status.get(r.get("status", "?"), 0) + 1
            d = by_diff.setdefault(r.get("difficulty") or "?", {"generated": 0, "kept": 0})
            d["generated"] += 1
            for k in calls:
                calls[k] += int((r.get("tool_stats") or {}).get(k, 0))
            usage.merge({f"traj/{k}": v for k, v in (r.get("usage") or {}).items()})
        for r in kept:
            by_diff[r.get("difficulty") or "?"]["kept"] += 1
        scores = [float(r["score"]) for r in judged]
        rep["trajectories"] = {
            "generated": len(records), "judged": len(judged), "kept": len(kept), "threshold": threshold,
            "keep_rate": round(len(kept) / len(records), 4) if records else 0.0,
            "by_status": by_status, "by_difficulty": by_diff, "tool_calls": calls,
            "mean_score": round(sum(scores) / len(scores), 4) if scores else None,
            "score_histogram": score_histogram(scores),
            "mean_turns": round(sum(r.get("turns", {}).get("assistant", 0) for r in records) / len(records), 2)
            if records else 0.0,
        }
        sft_tokens = [r for _, r in read_jsonl(out / "sft.jsonl")] if (out / "sft.jsonl").exists() else []
        if sft_tokens and "n_tokens" in sft_tokens[0]:
            rep["sft_tokens"] = {"rows": len(sft_tokens), "tokens": sum(r.get("n_tokens", 0) for r in sft_tokens),
                                 "train_tokens": sum(r.get("n_train_tokens", 0) for r in sft_tokens)}
    rep["tokens"] = {"by_role": usage.to_dict(), "total": usage.totals()}
    if run is not None:
        rep["last_run"] = {k: v for k, v in run.items() if k != "records"}
    return rep


def _md(rep: dict) -> str:
    lines = ["# Synthesis report", "", f"Directory: `{rep['dir']}`", ""]
    if "tools" in rep:
        t = rep["tools"]
        lines += ["## Tool library", "", f"- tools: {t['total']} ({', '.join(f'{k} {v}' for k, v in t['by_source'].items())})",
                  f"- categories: {t['categories']}, domains: {t['domains']}"]
        if t.get("last_build"):
            lines.append(f"- last build: {json.dumps(t['last_build'])}")
        lines.append("")
    if "agents" in rep:
        a = rep["agents"]
        lines += ["## Agents and tasks", "", f"- agents: {a['total']} (mean {a['tools_per_agent']} tools; "
                  f"library coverage {a.get('tool_coverage')})"]
    if "tasks" in rep:
        lines += [f"- tasks: {rep['tasks']['total']} {rep['tasks']['by_difficulty']}", ""]
    if "trajectories" in rep:
        tr = rep["trajectories"]
        lines += ["## Trajectories", "", f"- generated {tr['generated']}, judged {tr['judged']}, kept {tr['kept']} "
                  f"(score >= {tr['threshold']}; keep rate {tr['keep_rate']:.1%}), mean score {tr['mean_score']}",
                  f"- by status: {tr['by_status']}", f"- by difficulty: {tr['by_difficulty']}",
                  f"- tool calls: {tr['tool_calls']}", "", "Judge score histogram:", "", "```"]
        peak = max([b["count"] for b in tr["score_histogram"]] + [1])
        for b in tr["score_histogram"]:
            lines.append(f"{b['lo']:.1f}-{b['hi']:.1f} | {'#' * round(40 * b['count'] / peak):40s} {b['count']}")
        lines += ["```", ""]
    if "sft_tokens" in rep:
        lines += [f"SFT rows {rep['sft_tokens']['rows']}: {rep['sft_tokens']['tokens']} tokens "
                  f"({rep['sft_tokens']['train_tokens']} trained)", ""]
    tot = rep["tokens"]["total"]
    lines += ["## Endpoint tokens", "", f"- total: {tot['calls']} calls, {tot['prompt_tokens']} prompt + "
              f"{tot['completion_tokens']} completion tokens, {tot['errors']} unusable replies", "",
              "| role | calls | prompt | completion | unusable |", "|---|---|---|---|---|"]
    for role, d in rep["tokens"]["by_role"].items():
        lines.append(f"| {role} | {d.get('calls', 0)} | {d.get('prompt_tokens', 0)} | {d.get('completion_tokens', 0)} "
                     f"| {d.get('errors', 0)} |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, **kw: Any) -> dict:
    rep = build_report(out_dir, **kw)
    out = Path(out_dir)
    write_json_atomic(out / "report.json", rep)
    write_json_atomic(out / "report.md", None, text=_md(rep))
    return rep
