"""Self-critique rubric reward (seed 4.2).

    actor samples K responses -> RubricCritic scores each against a rubric (core values,
    prescriptive rules, task-specific items) through a judge -> reward for subjective tasks
    critic refresh: verifiable rewards of the same responses -> (better, worse) pairs ->
    Bradley-Terry pairwise ranking loss on the critic's scores

The judge is any callable ``(prompt, response, item) -> score in [0, 1]``: an LLM engine in
production (``EngineJudge`` over a text-generation callable), ``HeuristicJudge`` (deterministic
text rules) in tests and for the tiny recipe.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F

from k2sys.rewards.instruction import find_compliance_claims
from k2sys.tasks.base import Task

__all__ = ["RubricItem", "Rubric", "default_rubric", "RubricCritic", "CriticScore", "HeuristicJudge",
           "EngineJudge", "ScoredResponse", "PreferencePair", "build_preference_pairs",
           "pairwise_ranking_loss"]

Category = Literal["core", "prescriptive", "task"]


@dataclass(kw_only=True, frozen=True)
class RubricItem:
    name: str
    description: str
    category: Category = "core"
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if self.category not in ("core", "prescriptive", "task"):
            raise ValueError(f"RubricItem.category must be core, prescriptive or task, got {self.category!r}")
        if not self.weight > 0:
            raise ValueError(f"RubricItem {self.name!r}: weight must be > 0, got {self.weight!r}")


@dataclass(kw_only=True)
class Rubric:
    items: list[RubricItem]

    def __post_init__(self) -> None:
        if not self.items:
            raise ValueError("Rubric needs at least one item")

    def with_task_items(self, extra: Sequence[RubricItem]) -> "Rubric":
        return Rubric(items=list(self.items) + list(extra))


def default_rubric() -> Rubric:
    """Core values and prescriptive rules of seed 4.2 that hold for every response."""
    return Rubric(items=[
        RubricItem(name="relevance", description="Addresses what the user asked.", category="core"),
        RubricItem(name="clarity", description="Short, clear sentences.", category="core"),
        RubricItem(name="no_flattery", category="prescriptive",
                   description="Does not open with praise or affirmation of the question."),
        RubricItem(name="no_self_justification", category="prescriptive",
                   description="Does not argue that the response meets the user's requirements."),
        RubricItem(name="concision", category="prescriptive", params={"target_words": 120},
                   description="Earns no credit for length; no padding."),
    ])


Judge = Callable[[str, str, RubricItem], float]


@dataclass
class CriticScore:
    total: float                 # weighted mean of item scores, in [0, 1]
    per_item: dict[str, float]


class RubricCritic:
    def __init__(self, judge: Judge, rubric: Rubric | None = None):
        self.judge = judge
        self.rubric = rubric or default_rubric()

    def score(self, prompt: str, response: str, task_items: Sequence[RubricItem] = ()) -> CriticScore:
        rubric = self.rubric.with_task_items(task_items) if task_items else self.rubric
        per_item, num, den = {}, 0.0, 0.0
        for item in rubric.items:
            s = float(self.judge(prompt, response, item))
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"judge returned {s} for rubric item {item.name!r}; scores must be in [0, 1]")
            per_item[item.name] = s
            num += item.weight * s
            den += item.weight
        return CriticScore(total=num / den, per_item=per_item)

    def __call__(self, task: Task, response: str) -> float:
        """Reward-gym entry: task-specific items come from ``task.meta['rubric']`` (dicts)."""
        extra = [RubricItem(**{"category": "task", **d}) for d in task.meta.get("rubric", [])]
        return self.score(task.prompt, response, extra).total


_CONTENT = re.compile(r"[a-z0-9]{4,}")
_FLATTERY = re.compile(r"^\s*(?:great|excellent|good|what a (?:great|wonderful)|fantastic|wonderful)\s+"
                       r"(?:question|point|idea)|^\s*(?:certainly|absolutely|of course)[!,.]", re.IGNORECASE)


class HeuristicJudge:
    """Deterministic text rules standing in for an LLM judge (tests, the tiny CPU recipe).
    It knows the default rubric's items and the task item ``mentions`` (params.keywords)."""

    def __call__(self, prompt: str, response: str, item: RubricItem) -> float:
        fn = getattr(self, f"_{item.name}", None)
        if fn is None:
            raise KeyError(f"HeuristicJudge cannot judge rubric item {item.name!r}; it knows relevance, "
                           f"clarity, no_flattery, no_self_justification, concision, mentions")
        return float(fn(prompt, response, item.params))

    @staticmethod
    def _relevance(prompt: str, response: str, params: dict) -> float:
        want = set(_CONTENT.findall(prompt.lower()))
        return 1.0 if not want else len(want & set(_CONTENT.findall(response.lower()))) / len(want)

    @staticmethod
    def _clarity(prompt: str, response: str, params: dict) -> float:
        sentences = [s for s in re.split(r"[.!?\n]+", response) if s.strip()]
        if not sentences:
            return 0.0
        mean_len = sum(len(s.split()) for s in sentences) / len(sentences)
        return min(1.0, params.get("max_sentence_words", 25) / mean_len) if mean_len else 0.0

    @staticmethod
    def _no_flattery(prompt: str, response: str, params: dict) -> float:
        return 0.0 if _FLATTERY.search(response) else 1.0

    @staticmethod
    def _no_self_justification(prompt: str, response: str, params: dict) -> float:
        return 0.0 if find_compliance_claims(response) else 1.0

    @staticmethod
    def _concision(prompt: str, response: str, params: dict) -> float:
        n = len(response.split())
        return min(1.0, params.get("target_words", 120) / n) if n else 0.0

    @staticmethod
    def _mentions(prompt: str, response: str, params: dict) -> float:
        kws = params.get("keywords") or []
        if not kws:
            raise ValueError("rubric item 'mentions' needs params={'keywords': [...]}")
        return sum(k.lower() in response.lower() for k in kws) / len(kws)


class EngineJudge:
    """LLM-as-judge over any ``generate(prompt_text) -> completion_text`` callable (an
    engine client). The judge is asked for ``Score: N`` with N in 0..10."""

    _SCORE = re.compile(r"Score:\s*(10|\d)(?!\d)")

    def __init__(self, generate: Callable[[str], str]):
        self.generate = generate
        self.unparsed = 0  # judge replies without a score (counted, scored 0)

    def __call__(self, prompt: str, response: str, item: RubricItem) -> float:
        text = (f"You are grading a response against one rubric item.\nRubric item ({item.category}): "
                f"{item.name}: {item.description}\n\nUser prompt:\n{prompt}\n\nResponse:\n{response}\n\n"
                f"Reply with one line 'Score: N' where N is an integer from 0 (fails) to 10 (fully meets).")
        m = self._SCORE.search(self.generate(text))
        if m is None:
            self.unparsed += 1
            return 0.0
        return int(m.group(1)) / 10.0


@dataclass(kw_only=True)
class ScoredResponse:
    prompt: str
    response: str
    reward: float
    """Verifiable reward of the response (e.g. 1 correct / 0 wrong)."""


@dataclass(kw_only=True)
class PreferencePair:
    prompt: str
    better: str
    worse: str
    margin: float


def build_preference_pairs(samples: Sequence[ScoredResponse], min_margin: float = 0.5,
                           max_pairs_per_prompt: int | None = None, seed: int = 0) -> list[PreferencePair]:
    """(better, worse) pairs among responses to the same prompt whose verifiable rewards differ
    by at least ``min_margin``; ties carry no ranking signal and are skipped."""
    if not min_margin > 0:
        raise ValueError(f"min_margin must be > 0 (equal rewards give no preference), got {min_margin}")
    if max_pairs_per_prompt is not None and max_pairs_per_prompt < 1:
        raise ValueError(f"max_pairs_per_prompt must be >= 1 or None, got {max_pairs_per_prompt}")
    by_prompt: dict[str, list[ScoredResponse]] = defaultdict(list)
    for s in samples:
        by_prompt[s.prompt].append(s)
    rng = random.Random(seed)
    pairs: list[PreferencePair] = []
    for prompt, group in by_prompt.items():
        found = [PreferencePair(prompt=prompt, better=a.response, worse=b.response, margin=a.reward - b.reward)
                 for a in group for b in group
                 if a.reward - b.reward >= min_margin and a.response != b.response]
        if max_pairs_per_prompt is not None and len(found) > max_pairs_per_prompt:
            found = rng.sample(found, max_pairs_per_prompt)
        pairs.extend(found)
    return pairs


def pairwise_ranking_loss(score_better: torch.Tensor, score_worse: torch.Tensor,
                          reduction: Literal["mean", "sum", "none"] = "mean") -> torch.Tensor:
    """Bradley-Terry loss -log sigmoid(s_better - s_worse), computed as softplus(s_worse - s_better)
    (stable for large score gaps)."""
    if score_better.shape != score_worse.shape:
        raise ValueError(f"score_better {tuple(score_better.shape)} and score_worse "
                         f"{tuple(score_worse.shape)} must have the same shape")
    if score_better.numel() == 0:
        raise ValueError("score_better is empty; build at least one preference pair")
    loss = F.softplus(score_worse - score_better)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
