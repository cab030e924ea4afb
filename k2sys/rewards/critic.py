"""Self-critique rubric reward (seed 4.2).

    actor samples K responses -> RubricCritic scores each against a rubric (core values,
    prescriptive rules, task-specific items) through a judge -> reward for subjective tasks
    critic refresh: verifiable rewards of the same responses -> (better, worse) pairs ->
    Bradley-Terry pairwise ranking loss on the critic's scores

The judge is any callable ``(prompt, response, item) -> score in [0, 1]``: an LLM engine in
production (``EngineJudge`` over a text-generation callable), ``HeuristicJudge`` (deterministic
text rules) in tests and for the tiny recipe.

Pairwise form (the RL reward of the open_ended family, k2sys.tasks.open_ended): the critic compares
two responses to the same prompt under the rubric and gives P(a better than b); a group's K responses
are compared pairwise and aggregated into per-response rewards (``aggregate_pairwise``: Bradley-Terry
strengths -> mean win probability against the others, or the plain win rate), then the verbosity
guard (``length_guard``) discounts responses much longer than their group's median. Critics:

* ``RubricPairwiseJudge``: a linear Bradley-Terry model over rubric item scores (any pointwise judge,
  e.g. HeuristicJudge): margin = sum_k theta_k (s_k(a) - s_k(b)). ``refresh`` fits theta with the
  pairwise ranking loss on (better, worse) pairs ordered by verifiable rewards.
* ``ChatPairwiseJudge``: an LLM through an OpenAI-compatible route answers "A" or "B"; asked in both
  orders, so position bias cancels.
* ``PolicyPairwiseJudge``: the current policy itself. The critic prompt (rubric + request + responses
  A and B) is scored by the policy's log-probabilities of answering "A" and "B" (in both orders:
  margin = ((lp_A - lp_B | a, b) - (lp_A - lp_B | b, a)) / 2, position bias cancels);
  P = sigmoid(scale * margin). Its refresh is real training of the policy as a critic: the
  verdict-labelled critic prompts of verifiable pairs join the trainer's batch (``training_rows``, weighed
  by rl.critic_coef: cross-entropy on the correct verdict token, the pairwise ranking objective over the
  two verdicts plus a term keeping mass on them), and ``scale`` is re-fitted by the ranking loss.
"""

from __future__ import annotations

import math
import random
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F

from k2sys.rewards.instruction import find_compliance_claims
from k2sys.tasks.base import Task

__all__ = ["RubricItem", "Rubric", "default_rubric", "RubricCritic", "CriticScore", "HeuristicJudge",
           "EngineJudge", "ScoredResponse", "PreferencePair", "build_preference_pairs",
           "pairwise_ranking_loss", "bradley_terry", "aggregate_pairwise", "length_guard", "critic_prompt",
           "RubricPairwiseJudge", "ChatPairwiseJudge", "PolicyPairwiseJudge", "critic_agreement"]

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


# ---- pairwise critic ---------------------------------------------------------------------------
def bradley_terry(n: int, comparisons: Sequence[tuple[int, int, float]], l2: float = 0.05,
                  iters: int = 100) -> list[float]:
    """Strengths theta (mean 0) of n items from soft pairwise outcomes (i, j, P(i beats j)): the MAP
    estimate of the Bradley-Terry model, P(i beats j) = sigmoid(theta_i - theta_j), with a Gaussian
    prior (l2) so that unanimous outcomes stay finite. Newton's method on the concave log-likelihood."""
    if n < 1:
        raise ValueError(f"bradley_terry needs n >= 1, got {n}")
    for i, j, p in comparisons:
        if not (0 <= i < n and 0 <= j < n and i != j):
            raise ValueError(f"comparison ({i}, {j}) out of range for n={n}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"comparison ({i}, {j}): P must be in [0, 1], got {p}")
    theta = torch.zeros(n, dtype=torch.float64)
    idx_i = torch.tensor([c[0] for c in comparisons], dtype=torch.long)
    idx_j = torch.tensor([c[1] for c in comparisons], dtype=torch.long)
    p = torch.tensor([float(c[2]) for c in comparisons], dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    for _ in range(iters):
        q = torch.sigmoid(theta[idx_i] - theta[idx_j]) if comparisons else p
        g = -l2 * theta
        h = -l2 * eye.clone()
        if comparisons:
            r = p - q
            g.index_add_(0, idx_i, r)
            g.index_add_(0, idx_j, -r)
            w = q * (1 - q)
            h.index_put_((idx_i, idx_i), -w, accumulate=True)
            h.index_put_((idx_j, idx_j), -w, accumulate=True)
            h.index_put_((idx_i, idx_j), w, accumulate=True)
            h.index_put_((idx_j, idx_i), w, accumulate=True)
        step = torch.linalg.solve(h, g)
        theta = theta - step
        if float(step.abs().max()) < 1e-10:
            break
    theta = theta - theta.mean()
    return theta.tolist()


def aggregate_pairwise(n: int, comparisons: Sequence[tuple[int, int, float]],
                       method: Literal["bt", "winrate"] = "bt") -> list[float]:
    """Per-item reward in [0, 1] from pairwise outcomes: "bt" = mean over the others j of
    sigmoid(theta_i - theta_j) under the fitted Bradley-Terry strengths (uses every comparison,
    transitively); "winrate" = mean P(i wins) over the comparisons i took part in (0.5 if none)."""
    if method == "bt":
        if n == 1:
            return [0.5]
        th = bradley_terry(n, comparisons)
        return [sum(1.0 / (1.0 + math.exp(th[j] - th[i])) for j in range(n) if j != i) / (n - 1) for i in range(n)]
    if method == "winrate":
        won = [0.0] * n
        seen = [0] * n
        for i, j, p in comparisons:
            won[i] += p
            won[j] += 1.0 - p
            seen[i] += 1
            seen[j] += 1
        return [won[i] / seen[i] if seen[i] else 0.5 for i in range(n)]
    raise ValueError(f"aggregate method must be bt or winrate, got {method!r}")


def length_guard(rewards: Sequence[float], lengths: Sequence[int], max_ratio: float = 1.5,
                 reference: float | None = None) -> list[float]:
    """Verbosity guard: a response longer than max_ratio x the reference length (default: the median
    of its group) keeps only limit/length of its reward, so padding never pays."""
    if len(rewards) != len(lengths):
        raise ValueError(f"{len(rewards)} rewards but {len(lengths)} lengths")
    if not max_ratio >= 1:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    if not rewards:
        return []
    ref = reference if reference is not None else statistics.median(lengths)
    limit = max(max_ratio * ref, 1.0)
    return [r * min(1.0, limit / n) if n > limit else r for r, n in zip(rewards, lengths)]


def _plain(text: str, max_chars: int) -> str:
    """Text quoted into a critic prompt: cut, and chat-template tokens defused (a policy's response may
    contain '<|im_end|>' and the like, which a chat template refuses or would obey)."""
    return text[:max_chars].replace("<|", "< |").replace("|>", "| >")


def critic_prompt(prompt: str, first: str, second: str, items: Sequence[RubricItem], max_chars: int = 600) -> str:
    rubric = "; ".join(f"{it.name} ({it.category}): {it.description}" for it in items)
    return (f"Compare two responses to a request using the rubric.\nRubric: {rubric}\n"
            f"Request: {_plain(prompt, max_chars)}\nResponse A: {_plain(first, max_chars)}\n"
            f"Response B: {_plain(second, max_chars)}\nWhich response is better? Answer A or B.")


def critic_agreement(margins: Sequence[float]) -> float:
    """Share of (better, worse) pairs the critic orders like the verifiable reward (margin > 0); ties count half."""
    if not margins:
        return float("nan")
    return sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _fit_linear_bt(diff: torch.Tensor, theta0: torch.Tensor, l2: float, lo: float | None = None,
                   iters: int = 50) -> torch.Tensor:
    """argmin_theta mean softplus(-(diff @ theta)) + l2 ||theta - theta0||^2: the pairwise ranking loss of
    (better, worse) feature differences under a linear critic, by Newton's method (convex; no optimizer
    state). lo: optional lower bound on every coordinate (projected)."""
    th = theta0.clone()
    n = diff.shape[0]
    eye = torch.eye(th.numel(), dtype=th.dtype)
    for _ in range(iters):
        s = diff @ th
        q = torch.sigmoid(-s)  # d/ds softplus(-s) = -sigmoid(-s)
        g = -(diff.T @ q) / n + 2 * l2 * (th - theta0)
        h = (diff.T * (q * (1 - q))) @ diff / n + 2 * l2 * eye
        step = torch.linalg.solve(h, g)
        th = th - step
        if lo is not None:
            th = th.clamp(min=lo)
        if float(step.abs().max()) < 1e-9:
            break
    return th


def _fit_scale(margins: Sequence[float], init: float, hi: float = 50.0) -> float:
    """scale >= 0 minimising the pairwise ranking loss of scale * margin on (better, worse) pairs. A critic
    that disagrees with the verifiable orderings gets a scale near 0: its rewards fall to the neutral
    0.5 instead of pushing the policy the wrong way."""
    m = torch.tensor(list(margins), dtype=torch.float64)
    if m.numel() == 0 or float(m.abs().max()) == 0:
        return init
    th = _fit_linear_bt(m[:, None], torch.zeros(1, dtype=torch.float64), l2=1e-4, lo=0.0)
    return float(min(float(th[0]), hi))


class RubricPairwiseJudge:
    """Pairwise critic over a pointwise rubric judge: a linear Bradley-Terry model on item scores
    (see module doc). ``theta`` starts at scale x the rubric weights (normalised)."""

    kind = "rubric"

    def __init__(self, critic: RubricCritic | None = None, scale: float = 8.0):
        self.critic = critic or RubricCritic(HeuristicJudge())
        self._unit = scale / sum(i.weight for i in self.critic.rubric.items)
        self.theta: dict[str, float] = {i.name: self._unit * i.weight for i in self.critic.rubric.items}

    def _theta(self, item: RubricItem) -> float:
        """Fitted weight of a rubric item; task items (not fitted) keep scale x their rubric weight."""
        return self.theta.get(item.name, self._unit * item.weight)

    def features(self, prompt: str, response: str, items: Sequence[RubricItem] = ()) -> dict[str, float]:
        return self.critic.score(prompt, response, items).per_item

    def margin(self, prompt: str, a: str, b: str, items: Sequence[RubricItem] = ()) -> float:
        fa, fb = self.features(prompt, a, items), self.features(prompt, b, items)
        rubric = self.critic.rubric.with_task_items(items) if items else self.critic.rubric
        return sum(self._theta(it) * (fa[it.name] - fb[it.name]) for it in rubric.items)

    def __call__(self, prompt: str, a: str, b: str, items: Sequence[RubricItem] = ()) -> float:
        return _sigmoid(self.margin(prompt, a, b, items))

    def margins(self, pairs: Sequence[PreferencePair]) -> list[float]:
        return [self.margin(p.prompt, p.better, p.worse) for p in pairs]

    def refresh(self, pairs: Sequence[PreferencePair], l2: float = 0.01) -> dict[str, float]:
        """Fit theta on (better, worse) pairs with the pairwise ranking loss (+ l2 towards the start)."""
        names = [i.name for i in self.critic.rubric.items]
        diff = torch.tensor([[self.features(p.prompt, p.better)[k] - self.features(p.prompt, p.worse)[k]
                              for k in names] for p in pairs], dtype=torch.float64)
        th0 = torch.tensor([self.theta[k] for k in names], dtype=torch.float64)
        th = _fit_linear_bt(diff, th0, l2)
        s = diff @ th
        self.theta = {k: float(v) for k, v in zip(names, th)}
        return {"critic/loss": float(pairwise_ranking_loss(s, torch.zeros_like(s)))}

    def state(self) -> dict:
        return {"theta": dict(self.theta)}

    def load_state(self, st: dict) -> None:
        self.theta.update({k: float(v) for k, v in st.get("theta", {}).items()})


class ChatPairwiseJudge:
    """LLM pairwise critic (OpenAI-compatible chat): "A" or "B", asked in both orders (P in {0, 0.5, 1})."""

    kind = "chat"
    _V = re.compile(r"\b([AB])\b")

    def __init__(self, chat: Callable[[Sequence[dict]], str], rubric: Rubric | None = None):
        self.chat = chat
        self.rubric = rubric or default_rubric()

    def _once(self, prompt: str, a: str, b: str, items: Sequence[RubricItem]) -> float:
        from k2sys.rewards.judge_client import RewardCallFailed

        reply = self.chat([{"role": "user", "content": critic_prompt(prompt, a, b, items)}])
        m = self._V.search(reply.strip()[:40].upper())
        if m is None:
            raise RewardCallFailed("unparsed", "pairwise critic answered neither A nor B")
        return 1.0 if m.group(1) == "A" else 0.0

    def __call__(self, prompt: str, a: str, b: str, items: Sequence[RubricItem] = ()) -> float:
        all_items = list(self.rubric.items) + list(items)
        return (self._once(prompt, a, b, all_items) + 1.0 - self._once(prompt, b, a, all_items)) / 2

    def margins(self, pairs: Sequence[PreferencePair]) -> list[float]:
        return [self(p.prompt, p.better, p.worse) - 0.5 for p in pairs]

    def refresh(self, pairs: Sequence[PreferencePair]) -> dict[str, float]:
        return {}  # a remote judge is not ours to train; its agreement is still logged

    def state(self) -> dict:
        return {}

    def load_state(self, st: dict) -> None:
        pass


Rows = list[tuple[list[int], list[int]]]


class PolicyPairwiseJudge:
    """The current policy as pairwise critic (see module doc).

    logprobs(rows) -> summed log-prob of each row's masked tokens under the current policy;
    tokenize(messages) -> (ids, mask on the assistant turn) in the policy's chat format."""

    kind = "policy"

    def __init__(self, logprobs: Callable[[Rows], list[float]],
                 tokenize: Callable[[list[dict]], tuple[list[int], list[int]]],
                 rubric: Rubric | None = None, scale: float = 1.0, max_chars: int = 400):
        self.logprobs, self.tokenize = logprobs, tokenize
        self.rubric = rubric or default_rubric()
        self.scale, self.max_chars = scale, max_chars

    def _row(self, prompt: str, first: str, second: str, items: Sequence[RubricItem], verdict: str):
        text = critic_prompt(prompt, first, second, list(self.rubric.items) + list(items), self.max_chars)
        return self.tokenize([{"role": "user", "content": text}, {"role": "assistant", "content": verdict}])

    def raw_margins(self, triples: Sequence[tuple[str, str, str, Sequence[RubricItem]]]) -> list[float]:
        """Position-debiased log-odds margin that a beats b, for each (prompt, a, b, task items); one batch."""
        rows = []
        for prompt, a, b, items in triples:
            rows += [self._row(prompt, a, b, items, "A"), self._row(prompt, a, b, items, "B"),
                     self._row(prompt, b, a, items, "A"), self._row(prompt, b, a, items, "B")]
        lp = self.logprobs(rows) if rows else []
        return [((lp[k] - lp[k + 1]) - (lp[k + 2] - lp[k + 3])) / 2 for k in range(0, len(lp), 4)]

    def probs(self, triples: Sequence[tuple[str, str, str, Sequence[RubricItem]]]) -> list[float]:
        return [_sigmoid(self.scale * m) for m in self.raw_margins(triples)]

    def margins(self, pairs: Sequence[PreferencePair]) -> list[float]:
        return self.raw_margins([(p.prompt, p.better, p.worse, ()) for p in pairs])

    def training_rows(self, pairs: Sequence[PreferencePair]) -> Rows:
        """Critic prompts of (better, worse) pairs with the right verdict, both orders (the refresh data)."""
        rows: Rows = []
        for p in pairs:
            rows += [self._row(p.prompt, p.better, p.worse, (), "A"), self._row(p.prompt, p.worse, p.better, (), "B")]
        return rows

    def refresh(self, pairs: Sequence[PreferencePair], margins: Sequence[float] | None = None,
                prior_pairs: float = 16.0) -> dict[str, float]:
        """Calibrate scale on the pairs' margins (the training rows are added by the caller): the ranking-loss
        fit, pooled with the current scale as if it came from `prior_pairs` earlier pairs (a few pairs move
        it a little, many pairs a lot)."""
        m = list(margins) if margins is not None else self.margins(pairs)
        fit = _fit_scale(m, self.scale)
        self.scale = (prior_pairs * self.scale + len(m) * fit) / (prior_pairs + len(m))
        return {"critic/scale": self.scale, "critic/scale_fit": fit}

    def state(self) -> dict:
        return {"scale": self.scale}

    def load_state(self, st: dict) -> None:
        self.scale = float(st.get("scale", self.scale))
