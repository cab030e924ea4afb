"""Instruction-following reward (seed 4.1): programmatic checks where the condition is
checkable by code, an LLM judge for the rest, and a hack-check that catches responses which
*claim* to satisfy the instructions while failing them.

A task carries its constraints: ``meta["constraints"] = [{"kind": "bullets", "count": 3},
{"kind": "max_words", "n": 50}, {"kind": "include", "keywords": ["budget"]}, ...]``.
Kinds:

* bullets, max_words, min_words, include, exclude, ends_with, lowercase, no_commas, paragraphs
  (CONSTRAINT_KINDS, checked here);
* ifeval: ``{"kind": "ifeval", "id": "detectable_format:json_format", "kwargs": {...}}``, any of the
  25 IFEval instruction ids, checked by k2sys.rewards.ifeval (the benchmark's own definitions);
* program: ``{"kind": "program", "code": "def check(response): ..."}``, a checker program (AutoIF,
  below); it runs only inside the bubblewrap sandbox, never on the host; many checks go to one
  sandbox run (`run_checkers`);
* judge: ``{"kind": "judge", "condition": "the tone is formal"}``, a soft condition for the judge
  callable (``ChatConstraintJudge``: an LLM through an OpenAI-compatible route).

AutoIF augmentation (`AutoIF`): a proposer (``TemplateProposer``, deterministic; ``ChatProposer``, an
LLM) writes a new constraint as (instruction, checker program, violating responses); the constraint is
kept only when, in the sandbox, its checker passes the task's reference response and fails every
violating one (the cross-validation of AutoIF, Dong et al. 2024).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from k2sys.rewards.ifeval import check_instruction
from k2sys.rewards.judge_client import ChatFn, RewardCallFailed
from k2sys.tasks.base import Task

__all__ = ["InstructionVerifier", "InstructionResult", "find_compliance_claims", "CONSTRAINT_KINDS",
           "run_checkers", "ChatConstraintJudge", "Proposal", "TemplateProposer", "ChatProposer", "AutoIF"]

_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+\S", re.MULTILINE)
_WORD = re.compile(r"\b[\w'-]+\b")
# Phrases in which a response vouches for its own compliance.
_CLAIMS = re.compile(
    r"\b(?:as (?:you )?(?:requested|instructed|asked)"
    r"|i(?: have|'ve)? (?:followed|met|satisfied|complied with|adhered to|included|made sure|ensured)"
    r"|(?:this|my|the above) (?:response|answer|reply|text) (?:meets|satisfies|follows|complies with|"
    r"contains exactly|has exactly|is under|stays under|is within|includes|fulfills|fulfils)"
    r"|all (?:the |of the |your )?(?:requirements|constraints|instructions) (?:are|have been|were) "
    r"(?:met|satisfied|followed)"
    r"|(?:exactly|precisely) \d+ (?:bullet|point|word|paragraph))",
    re.IGNORECASE)


def find_compliance_claims(text: str) -> list[str]:
    return [m.group(0) for m in _CLAIMS.finditer(text)]


def _words(text: str) -> int:
    return len(_WORD.findall(text))


def _need(c: dict[str, Any], key: str) -> Any:
    if key not in c:
        raise ValueError(f"constraint {c!r} needs field {key!r}")
    return c[key]


def _ifeval(r: str, c: dict[str, Any]) -> bool:
    return check_instruction(_need(c, "id"), r, c.get("kwargs"))


CONSTRAINT_KINDS: dict[str, Callable[[str, dict[str, Any]], bool]] = {
    "bullets": lambda r, c: len(_BULLET.findall(r)) == int(_need(c, "count")),
    "max_words": lambda r, c: _words(r) <= int(_need(c, "n")),
    "min_words": lambda r, c: _words(r) >= int(_need(c, "n")),
    "include": lambda r, c: all(k.lower() in r.lower() for k in _need(c, "keywords")),
    "exclude": lambda r, c: not any(k.lower() in r.lower() for k in _need(c, "keywords")),
    "ends_with": lambda r, c: r.rstrip().endswith(_need(c, "text")),
    "lowercase": lambda r, c: r == r.lower(),
    "no_commas": lambda r, c: "," not in r,
    "paragraphs": lambda r, c: len([p for p in re.split(r"\n\s*\n", r.strip()) if p.strip()])
    == int(_need(c, "count")),
    "ifeval": _ifeval,
}

JudgeFn = Callable[[str, str, str], bool]
"""(prompt, response, condition text) -> satisfied? An LLM-as-judge in production."""


# ---- checker programs, in the sandbox only -----------------------------------------------------
_HARNESS = r'''
import io, json, signal, sys

def _alarm(signum, frame):
    raise TimeoutError("checker took too long")

signal.signal(signal.SIGALRM, _alarm)
items = json.loads(sys.stdin.read())
real_stdout = sys.stdout
results = []
for item in items:
    ns = {"__name__": "checker"}
    sys.stdout = io.StringIO()
    try:
        signal.setitimer(signal.ITIMER_REAL, PER_ITEM_S)
        exec(compile(item["code"], "<checker>", "exec"), ns)
        fn = ns.get("check") or ns.get("evaluate")
        ok = bool(fn(item["response"])) if callable(fn) else None
    except BaseException:
        ok = False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        sys.stdout = real_stdout
    results.append(ok)
print("K2SYS_CHECKS " + json.dumps(results))
'''


def run_checkers(items: Sequence[tuple[str, str]], sandbox: Any = None,
                 per_item_s: float = 1.0) -> list[bool]:
    """Run checker programs (code defining ``check(response) -> bool``) on responses, all in one
    bubblewrap sandbox run: [(code, response)] -> [passed]. A checker that raises, loops past
    ``per_item_s`` or defines no ``check`` fails its item. Raises RewardCallFailed when the sandbox run
    itself fails (no bwrap, whole-run timeout, garbled output)."""
    from k2sys.rewards.sandbox import SandboxConfig, SandboxUnavailable, run_python

    if not items:
        return []
    base = sandbox or SandboxConfig()
    limit = max(base.time_limit_s, 2.0 + per_item_s * len(items))
    cfg = SandboxConfig(**{**base.__dict__, "time_limit_s": limit,
                           "max_output_bytes": max(base.max_output_bytes, 64 * len(items) + 1024)})
    code = _HARNESS.replace("PER_ITEM_S", repr(float(per_item_s)))
    payload = json.dumps([{"code": c, "response": r} for c, r in items])
    try:
        res = run_python(code, payload, cfg)
    except SandboxUnavailable as e:
        raise RewardCallFailed("sandbox_unavailable", str(e)) from None
    if res.timed_out:
        raise RewardCallFailed("timeout", f"checker batch of {len(items)} passed {limit:.0f} s")
    line = next((ln for ln in reversed(res.stdout.splitlines()) if ln.startswith("K2SYS_CHECKS ")), None)
    if not res.ok or line is None:
        raise RewardCallFailed("sandbox_error", (res.stderr or res.stdout)[-300:])
    out = json.loads(line[len("K2SYS_CHECKS "):])
    if len(out) != len(items):
        raise RewardCallFailed("sandbox_error", f"{len(out)} results for {len(items)} checks")
    return [bool(x) for x in out]


_FAILED = object()  # a program result whose sandbox run failed


@dataclass
class InstructionResult:
    reward: float
    checks: dict[str, bool]
    claims: list[str] = field(default_factory=list)
    hacked: bool = False
    """The response claimed compliance but failed at least one check."""


class InstructionVerifier:
    family = "instruction"

    def __init__(self, judge: JudgeFn | None = None, partial_credit: bool = False,
                 hack_penalty: float = 0.0, sandbox: Any = None):
        """partial_credit: reward = fraction of checks passed (else all-or-nothing).
        hack_penalty: reward given to a response caught by the hack-check (<= 0 recommended).
        sandbox: SandboxConfig for checker programs (kind "program")."""
        if hack_penalty > 0:
            raise ValueError(f"hack_penalty is the reward of a caught hack and must be <= 0, got {hack_penalty}")
        self.judge, self.partial_credit, self.hack_penalty = judge, partial_credit, hack_penalty
        self.sandbox = sandbox

    @staticmethod
    def _constraints(task: Task) -> list[dict]:
        constraints = task.meta.get("constraints")
        if not constraints:
            raise ValueError("instruction task needs meta['constraints'] (a non-empty list of dicts with 'kind')")
        return constraints

    def run_programs(self, tasks: Sequence[Task], responses: Sequence[str]) -> list[dict[int, Any]]:
        """The checker programs of many tasks in one sandbox run: per task {constraint index: passed};
        when the run fails every entry is the failure marker (check() then raises RewardCallFailed)."""
        index, items = [], []
        for ti, (t, r) in enumerate(zip(tasks, responses)):
            for ci, c in enumerate(t.meta.get("constraints") or []):
                if c.get("kind") == "program":
                    index.append((ti, ci))
                    items.append((_need(c, "code"), r))
        out: list[dict[int, Any]] = [{} for _ in tasks]
        if not items:
            return out
        try:
            got: list[Any] = run_checkers(items, self.sandbox)
        except RewardCallFailed as e:
            got = [(_FAILED, e)] * len(items)
        for (ti, ci), ok in zip(index, got):
            out[ti][ci] = ok
        return out

    def check(self, task: Task, response: str, programs: dict[int, Any] | None = None) -> InstructionResult:
        constraints = self._constraints(task)
        checks: dict[str, bool] = {}
        for i, c in enumerate(constraints):
            kind = c.get("kind")
            if kind == "judge":
                if self.judge is None:
                    raise ValueError("constraint kind 'judge' needs InstructionVerifier(judge=...)")
                ok = bool(self.judge(task.prompt, response, _need(c, "condition")))
            elif kind == "program":
                if programs is None:
                    programs = self.run_programs([task], [response])[0]
                ok = programs[i]
                if isinstance(ok, tuple) and ok and ok[0] is _FAILED:
                    raise ok[1]
            elif kind in CONSTRAINT_KINDS:
                ok = CONSTRAINT_KINDS[kind](response, c)
            else:
                raise ValueError(f"unknown constraint kind {kind!r}; known: {sorted(CONSTRAINT_KINDS)} "
                                 "+ ['judge', 'program']")
            checks[f"{i}:{kind}"] = bool(ok)
        claims = find_compliance_claims(response)
        all_ok = all(checks.values())
        if claims and not all_ok:
            return InstructionResult(reward=self.hack_penalty, checks=checks, claims=claims, hacked=True)
        reward = (sum(checks.values()) / len(checks)) if self.partial_credit else float(all_ok)
        return InstructionResult(reward=reward, checks=checks, claims=claims)

    def __call__(self, task: Task, response: str) -> float:
        return self.check(task, response).reward


# ---- LLM judge for soft constraints ------------------------------------------------------------
class ChatConstraintJudge:
    """JudgeFn over an OpenAI-compatible chat (`make_chat`): the judge answers YES or NO. A reply
    with neither raises RewardCallFailed("unparsed") (the sample scores 0 and is counted)."""

    _VERDICT = re.compile(r"\b(YES|NO)\b")

    def __init__(self, chat: ChatFn):
        self.chat = chat

    def __call__(self, prompt: str, response: str, condition: str) -> bool:
        msgs = [{"role": "system", "content": "You check whether a response satisfies one condition. "
                 "Answer with exactly one word: YES or NO."},
                {"role": "user", "content": f"User request:\n{prompt}\n\nResponse:\n{response}\n\n"
                 f"Condition: {condition}\nDoes the response satisfy the condition? YES or NO."}]
        m = self._VERDICT.search(self.chat(msgs).upper())
        if m is None:
            raise RewardCallFailed("unparsed", "constraint judge said neither YES nor NO")
        return m.group(1) == "YES"


# ---- AutoIF augmentation -----------------------------------------------------------------------
@dataclass
class Proposal:
    instruction: str
    code: str
    """Python source defining check(response) -> bool; runs only in the sandbox."""
    negatives: list[str]
    """Responses that violate the constraint: the checker must fail each of them."""


def _letters(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+", text)


class TemplateProposer:
    """Deterministic AutoIF proposer: constraints read off the reference response, each with the
    checker an LLM would write and a violating variant of the reference."""

    def propose(self, task: Task, reference: str, rng: random.Random) -> Proposal | None:
        makers = [self._no_digits, self._max_word_len, self._letter_count, self._max_lines, self._starts_with,
                  self._line_length]
        rng.shuffle(makers)
        for make in makers:
            p = make(reference, rng)
            if p is not None:
                return p
        return None

    @staticmethod
    def _no_digits(ref: str, rng: random.Random) -> Proposal | None:
        if any(ch.isdigit() for ch in ref):
            return None
        return Proposal("Do not use any digits.", "def check(response):\n    return not any(ch.isdigit() for ch "
                        "in response)\n", [ref + " 42", "7 " + ref])

    @staticmethod
    def _max_word_len(ref: str, rng: random.Random) -> Proposal | None:
        words = _letters(ref)
        if not words:
            return None
        n = max(len(w) for w in words) + rng.randint(0, 2)
        return Proposal(f"Do not use any word longer than {n} letters.",
                        f"import re\ndef check(response):\n    return all(len(w) <= {n} for w in "
                        f"re.findall(r'[A-Za-z]+', response))\n", [ref + " " + "x" * (n + 1)])

    @staticmethod
    def _letter_count(ref: str, rng: random.Random) -> Proposal | None:
        counts = {c: ref.lower().count(c) for c in "aeiost"}
        c = max(counts, key=lambda k: (counts[k], k))
        if counts[c] < 3:
            return None
        k = counts[c] - rng.randint(0, 2)
        return Proposal(f"Use the letter '{c}' at least {k} times.",
                        f"def check(response):\n    return response.lower().count({c!r}) >= {k}\n",
                        [ref.replace(c, "").replace(c.upper(), "")])

    @staticmethod
    def _max_lines(ref: str, rng: random.Random) -> Proposal | None:
        n = len([ln for ln in ref.splitlines() if ln.strip()]) + rng.randint(0, 1)
        return Proposal(f"Use at most {n} non-empty lines.",
                        f"def check(response):\n    return len([l for l in response.splitlines() if l.strip()]) "
                        f"<= {n}\n", [ref + "\nmore" * (n + 1)])

    @staticmethod
    def _starts_with(ref: str, rng: random.Random) -> Proposal | None:
        head = ref.lstrip().split()[0] if ref.strip() else ""
        if not head or "'" in head or "\\" in head:
            return None
        return Proposal(f"Start your response with '{head}'.",
                        f"def check(response):\n    return response.lstrip().startswith({head!r})\n",
                        ["Sure. " + ref])

    @staticmethod
    def _line_length(ref: str, rng: random.Random) -> Proposal | None:
        n = max(len(ln) for ln in ref.splitlines()) + rng.randint(2, 10) if ref.strip() else 0
        if not n:
            return None
        return Proposal(f"Keep every line under {n + 1} characters.",
                        f"def check(response):\n    return all(len(l) <= {n} for l in response.splitlines())\n",
                        [ref + "\n" + "word " * (n // 4 + 2)])


class ChatProposer:
    """AutoIF proposer backed by an LLM: it answers one JSON object {"instruction", "checker",
    "negative"}; anything else (or a failed call) proposes nothing (counted in `failures`)."""

    def __init__(self, chat: ChatFn):
        self.chat = chat
        self.failures = 0

    def propose(self, task: Task, reference: str, rng: random.Random) -> Proposal | None:
        msgs = [{"role": "user", "content":
                 "Write one new verifiable constraint for this writing task that the reference response "
                 "already satisfies, as JSON with keys \"instruction\" (one sentence to the writer), \"checker\" "
                 "(Python source defining check(response) -> bool) and \"negative\" (a response that violates "
                 f"it).\n\nTask: {task.prompt}\n\nReference response:\n{reference}\n\nJSON only."}]
        try:
            text = self.chat(msgs)
            m = re.search(r"\{.*\}", text, re.DOTALL)
            d = json.loads(m.group(0)) if m else None
            if not (isinstance(d, dict) and all(isinstance(d.get(k), str) and d[k].strip()
                                                for k in ("instruction", "checker", "negative"))):
                raise ValueError("no usable JSON proposal")
        except Exception:  # noqa: BLE001 - a failed proposal is skipped and counted, never fatal
            self.failures += 1
            return None
        return Proposal(d["instruction"].strip(), d["checker"], [d["negative"]])


class AutoIF:
    """Adds cross-validated constraints to instruction tasks (seed 4.1: AutoIF-style augmentation)."""

    def __init__(self, proposer: Any = None, sandbox: Any = None):
        self.proposer = proposer or TemplateProposer()
        self.sandbox = sandbox
        self.stats = {"proposed": 0, "accepted": 0}

    def validate(self, proposals: Sequence[tuple[Proposal, str]]) -> list[bool]:
        """Per (proposal, reference): the checker passes the reference and fails every negative (one sandbox run)."""
        items, spans = [], []
        for p, ref in proposals:
            spans.append((len(items), 1 + len(p.negatives)))
            items += [(p.code, ref)] + [(p.code, neg) for neg in p.negatives]
        got = run_checkers(items, self.sandbox)
        return [bool(got[s]) and len(p.negatives) > 0 and not any(got[s + 1:s + n])
                for (s, n), (p, _) in zip(spans, proposals)]

    def augment(self, tasks: Sequence[Task], rng_for: Callable[[Task], random.Random]) -> list[Task | None]:
        """Each task with one more accepted constraint (instruction appended to the prompt, a "program"
        constraint in meta), or None when the proposal was rejected or none came."""
        props: list[tuple[int, Proposal]] = []
        for i, t in enumerate(tasks):
            p = self.proposer.propose(t, t.answer, rng_for(t))
            if p is not None:
                props.append((i, p))
        self.stats["proposed"] += len(props)
        ok = self.validate([(p, tasks[i].answer) for i, p in props]) if props else []
        out: list[Task | None] = [None] * len(tasks)
        for (i, p), good in zip(props, ok):
            if good:
                t = tasks[i]
                c = {"kind": "program", "code": p.code, "instruction": p.instruction, "source": "autoif"}
                out[i] = Task(prompt=f"{t.prompt} {p.instruction}", answer=t.answer, family=t.family,
                              meta={**t.meta, "constraints": list(t.meta["constraints"]) + [c]})
                self.stats["accepted"] += 1
        return out
