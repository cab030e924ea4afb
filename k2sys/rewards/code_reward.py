"""Code reward (seed 4.1, coding tasks): run the model's program on each test case inside
the bubblewrap sandbox and reward the fraction whose stdout matches.

A code task is a ``Task(family="code", prompt=..., answer=<reference program>,
meta={"tests": [{"stdin": "...", "stdout": "..."}, ...]})``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from k2sys.rewards.sandbox import SandboxConfig, run_python
from k2sys.tasks.base import Task

__all__ = ["CodeVerifier", "extract_code", "CodeResult", "normalize_output"]

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str:
    """The last fenced code block of a response, or the whole response when it has none."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def normalize_output(text: str) -> str:
    """Trailing spaces on each line and trailing blank lines do not count."""
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


@dataclass
class CodeResult:
    passed: int
    total: int
    timed_out: int

    @property
    def pass_rate(self) -> float:
        return self.passed / self.total


class CodeVerifier:
    family = "code"

    def __init__(self, config: SandboxConfig | None = None, stop_on_timeout: bool = True):
        self.config = config or SandboxConfig()
        # A program that times out once will almost surely time out again: stop early so a
        # looping sample costs one time limit, not one per test case.
        self.stop_on_timeout = stop_on_timeout

    def check(self, task: Task, response: str) -> CodeResult:
        tests = task.meta.get("tests")
        if not tests:
            raise ValueError(f"code task {task.prompt[:40]!r} has no meta['tests'] "
                             f"(list of {{'stdin', 'stdout'}})")
        code = extract_code(response)
        passed = timed_out = 0
        for case in tests:
            res = run_python(code, case.get("stdin", ""), self.config)
            if res.timed_out:
                timed_out += 1
                if self.stop_on_timeout:
                    break
            elif res.ok and normalize_output(res.stdout) == normalize_output(case["stdout"]):
                passed += 1
        return CodeResult(passed=passed, total=len(tests), timed_out=timed_out)

    def __call__(self, task: Task, response: str) -> float:
        return self.check(task, response).pass_rate
