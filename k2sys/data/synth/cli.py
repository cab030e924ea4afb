"""`k2sys synth` (python -m k2sys.data.synth.cli): agentic tool-use data synthesis against any
OpenAI-compatible endpoint (`k2sys serve`, SGLang, vLLM, a hosted API).

    k2sys synth tools --out runs/synth --reference-servers --mcp "weather=python my_server.py" \\
        --endpoint http://127.0.0.1:30000 --categories "financial trading,robot control" \\
        --domains-per-category 3 --tools-per-domain 5
    k2sys synth tasks --out runs/synth --endpoint URL --agents 50 --tasks-per-agent 4
    k2sys synth trajectories --out runs/synth --endpoint URL --threshold 0.7 --concurrency 32 \\
        [--role judge=https://api.example.com/v1 --role-model judge=big-judge] [--tokenizer CKPT_DIR]
    k2sys synth report --out runs/synth

Every model role (toolgen, agentgen/taskgen, agent, user, tool_sim, judge) uses --endpoint unless
--role ROLE=URL names another one. `trajectories` resumes: rerunning it skips finished ids.
Outputs and formats: docs/synth.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

__all__ = ["main", "build_parser"]

ROLES = ("toolgen", "agentgen", "agent", "user", "tool_sim", "judge")


class SynthCLIError(ValueError):
    """A bad flag value; the message names the flag."""


def _common(p: argparse.ArgumentParser, endpoint_required: bool) -> None:
    p.add_argument("--out", default="runs/synth", help="library directory (default runs/synth)")
    p.add_argument("--endpoint", required=endpoint_required, default=None,
                   help="OpenAI-compatible server, e.g. http://127.0.0.1:30000 (`k2sys serve`) or https://host/v1")
    p.add_argument("--model", default=None, help="model id at the endpoint (default: the first of /v1/models)")
    p.add_argument("--api-key-env", default=None,
                   help="environment variable holding the endpoint's API key (default: none sent)")
    p.add_argument("--role", action="append", default=[], metavar="ROLE=URL",
                   help=f"another endpoint for one role ({', '.join(ROLES)}); repeatable")
    p.add_argument("--role-model", action="append", default=[], metavar="ROLE=MODEL", help="model id for a role")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=1024, help="per reply")
    p.add_argument("--json-mode", default="schema", choices=["schema", "object", "none"],
                   help="how JSON replies are requested: response_format json_schema (default), json_object, or "
                        "by the prompt only")
    p.add_argument("--retries", type=int, default=5, help="retries of a failed request (backoff doubles from 1 s)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--concurrency", type=int, default=8, help="requests / trajectories in flight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress line")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="k2sys synth", description="Agentic tool-use data synthesis: tool library -> "
                                "agents and rubric tasks -> judged multi-agent trajectories -> SFT JSONL.")
    sub = p.add_subparsers(dest="stage", required=True)
    t = sub.add_parser("tools", help="import MCP tools and synthesize tools by category -> domain -> tools")
    _common(t, endpoint_required=False)
    t.add_argument("--mcp", action="append", default=[], metavar="[NAME=]COMMAND",
                   help="an MCP server (stdio) whose tools to import, e.g. 'fs=npx -y @modelcontextprotocol/"
                        "server-filesystem /tmp'; repeatable")
    t.add_argument("--reference-servers", action="store_true",
                   help="import the shipped servers: calculator, notes, files, calendar")
    t.add_argument("--categories", default=None, help="comma-separated categories (default: the built-in list)")
    t.add_argument("--n-categories", type=int, default=None, help="only the first N categories")
    t.add_argument("--domains-per-category", type=int, default=3)
    t.add_argument("--tools-per-domain", type=int, default=5)
    t.add_argument("--dedup-threshold", type=float, default=None, help="cosine similarity at which a tool is a "
                   "near-duplicate (default 0.85)")
    t.add_argument("--no-plot", action="store_true", help="skip the t-SNE coverage map")
    k = sub.add_parser("tasks", help="agents over covering tool subsets, then rubric tasks per agent")
    _common(k, endpoint_required=True)
    k.add_argument("--agents", type=int, default=20)
    k.add_argument("--tasks-per-agent", type=int, default=3)
    k.add_argument("--tools-per-agent", default="3-6", help="MIN-MAX tools per agent (default 3-6)")
    k.add_argument("--fresh", action="store_true", help="replace agents/tasks instead of appending")
    r = sub.add_parser("trajectories", help="multi-agent rollouts, judged, kept above the threshold (resumable)")
    _common(r, endpoint_required=True)
    r.add_argument("--threshold", type=float, default=0.7, help="keep trajectories with judge score >= this (0-1)")
    r.add_argument("--failure-rate", type=float, default=0.1, help="injected failures of simulated tools")
    r.add_argument("--max-turns", type=int, default=16, help="assistant turns per trajectory")
    r.add_argument("--max-user-turns", type=int, default=6)
    r.add_argument("--samples-per-task", type=int, default=1)
    r.add_argument("--limit", type=int, default=None, help="at most N new trajectories this run")
    r.add_argument("--agent-temperature", type=float, default=None,
                   help="task agent temperature (default --temperature)")
    r.add_argument("--first-call-required", action="store_true",
                   help="force a tool call at the start of each user request (tool_choice=required): for weak "
                        "models and smoke tests; the endpoint must support it")
    r.add_argument("--tokenizer", default=None, help="target model's checkpoint/tokenizer dir: check every SFT row "
                   "against its chat template and count tokens")
    r.add_argument("--render-text", action="store_true",
                   help="also store each SFT row rendered with that template as \"text\" (needs --tokenizer)")
    rp = sub.add_parser("report", help="rebuild report.json / report.md from the directory")
    rp.add_argument("--out", default="runs/synth")
    rp.add_argument("--threshold", type=float, default=None)
    return p


def _kv(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for it in items:
        if "=" not in it:
            raise SynthCLIError(f"{flag} {it!r}: expected ROLE=VALUE")
        k, v = it.split("=", 1)
        if k not in ROLES:
            raise SynthCLIError(f"{flag} {it!r}: role must be one of {', '.join(ROLES)}")
        out[k] = v
    return out


class _Backends:
    def __init__(self, args: argparse.Namespace):
        from .llm import backend_for

        self.args = args
        key = None
        if args.api_key_env:
            key = os.environ.get(args.api_key_env)
            if not key:
                raise SynthCLIError(f"--api-key-env {args.api_key_env}: the variable is not set")
        urls, models = _kv(args.role, "--role"), _kv(args.role_model, "--role-model")
        self.cache: dict[tuple, Any] = {}
        self.tags: dict[str, dict] = {}
        self.by_role: dict[str, Any] = {}
        for role in ROLES:
            url = urls.get(role, args.endpoint)
            if url is None:
                continue
            model = models.get(role, args.model)
            ck = (url, model)
            if ck not in self.cache:
                try:
                    self.cache[ck] = backend_for(url, model, api_key=key, temperature=args.temperature,
                                                 max_tokens=args.max_tokens, timeout_s=args.timeout,
                                                 max_retries=args.retries, json_mode=args.json_mode, seed=args.seed)
                except ValueError as e:
                    raise SynthCLIError(f"--{'role ' + role if role in urls else 'endpoint'}: {e}") from None
            self.by_role[role] = self.cache[ck]
            self.tags[role] = {"endpoint": url, "model": model}

    def get(self, role: str) -> Any:
        if role not in self.by_role:
            raise SynthCLIError(f"no endpoint for role {role}: give --endpoint or --role {role}=URL")
        return self.by_role[role]

    def tag(self, role: str) -> dict:
        b = self.by_role.get(role)
        return {"endpoint": self.tags[role]["endpoint"], "model": getattr(b, "model", None) or self.tags[role]["model"]}

    async def aclose(self) -> None:
        for b in self.cache.values():
            if hasattr(b, "aclose"):
                await b.aclose()


async def _run(args: argparse.Namespace) -> dict:
    from . import stages

    if args.stage == "report":
        from .report import write_report

        return write_report(args.out, threshold=args.threshold)
    be = _Backends(args)
    try:
        if args.stage == "tools":
            from .mcp_io import MCPServerSpec, reference_spec
            from .mcp_servers import REFERENCE_SERVERS
            from .toolgen import DEFAULT_CATEGORIES

            specs = [reference_spec(n) for n in REFERENCE_SERVERS] if args.reference_servers else []
            try:
                specs += [MCPServerSpec.parse(s) for s in args.mcp]
            except ValueError as e:
                raise SynthCLIError(f"--mcp: {e}") from None
            cats = ([c.strip() for c in args.categories.split(",") if c.strip()] if args.categories
                    else list(DEFAULT_CATEGORIES))
            if args.n_categories is not None:
                cats = cats[:args.n_categories]
            llm = be.by_role.get("toolgen")
            if llm is None and not specs:
                raise SynthCLIError("tools: nothing to do; give --endpoint (synthetic tools) and/or --mcp / "
                                    "--reference-servers (real tools)")
            kw = {} if args.dedup_threshold is None else {"threshold": args.dedup_threshold}
            await _probe(llm)
            return await stages.build_tools(args.out, llm=llm, mcp_servers=specs, categories=cats,
                                            n_domains=args.domains_per_category, n_tools=args.tools_per_domain,
                                            concurrency=args.concurrency, plot=not args.no_plot,
                                            model_tag=be.tag("toolgen") if llm is not None else None,
                                            progress=not args.quiet, seed=args.seed, **kw)
        need = {"tasks": ("tools",), "trajectories": ("tools", "agents", "tasks")}.get(args.stage, ())
        missing = [k for k in need if not stages.library_paths(args.out)[k].exists()]
        if missing:   # before asking the endpoint anything
            raise FileNotFoundError(f"{args.out}: no {', '.join(m + '.jsonl' for m in missing)}; run `k2sys synth "
                                    f"{'tools' if 'tools' in missing else 'tasks'}` first")
        if args.stage == "tasks":
            try:
                lo, hi = (int(x) for x in args.tools_per_agent.split("-", 1)) if "-" in args.tools_per_agent else \
                    (int(args.tools_per_agent),) * 2
            except ValueError:
                raise SynthCLIError(f"--tools-per-agent {args.tools_per_agent!r}: expected MIN-MAX, e.g. 3-6") from None
            await _probe(be.get("agentgen"))
            return await stages.build_tasks(args.out, be.get("agentgen"), n_agents=args.agents,
                                            tasks_per_agent=args.tasks_per_agent, k_min=lo, k_max=hi, seed=args.seed,
                                            concurrency=args.concurrency, fresh=args.fresh,
                                            model_tag=be.tag("agentgen"), progress=not args.quiet)
        from .trajectories import Roles, RolloutConfig

        try:
            cfg = RolloutConfig(threshold=args.threshold, failure_rate=args.failure_rate, max_turns=args.max_turns,
                                max_user_turns=args.max_user_turns, samples_per_task=args.samples_per_task,
                                concurrency=args.concurrency, seed=args.seed,
                                agent_temperature=args.agent_temperature,
                                first_call_required=args.first_call_required)
        except ValueError as e:
            raise SynthCLIError(f"trajectories: {e}") from None
        roles = Roles(be.get("agent"), be.get("user"), be.get("tool_sim"), be.get("judge"))
        await _probe(roles.agent)
        if args.render_text and not args.tokenizer:
            raise SynthCLIError("--render-text needs --tokenizer DIR (the target model's template)")
        return await stages.build_trajectories(args.out, roles, cfg, tokenizer=args.tokenizer,
                                               render_text=args.render_text, limit=args.limit,
                                               progress=not args.quiet)
    finally:
        await be.aclose()


async def _probe(backend: Any) -> None:
    """Resolve the model id once up front, so a wrong URL fails in seconds with one clear message."""
    if backend is not None and hasattr(backend, "resolve_model"):
        await backend.resolve_model()


def _brief(stage: str, out: dict) -> dict:
    if stage == "tools":
        return {k: out.get(k) for k in ("before", "candidates", "added", "duplicates", "invalid", "library",
                                         "mcp_servers", "coverage")}
    if stage == "tasks":
        return {k: out.get(k) for k in ("new_agents", "new_tasks", "total_agents", "total_tasks", "tool_coverage",
                                         "by_difficulty", "n_problems")}
    if stage == "trajectories":
        run, rep = out["run"], out["report"]
        return {"this_run": {k: run.get(k) for k in ("skipped_done", "attempted", "written", "kept",
                                                     "endpoint_error_count", "by_status", "sft_rows")},
                "totals": rep.get("trajectories"), "tokens": rep.get("tokens", {}).get("total")}
    return {k: out.get(k) for k in ("tools", "agents", "tasks", "trajectories", "tokens")}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .llm import EndpointError
    from .mcp_io import MCPError

    try:
        out = asyncio.run(_run(args))
    except (SynthCLIError, EndpointError, MCPError, FileNotFoundError) as e:
        print(f"k2sys synth {args.stage}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, SynthCLIError) else 1
    except KeyboardInterrupt:
        print(f"k2sys synth {args.stage}: interrupted; finished records are saved, rerun to resume", file=sys.stderr)
        return 130
    print(json.dumps(_brief(args.stage, out), ensure_ascii=False, indent=1, default=str))
    where = "report.md" if args.stage in ("trajectories", "report") else f"{args.stage}_report.json"
    print(f"library: {args.out} (report: {os.path.join(args.out, where)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
