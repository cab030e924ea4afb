"""Instruction-following reward (seed 4.1): programmatic checks where the condition is
checkable by code, an LLM judge for the rest, and a hack-check that catches responses which
*claim* to satisfy the instructions while failing them.

A task carries its constraints: ``meta["constraints"] = [{"kind": "bullets", "count": 3},
{"kind": "max_words", "n": 50}, {"kind": "include", "keywords": ["budget"]}, ...]``.
Kinds: bullets, max_words, min_words, include, exclude, ends_with, lowercase, no_commas,
paragraphs, judge (free-text condition for the judge callable).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from k2sys.tasks.base import Task

__all__ = ["InstructionVerifier", "InstructionResult", "find_compliance_claims", "CONSTRAINT_KINDS"]

_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+\S", re.MULTILINE)
_WORD = re.compile(r"\b[\w'-]+\b")
# Phrases in which a response vouches for its own compliance.
_CLAIMS = re.compile(
    r"\b(?:as (?:you )?(?:requested|instructed|asked)"
    r"|i(?: have|'ve)? (?:followed|met|satisfied|complied with|adhered to|included)"
    r"|(?:this|my|the above) (?:response|answer|reply|text) (?:meets|satisfies|follows|complies with|"
    r"contains exactly|has exactly|is under|stays under|is within|includes)"
    r"|all (?:the )?(?:requirements|constraints|instructions) (?:are|have been|were) (?:met|satisfied|followed)"
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
}

JudgeFn = Callable[[str, str, str], bool]
"""(prompt, response, condition text) -> satisfied? An LLM-as-judge in production."""


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
                 hack_penalty: float = 0.0):
        """partial_credit: reward = fraction of checks passed (else all-or-nothing).
        hack_penalty: reward given to a response caught by the hack-check (<= 0 recommended)."""
        if hack_penalty > 0:
            raise ValueError(f"hack_penalty is the reward of a caught hack and must be <= 0, got {hack_penalty}")
        self.judge, self.partial_credit, self.hack_penalty = judge, partial_credit, hack_penalty

    def check(self, task: Task, response: str) -> InstructionResult:
        constraints = task.meta.get("constraints")
        if not constraints:
            raise ValueError("instruction task needs meta['constraints'] (a non-empty list of dicts with 'kind')")
        checks: dict[str, bool] = {}
        for i, c in enumerate(constraints):
            kind = c.get("kind")
            if kind == "judge":
                if self.judge is None:
                    raise ValueError("constraint kind 'judge' needs InstructionVerifier(judge=...)")
                ok = bool(self.judge(task.prompt, response, _need(c, "condition")))
            elif kind in CONSTRAINT_KINDS:
                ok = CONSTRAINT_KINDS[kind](response, c)
            else:
                raise ValueError(f"unknown constraint kind {kind!r}; known: {sorted(CONSTRAINT_KINDS)} + ['judge']")
            checks[f"{i}:{kind}"] = ok
        claims = find_compliance_claims(response)
        all_ok = all(checks.values())
        if claims and not all_ok:
            return InstructionResult(reward=self.hack_penalty, checks=checks, claims=claims, hacked=True)
        reward = (sum(checks.values()) / len(checks)) if self.partial_credit else float(all_ok)
        return InstructionResult(reward=reward, checks=checks, claims=claims)

    def __call__(self, task: Task, response: str) -> float:
        return self.check(task, response).reward
