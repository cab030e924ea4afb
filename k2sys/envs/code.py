"""CodeEnv (kind "code"): write a stdin->stdout Python program, with execution feedback.

    reset  -> [system: answer with one ```python``` block; user: the problem + 2 example tests]
    step   -> the program (last fenced block of the turn) runs in the bubblewrap sandbox
              (k2sys.rewards.sandbox: never on the host) on the example tests;
              all pass     -> episode ends, reward = pass rate on every test (examples + hidden)
              some fail    -> the user turn reports the first failure (input, expected, got or
                              the error's last line); the agent revises
              out of turns -> truncated, reward = the last program's pass rate on every test
    spec   {"kind": "code", "seed": S, "index": K, "max_turns": 3}: problem K of code_tasks(seed=S)

Problems are generated from templates with a reference function (trusted, ours) that computes
expected outputs; the tests check the model's program only through the sandbox.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any, Callable

from k2sys.envs.base import Env, EnvError, StepResult, register_env
from k2sys.rewards.code_reward import extract_code, normalize_output
from k2sys.rewards.sandbox import SandboxConfig, run_python

__all__ = ["CodeTask", "CodeEnv", "code_tasks", "code_specs", "code_sft_rows"]

SYSTEM = ("You write Python 3 programs that read standard input and print to standard output. "
          "Answer with exactly one ```python code block.")


@dataclass(frozen=True)
class CodeTask:
    id: str
    statement: str
    reference: str            # a correct program (used by tests and as an SFT answer)
    tests: tuple[tuple[str, str], ...]
    n_public: int = 2


def _ints(rng: random.Random, n: int, lo: int = -50, hi: int = 99) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n)]


def _line(xs: list[int]) -> str:
    return " ".join(map(str, xs)) + "\n"


def _words(rng: random.Random) -> str:
    vocab = ["apple", "river", "stone", "cloud", "tiger", "lemon", "orbit", "pixel", "quiet", "amber", "echo"]
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(2, 6))) + "\n"


# (statement template, reference program, fn(input) -> output, input maker). {k} is a per-task constant.
_TEMPLATES: list[tuple[str, str, Callable[[str, int], str], Callable[[random.Random], str]]] = [
    ("Read a line of integers and print their sum multiplied by {k}.",
     "print(sum(map(int, input().split())) * {k})",
     lambda s, k: f"{sum(map(int, s.split())) * k}\n", lambda r: _line(_ints(r, r.randint(1, 6)))),
    ("Read a line of integers and print the largest one plus {k}.",
     "print(max(map(int, input().split())) + {k})",
     lambda s, k: f"{max(map(int, s.split())) + k}\n", lambda r: _line(_ints(r, r.randint(1, 6)))),
    ("Read a line of integers and print them sorted in increasing order, separated by spaces.",
     "print(*sorted(map(int, input().split())))",
     lambda s, k: _line(sorted(map(int, s.split()))), lambda r: _line(_ints(r, r.randint(1, 7)))),
    ("Read a line of words and print the words in reverse order, separated by spaces.",
     "print(*input().split()[::-1])",
     lambda s, k: " ".join(s.split()[::-1]) + "\n", _words),
    ("Read a line of text and print how many vowels (a, e, i, o, u) it contains.",
     "print(sum(c in 'aeiou' for c in input()))",
     lambda s, k: f"{sum(c in 'aeiou' for c in s.rstrip(chr(10)))}\n", _words),
    ("Read an integer n and print the numbers 1 to n, one per line, but print Fizz for multiples of {k}.",
     "n = int(input())\nfor i in range(1, n + 1):\n    print('Fizz' if i % {k} == 0 else i)",
     lambda s, k: "".join(("Fizz" if i % k == 0 else str(i)) + "\n" for i in range(1, int(s) + 1)),
     lambda r: f"{r.randint(1, 12)}\n"),
    ("Read a line of integers and print how many of them are greater than {k}.",
     "print(sum(x > {k} for x in map(int, input().split())))",
     lambda s, k: f"{sum(x > k for x in map(int, s.split()))}\n", lambda r: _line(_ints(r, r.randint(1, 8)))),
    ("Read a word and print YES if it reads the same backwards, otherwise NO.",
     "w = input().strip()\nprint('YES' if w == w[::-1] else 'NO')",
     lambda s, k: ("YES" if s.strip() == s.strip()[::-1] else "NO") + "\n",
     lambda r: r.choice(["level", "rotor", "stone", "abba", "apple", "noon", "x", "ab"]) + "\n"),
]


def _make(rng: random.Random, seed: int, index: int) -> CodeTask:
    statement, ref, fn, make_input = _TEMPLATES[rng.randrange(len(_TEMPLATES))]
    k = rng.randint(2, 5)
    inputs: list[str] = []
    while len(inputs) < 5:
        x = make_input(rng)
        if x not in inputs:
            inputs.append(x)
    tests = tuple((x, fn(x, k)) for x in inputs)
    return CodeTask(f"code-{seed}-{index}", statement.format(k=k), ref.format(k=k), tests)


@functools.lru_cache(maxsize=32)
def _tasks(seed: int, n: int) -> tuple[CodeTask, ...]:
    rng = random.Random(f"code-tasks|{seed}")
    return tuple(_make(rng, seed, i) for i in range(n))


def code_tasks(n: int, seed: int) -> list[CodeTask]:
    """`n` problems, deterministic in seed (a prefix of one stream: code_tasks(5) starts code_tasks(9))."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    return list(_tasks(seed, 1 << max(6, n.bit_length()))[:n])


def code_specs(n: int, seed: int, **options: Any) -> list[dict]:
    return [{"kind": "code", "seed": seed, "index": k, **options} for k in range(n)]


def opening_messages(task: CodeTask) -> list[dict]:
    """The episode's first turns (system + the problem with its example tests)."""
    examples = "\n".join(f"Example {i + 1}: input\n{_show(x)}\noutput\n{_show(y)}"
                         for i, (x, y) in enumerate(task.tests[: task.n_public]))
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{task.statement}\n{examples}"}]


def code_sft_rows(tasks: list[CodeTask]) -> list[dict]:
    """Chat rows: the episode's opening turns, then the reference program as the answer."""
    return [{"messages": opening_messages(t) + [{"role": "assistant",
                                                 "content": f"```python\n{t.reference}\n```"}]} for t in tasks]


def _show(text: str, limit: int = 200) -> str:
    text = text.rstrip("\n")
    return text if len(text) <= limit else text[:limit] + " ..."


class CodeEnv(Env):
    def __init__(self, task: CodeTask, *, max_turns: int = 3, sandbox: SandboxConfig | None = None):
        if max_turns < 1:
            raise EnvError(f"code spec: max_turns must be >= 1, got {max_turns}")
        self.task, self.max_turns, self.sandbox = task, max_turns, sandbox or SandboxConfig()
        self.done = True

    def reset(self, *, seed: int | None = None) -> tuple[list[dict], dict]:
        self.turns, self.done = 0, False
        return opening_messages(self.task), {"tools": None, "task_id": self.task.id}

    def _run(self, code: str, tests) -> tuple[int, str | None]:
        """(tests passed, first failure as feedback text or None)."""
        passed, first = 0, None
        for x, want in tests:
            res = run_python(code, x, self.sandbox)
            got = normalize_output(res.stdout)
            if res.ok and got == normalize_output(want):
                passed += 1
                continue
            if first is None:
                if res.timed_out:
                    why = "the program ran out of time"
                elif res.returncode != 0:
                    err = res.stderr.strip().splitlines()
                    why = f"the program failed: {_show(err[-1] if err else f'exit status {res.returncode}')}"
                else:
                    why = f"expected\n{_show(want)}\ngot\n{_show(res.stdout) or '(nothing)'}"
                first = f"On input\n{_show(x)}\n{why}"
            if res.timed_out:
                break  # a looping program would time out on every test
        return passed, first

    def step(self, action: dict) -> StepResult:
        if self.done:
            raise EnvError("CodeEnv.step: call reset() first (the episode is over or not started)")
        self.turns += 1
        content = action.get("content") or ""
        if action.get("malformed") or action.get("tool_calls") or "```" not in content:
            feedback = "Answer with one ```python code block containing the whole program."
            return self._next(feedback, 0.0)
        code = extract_code(content)
        public = self.task.tests[: self.task.n_public]
        passed, failure = self._run(code, public)
        if failure is None:
            total, _ = self._run(code, self.task.tests[self.task.n_public:])
            self.done = True
            rate = (passed + total) / len(self.task.tests)
            return [], rate, True, False, {"pass_rate": rate, "turns": self.turns}
        def rate() -> float:  # only the last turn's program is scored on the hidden tests
            return (passed + self._run(code, self.task.tests[self.task.n_public:])[0]) / len(self.task.tests)
        return self._next(failure + "\nFix the program.", rate)

    def _next(self, feedback: str, rate: Callable[[], float] | float) -> StepResult:
        if self.turns >= self.max_turns:
            self.done = True
            r = rate() if callable(rate) else rate
            return [], r, False, True, {"pass_rate": r, "turns": self.turns}
        return [{"role": "user", "content": feedback}], 0.0, False, False, {}


@register_env("code")
def _make_code(spec: dict) -> CodeEnv:
    for key in ("seed", "index"):
        if not isinstance(spec.get(key), int) or spec[key] < 0:
            raise EnvError(f"code spec: {key!r} must be an int >= 0, got {spec.get(key)!r}")
    unknown = set(spec) - {"kind", "seed", "index", "max_turns", "time_limit_s"}
    if unknown:
        raise EnvError(f"code spec: unknown keys {sorted(unknown)}")
    task = code_tasks(spec["index"] + 1, spec["seed"])[spec["index"]]
    sandbox = SandboxConfig(time_limit_s=float(spec.get("time_limit_s", 2.0)))
    return CodeEnv(task, max_turns=int(spec.get("max_turns", 3)), sandbox=sandbox)
