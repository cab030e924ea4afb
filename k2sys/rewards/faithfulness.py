"""Faithfulness reward (seed 4.1, after FACTS Grounding): is every sentence of a response supported
by the context it was given?

    response -> sentences (claims) -> a grounding judge labels each supported / unsupported
    -> reward = supported share x answered share (the facts the question asks for, when the task
       names them in meta["required"]); an empty response scores 0

Judges:
* ``LexicalGroundingJudge``: deterministic, for tests and the tiny recipe. A claim is supported when
  its content words are covered by the context (>= ``min_coverage``), every number and capitalised
  name in it appears in a context sentence together with one of the claim's fact-specific words (a
  word not in every context sentence, so "founded in <the staff count>" is caught), and its negation
  agrees with the context sentence that covers it best. A lexical
  entailment heuristic: paraphrases with new words fail it, and reordered word salad passes it.
* ``ChatGroundingJudge``: an LLM through an OpenAI-compatible route labels each numbered sentence
  SUPPORTED or UNSUPPORTED; a reply that does not label every sentence is a reward failure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from k2sys.rewards.judge_client import ChatFn, RewardCallFailed

__all__ = ["split_claims", "LexicalGroundingJudge", "ChatGroundingJudge", "GroundingResult", "FaithfulnessReward"]

_STOP = frozenset("""a an the and or but of to in on at by for with from as is are was were be been being it its this
that these those which who whom what when where how there here has have had do does did not no nor so than then
also very just only about into over under after before up down out off again further once can will would should
could may might must shall i you he she we they them his her their our your my me us one some any all each both
according context text passage says said stated states mentions mentioned""".split())
_NEG = frozenset("not no never none neither nor without cannot isn't wasn't aren't weren't doesn't didn't "
                 "don't won't can't".split())
_TOKEN = re.compile(r"[A-Za-z][A-Za-z'-]*|\d+(?:[.,]\d+)*")


def split_claims(text: str) -> list[str]:
    """Sentences of a response (k2sys.rewards.ifeval.split_sentences), list markers and lines kept apart."""
    from k2sys.rewards.ifeval import split_sentences

    out = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s+", "", line).strip()
        if line:
            out += [s for s in split_sentences(line) if re.search(r"[A-Za-z0-9]", s)]
    return out


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _norm(t: str) -> str:
    """Lower case, possessive and plural s dropped (a crude stemmer, the same on both sides)."""
    if t[0].isdigit():
        return t.replace(",", "")
    t = t.lower().removesuffix("'s")
    return t[:-1] if len(t) > 3 and t.endswith("s") and not t.endswith("ss") else t


def _content(toks: Sequence[str]) -> set[str]:
    return {_norm(t) for t in toks if t.lower() not in _STOP and t.lower() not in _NEG
            and (t[0].isdigit() or len(t) > 2)}


def _negated(toks: Sequence[str]) -> bool:
    return any(t.lower() in _NEG or t.lower().endswith("n't") for t in toks)


@dataclass
class GroundingResult:
    reward: float
    claims: list[str]
    supported: list[bool]
    answered: float = 1.0
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def supported_share(self) -> float:
        return sum(self.supported) / len(self.supported) if self.supported else 0.0


class LexicalGroundingJudge:
    """Deterministic sentence-level grounding (see module doc)."""

    def __init__(self, min_coverage: float = 0.8):
        if not 0 < min_coverage <= 1:
            raise ValueError(f"min_coverage must be in (0, 1], got {min_coverage}")
        self.min_coverage = min_coverage

    def __call__(self, context: str, claims: Sequence[str]) -> list[bool]:
        ctx_sents = [(_tokens(s), s) for s in split_claims(context)]
        ctx_content = [_content(t) for t, _ in ctx_sents]
        all_content = set().union(*ctx_content) if ctx_content else set()
        return [self._one(c, ctx_sents, ctx_content, all_content) for c in claims]

    def _one(self, claim: str, ctx_sents, ctx_content, all_content) -> bool:
        toks = _tokens(claim)
        words = _content(toks)
        if not words:
            return False  # no content ("Sure!", "Here it is."): nothing grounded, nothing asked
        if len(words & all_content) / len(words) < self.min_coverage:
            return False
        anchors = {_norm(t) for i, t in enumerate(toks) if t[0].isdigit() or (t[0].isupper() and i > 0)}
        anchors &= words
        # words that tell the context's facts apart (not the entity name every sentence repeats)
        specific = {w for w in words if 0 < sum(w in cc for cc in ctx_content) < len(ctx_content)} - anchors
        for a in anchors:  # a number or name must sit in a context sentence with a specific word of the claim
            if not any(a in cc and (not specific or specific & cc) for cc in ctx_content):
                return False
        # negation must agree with the context sentence that best covers the claim
        best = max(range(len(ctx_content)), key=lambda i: len(words & ctx_content[i]))
        return _negated(toks) == _negated(ctx_sents[best][0])


class ChatGroundingJudge:
    """Sentence-level grounding by an LLM (OpenAI-compatible chat). One call per response; the judge
    answers one line per sentence: "<n>: SUPPORTED" or "<n>: UNSUPPORTED"."""

    _LINE = re.compile(r"^\s*\[?(\d+)\]?\s*[:.)-]\s*(UNSUPPORTED|SUPPORTED|NOT SUPPORTED)",
                       re.IGNORECASE | re.MULTILINE)

    def __init__(self, chat: ChatFn):
        self.chat = chat

    def __call__(self, context: str, claims: Sequence[str]) -> list[bool]:
        numbered = "\n".join(f"{i + 1}. {c}" for i, c in enumerate(claims))
        msgs = [{"role": "system", "content": "You judge whether each sentence of a response is fully supported by "
                 "a context document. A sentence is SUPPORTED only if the context states or directly implies it."},
                {"role": "user", "content": f"Context:\n{context}\n\nSentences:\n{numbered}\n\nFor every sentence "
                 "answer one line '<number>: SUPPORTED' or '<number>: UNSUPPORTED'."}]
        reply = self.chat(msgs)
        got: dict[int, bool] = {}
        for m in self._LINE.finditer(reply):
            got[int(m.group(1))] = m.group(2).upper() == "SUPPORTED"
        if any(i + 1 not in got for i in range(len(claims))):
            raise RewardCallFailed("unparsed", f"grounding judge labelled {len(got)} of {len(claims)} sentences")
        return [got[i + 1] for i in range(len(claims))]


class FaithfulnessReward:
    """reward(context, response, required) -> GroundingResult (see module doc)."""

    def __init__(self, judge: Any = None):
        self.judge = judge or LexicalGroundingJudge()

    def score(self, context: str, response: str, required: Sequence[str] = ()) -> GroundingResult:
        claims = split_claims(response)
        if not claims:
            return GroundingResult(reward=0.0, claims=[], supported=[], answered=0.0)
        supported = [bool(s) for s in self.judge(context, claims)]
        if len(supported) != len(claims):
            raise RewardCallFailed("bad_reply", f"judge labelled {len(supported)} of {len(claims)} sentences")
        low = response.lower()
        answered = sum(r.lower() in low for r in required) / len(required) if required else 1.0
        share = sum(supported) / len(supported)
        return GroundingResult(reward=share * answered, claims=claims, supported=supported, answered=answered)
