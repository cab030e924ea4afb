"""Tool-use SFT data synthesis, a small real version of seed section 3:
tool library (JSON-schema specs) -> agents + rubric tasks -> user agent / task agent (pluggable
policy) / tool simulator episodes -> rubric judge -> chat JSONL. Also task-family SFT rows."""

from .judge import RubricJudge, Verdict, answer_states, args_match
from .pipeline import SynthStats, synthesize_tool_use, task_family_rows, write_synth_sft
from .rollout import ChatCompletionsPolicy, Policy, ScriptedPolicy, Trajectory, UserAgent, run_episode
from .tasks import AgentSpec, ExpectedCall, Goal, Rubric, Step, Task, generate_tasks
from .tools import (LOOKUP_TABLES, TOOL_LIBRARY, UNITS, ToolError, ToolSimulator, ToolSpec, calculate,
                    convert_units, validate_args)

__all__ = [
    "AgentSpec", "ChatCompletionsPolicy", "ExpectedCall", "Goal", "LOOKUP_TABLES", "Policy", "Rubric",
    "RubricJudge", "ScriptedPolicy", "Step", "SynthStats", "TOOL_LIBRARY", "Task", "ToolError", "ToolSimulator",
    "ToolSpec", "Trajectory", "UNITS", "UserAgent", "Verdict", "answer_states", "args_match", "calculate",
    "convert_units", "generate_tasks", "run_episode", "synthesize_tool_use", "task_family_rows", "validate_args",
    "write_synth_sft",
]
