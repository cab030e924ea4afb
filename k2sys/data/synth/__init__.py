"""Tool-use SFT data synthesis (seed section 3).

Two pipelines share this package:

- The built-in template (tools.py, tasks.py, rollout.py, judge.py, pipeline.py): 5 exact tools,
  templated tasks, a scripted user and a rule judge; deterministic and model-free, used by the
  recipes' SFT mix (`synthesize_tool_use`) and the default tool_use RL environment.
- The LLM pipeline (`k2sys synth`, docs/synth.md): a tool library of real MCP tools
  (mcp_io.py, mcp_servers/) and LLM-synthesized tools by category -> domain (toolgen.py),
  validated and deduplicated (library.py, embed.py) with a t-SNE coverage map (coverage.py);
  agents and rubric tasks (agents.py); multi-agent rollouts with an LLM user simulator, real or
  LLM-simulated tools and an LLM judge (roles.py, trajectories.py), resumable, rejection-sampled,
  written as chat JSONL with a report (report.py); every role speaks to an OpenAI-compatible
  endpoint (llm.py). Stages: stages.py; command line: cli.py.
"""

from .agents import Agent, SynthTask, sample_tool_subsets
from .judge import RubricJudge, Verdict, answer_states, args_match
from .pipeline import SynthStats, synthesize_tool_use, task_family_rows, write_synth_sft
from .library import AppendLog, LibraryTool, ToolLibrary, ToolSchemaError, validate_tool
from .llm import ChatReply, EndpointError, MalformedReply, OpenAIChatBackend, ask_json, parse_json_reply, register_backend
from .mcp_io import MCPServerSpec, MCPToolbox, import_mcp_tools
from .rollout import ChatCompletionsPolicy, Policy, ScriptedPolicy, Trajectory, UserAgent, run_episode
from .tasks import AgentSpec, ExpectedCall, Goal, Rubric, Step, Task, generate_tasks
from .tools import (LOOKUP_TABLES, TOOL_LIBRARY, UNITS, ToolError, ToolSimulator, ToolSpec, calculate,
                    convert_units, validate_args)

__all__ = [
    "Agent", "AppendLog", "ChatReply", "EndpointError", "LibraryTool", "MCPServerSpec", "MCPToolbox", "MalformedReply",
    "OpenAIChatBackend", "SynthTask", "ToolLibrary", "ToolSchemaError", "ask_json", "import_mcp_tools",
    "parse_json_reply", "register_backend", "sample_tool_subsets", "validate_tool",
    "AgentSpec", "ChatCompletionsPolicy", "ExpectedCall", "Goal", "LOOKUP_TABLES", "Policy", "Rubric",
    "RubricJudge", "ScriptedPolicy", "Step", "SynthStats", "TOOL_LIBRARY", "Task", "ToolError", "ToolSimulator",
    "ToolSpec", "Trajectory", "UNITS", "UserAgent", "Verdict", "answer_states", "args_match", "calculate",
    "convert_units", "generate_tasks", "run_episode", "synthesize_tool_use", "task_family_rows", "validate_args",
    "write_synth_sft",
]
