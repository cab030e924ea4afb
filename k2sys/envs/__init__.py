"""Gym-like environments and the token-level multi-turn agent loop (see base.py, agent_loop.py).

Environment kinds: "tool_use" (synthesized multi-turn tool-use tasks, rubric-judged), "code"
(write a program; it runs in the bubblewrap sandbox and failures come back as feedback turns)
and "task" (one k2sys.tasks family task as a one-turn episode).
"""

from k2sys.envs.base import Env, EnvError, StepResult, env_kinds, make_env, register_env, replay
from k2sys.envs.code import CodeEnv, code_specs, code_tasks
from k2sys.envs.tool_use import TaskEnv, ToolUseEnv, synth_task, tool_use_specs

__all__ = ["CodeEnv", "Env", "EnvError", "StepResult", "TaskEnv", "ToolUseEnv", "code_specs", "code_tasks",
           "env_kinds", "make_env", "register_env", "replay", "synth_task", "tool_use_specs"]
