"""Open-ended (subjective) prompts rewarded by the self-critique rubric critic (seed 4.2).

    prompt ("Explain caching to a beginner in one sentence.") + task rubric items (key ideas to mention)
    -> the K responses of a group are compared pairwise by the critic under the core, prescriptive and
       task-specific rubric -> Bradley-Terry (or win-rate) aggregation -> per-response reward in [0, 1]
    -> verbosity guard: a response longer than length_ratio x its group's median keeps limit/length of
       its reward; a lone response (evaluation) is compared with the reference answer instead

Critics (param `critic`):
* "heuristic" (default): RubricPairwiseJudge over HeuristicJudge, a linear Bradley-Terry critic on
  rubric item scores; deterministic (tests, CPU recipe).
* "policy": the current policy is the critic (PolicyPairwiseJudge). During the rollout the heuristic
  critic scores (the engine is paused then); before the train step the coordinator's hook re-scores
  every open-ended group with the policy's own verdict log-probs (trainer weights = the sampling
  policy) and those rewards train the step.
* {"base_url", "model", ...}: an LLM through an OpenAI-compatible route (ChatPairwiseJudge).

Closed loop (refresh_every > 0): every refresh_every iterations, the iteration's on-policy responses of
the verifiable families give (better, worse) pairs ordered by their verifiable rewards; the critic's
agreement with those orderings is logged (critic/agreement, before the refresh), then the critic is
refreshed with the pairwise ranking loss: the heuristic critic's item weights are re-fitted; the policy
critic gets its verdict-labelled critic prompts added to the train step (ctx.train_rows, a cross-entropy
weighed by rl.critic_coef, separate from the PTX term) and its scale calibrated; a remote LLM critic is
only measured.
The critic state is kept per iteration in <run>/rewards/open_ended_critic.json and read back as of the
last committed iteration on resume. Mixed batches: list "open_ended" next to verifiable families in
tasks.families.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, ClassVar

from k2sys.rewards.critic import (ChatPairwiseJudge, PolicyPairwiseJudge, RubricItem, RubricPairwiseJudge,
                                  ScoredResponse, aggregate_pairwise, build_preference_pairs, critic_agreement,
                                  length_guard)
from k2sys.rewards.judge_client import FailureCounter, make_chat
from k2sys.tasks.base import Task, TaskFamily, register_family

# concept -> (key ideas a good answer mentions, a reference explanation that mentions them)
_CONCEPTS: dict[str, tuple[tuple[str, str], str]] = {
    "caching": (("memory", "faster"), "Caching keeps recent results in memory so repeated requests are faster."),
    "recycling": (("waste", "reuse"), "Recycling turns waste into material we can reuse."),
    "photosynthesis": (("light", "sugar"), "Photosynthesis lets plants use light to make sugar."),
    "compound interest": (("interest", "grows"), "With compound interest your interest earns interest so savings "
                          "grows faster."),
    "vaccines": (("immune", "protect"), "Vaccines train the immune system to protect you from a disease."),
    "gravity": (("mass", "pull"), "Gravity is the pull between things that have mass."),
    "rainbows": (("light", "water"), "Rainbows appear when light bends through drops of water."),
    "version control": (("changes", "history"), "Version control records changes so you can see the history."),
    "exercise": (("heart", "strong"), "Regular exercise keeps your heart and muscles strong."),
    "budgeting": (("spending", "plan"), "Budgeting is a plan for your spending before the money arrives."),
    "sleep": (("rest", "memory"), "Sleep gives the body rest and helps memory form."),
    "composting": (("soil", "scraps"), "Composting turns food scraps into rich soil."),
}
_TEMPLATES = ("Explain {c} to {a} in {n}.", "Describe {c} for {a} in {n}.", "What is {c}? Answer for {a} in {n}.",
              "Give {a} a short explanation of {c} in {n}.")
_AUDIENCES = ("a beginner", "a child", "a busy manager", "a student", "a friend")
_LENGTHS = ("one sentence", "two sentences", "a few words")

CRITICS = ("heuristic", "policy")


@register_family
class OpenEnded(TaskFamily):
    name = "open_ended"
    verifiable: ClassVar[bool] = False
    """Rewarded by a critic, not a verifier: default_gym registers it only with a critic."""

    def __init__(self, critic: Any = "heuristic", aggregate: str = "bt", length_ratio: float = 1.5,
                 refresh_every: int = 0, refresh_pairs: int = 32, train_rows: int = 8, max_opponents: int = 0):
        if not (critic in CRITICS or isinstance(critic, dict) or callable(critic)):
            raise ValueError(f"open_ended critic must be one of {CRITICS} or an OpenAI-compatible chat spec "
                             f"{{'base_url', 'model', ...}}, got {critic!r}")
        if aggregate not in ("bt", "winrate"):
            raise ValueError(f"open_ended aggregate must be bt or winrate, got {aggregate!r}")
        if not isinstance(length_ratio, (int, float)) or length_ratio < 1:
            raise ValueError(f"open_ended length_ratio must be >= 1, got {length_ratio!r}")
        for key, v in (("refresh_every", refresh_every), ("refresh_pairs", refresh_pairs), ("train_rows", train_rows),
                       ("max_opponents", max_opponents)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"open_ended {key} must be an int >= 0, got {v!r}")
        self.critic_spec, self.aggregate, self.length_ratio = critic, aggregate, float(length_ratio)
        self.refresh_every, self.refresh_pairs, self.train_rows = refresh_every, refresh_pairs, train_rows
        self.max_opponents = max_opponents
        self.heuristic = RubricPairwiseJudge()
        chat = make_chat(critic) if not isinstance(critic, str) else None
        self.judge: Any = ChatPairwiseJudge(chat) if chat else self.heuristic
        self.policy: PolicyPairwiseJudge | None = None  # built by after_rollout from the coordinator's context
        self.policy_state: dict = {}
        self.failures = FailureCounter(self.name)
        self.state_path: Path | None = None
        self.history: dict[str, dict] = {}

    def params(self) -> dict[str, Any]:
        return {"critic": self.critic_spec if isinstance(self.critic_spec, str) else "chat",
                "aggregate": self.aggregate, "length_ratio": self.length_ratio}

    # ---- tasks ----------------------------------------------------------------------------------
    def sample(self, rng: random.Random) -> Task:
        concept = rng.choice(sorted(_CONCEPTS))
        (k1, k2), ref = _CONCEPTS[concept]
        prompt = rng.choice(_TEMPLATES).format(c=concept, a=rng.choice(_AUDIENCES), n=rng.choice(_LENGTHS))
        rubric = [{"name": "mentions", "description": f"Mentions {k1} and {k2}.", "weight": 2.0,
                   "params": {"keywords": [k1, k2]}}]
        return Task(prompt=prompt, answer=ref, family=self.name, meta={"concept": concept, "rubric": rubric})

    @staticmethod
    def task_items(task: Task) -> list[RubricItem]:
        return [RubricItem(**{"category": "task", **d}) for d in task.meta.get("rubric", [])]

    # ---- reward ---------------------------------------------------------------------------------
    def _pairs(self, n: int) -> list[tuple[int, int]]:
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        if self.max_opponents and n - 1 > self.max_opponents:  # each response meets max_opponents others
            keep = {(min(i, (i + d) % n), max(i, (i + d) % n)) for i in range(n)
                    for d in range(1, self.max_opponents + 1)}
            pairs = sorted(keep)
        return pairs

    def _group_rewards(self, task: Task, responses: list[str], prob) -> list[float]:
        """prob(list of (a, b)) -> P(a beats b) each; None entries are failed comparisons (skipped)."""
        items = self.task_items(task)
        if len(responses) == 1:  # alone (evaluation): against the reference answer
            p = prob([(responses[0], task.answer)], items)[0]
            if p is None:  # the failed comparison is counted already
                return [0.0]
            return length_guard([p], [len(responses[0].split())], self.length_ratio,
                                reference=len(task.answer.split()))
        pairs = self._pairs(len(responses))
        ps = prob([(responses[i], responses[j]) for i, j in pairs], items)
        return self._aggregate(responses, [(i, j, p) for (i, j), p in zip(pairs, ps) if p is not None])

    def _aggregate(self, responses: list[str], comps: list[tuple[int, int, float]]) -> list[float]:
        """Pairwise outcomes -> rewards, length-guarded; a response none of whose comparisons came back
        (the critic failed, counted) scores 0."""
        seen = {i for c in comps for i in c[:2]}
        rewards = length_guard(aggregate_pairwise(len(responses), comps, self.aggregate),
                               [len(r.split()) for r in responses], self.length_ratio)
        return [r if i in seen else 0.0 for i, r in enumerate(rewards)]

    def _judge_probs(self, judge: Any, prompt: str):
        def prob(ab: list[tuple[str, str]], items: list[RubricItem]) -> list[float | None]:
            return [self.failures.guard(judge, prompt, a, b, items, what="critic comparison") for a, b in ab]
        return prob

    def verify(self, task: Task, response: str) -> float:
        return self.verify_batch([task], [response])[0]

    def verify_batch(self, tasks: list[Task], responses: list[str]) -> list[float]:
        """Responses to the same prompt form a group and are compared pairwise (see module doc)."""
        by_prompt: dict[str, list[int]] = {}
        for i, t in enumerate(tasks):
            self._check_task(t)
            by_prompt.setdefault(t.prompt, []).append(i)
        out = [0.0] * len(tasks)
        for idx in by_prompt.values():
            t = tasks[idx[0]]
            got = self.failures.guard(self._group_rewards, t, [responses[i] for i in idx],
                                      self._judge_probs(self.judge, t.prompt), what="open_ended group")
            for i, r in zip(idx, got or [0.0] * len(idx)):
                out[i] = float(r)
        return out

    def reward_stats(self) -> dict[str, int]:
        return self.failures.stats()

    # ---- RL hooks (k2sys.rewards.gym) -----------------------------------------------------------
    def _critic(self) -> Any:
        return self.policy if self.critic_spec == "policy" and self.policy is not None else self.judge

    def bind_run(self, state_dir: Path, committed_iter: int) -> None:
        import json

        self.state_path = Path(state_dir) / "open_ended_critic.json"
        self.history = json.loads(self.state_path.read_text())["history"] if self.state_path.exists() else {}
        self.history = {k: v for k, v in self.history.items() if int(k) <= committed_iter}
        if self.history:
            st = self.history[max(self.history, key=int)]
            self.heuristic.load_state(st.get("heuristic", {}))
            self.policy_state = st.get("policy", {})

    def _save(self, it: int) -> None:
        if self.state_path is None:
            return
        from k2sys.models.hf_io import write_json_atomic

        self.history[str(it + 1)] = {"heuristic": self.heuristic.state(),
                                     "policy": self.policy.state() if self.policy else self.policy_state}
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.state_path, {"history": self.history})

    def after_rollout(self, it: int, records: list, ctx: Any) -> dict[str, float]:
        stats: dict[str, float] = {}
        if self.critic_spec == "policy":
            if ctx is not None and ctx.logprobs is not None and ctx.tokenize is not None:
                self.policy = PolicyPairwiseJudge(ctx.logprobs, ctx.tokenize)
                self.policy.load_state(self.policy_state)
                stats.update(self._policy_rescore(records))
            else:
                stats["critic/policy_unavailable"] = 1
        if self.refresh_every and (it + 1) % self.refresh_every == 0:
            stats.update(self._refresh(it, records, ctx))
        return stats

    def _policy_rescore(self, records: list) -> dict[str, float]:
        """Rewards of every open-ended group from the policy critic (one batch of verdict log-probs)."""
        groups: dict[str, list] = {}
        for r in records:
            if r.task.family == self.name:
                groups.setdefault(r.task.prompt, []).append(r)
        triples, spans = [], []
        for prompt, recs in groups.items():
            items = self.task_items(recs[0].task)
            pairs = self._pairs(len(recs)) if len(recs) > 1 else []
            spans.append((prompt, pairs, len(triples)))
            triples += [(prompt, recs[i].response, recs[j].response, items) for i, j in pairs]
        probs = self.failures.guard(self.policy.probs, triples, what="policy critic batch") if triples else []
        n = 0
        for prompt, pairs, start in spans:
            recs = groups[prompt]
            if not pairs:
                continue
            comps = [] if probs is None else [(i, j, probs[start + k]) for k, (i, j) in enumerate(pairs)]
            rewards = self._aggregate([r.response for r in recs], comps)  # a failed batch: every sample 0
            for r, new in zip(recs, rewards):
                if not r.truncated:
                    r.reward = float(new)
                    n += 1
        return {"critic/policy_scored": n}

    def _refresh(self, it: int, records: list, ctx: Any) -> dict[str, float]:
        scored = [ScoredResponse(prompt=r.task.prompt, response=r.response, reward=r.reward)
                  for r in records if r.task.family != self.name and not r.truncated]
        pairs = build_preference_pairs(scored, min_margin=0.5, max_pairs_per_prompt=4, seed=it)
        if len(pairs) > self.refresh_pairs:
            pairs = random.Random(f"refresh|{it}").sample(pairs, self.refresh_pairs)
        stats: dict[str, float] = {"critic/refresh": 1, "critic/pairs": len(pairs)}
        if not pairs:
            return stats
        critic = self._critic()
        margins = self.failures.guard(critic.margins, pairs, what="critic agreement")
        if margins is None:
            return stats
        stats["critic/agreement"] = critic_agreement(margins)
        if critic is self.policy:
            stats.update(self.policy.refresh(pairs, margins))
            self.policy_state = self.policy.state()
            if self.train_rows and ctx is not None:
                rows = self.policy.training_rows(pairs[: max(1, self.train_rows // 2)])
                ctx.train_rows.extend(rows)
                stats["critic/train_rows"] = len(rows)
        else:
            stats.update(critic.refresh(pairs))
            if critic is self.heuristic:  # a remote critic is not re-asked: nothing of it changed
                stats["critic/agreement_after"] = critic_agreement(critic.margins(pairs))
        self._save(it)
        return stats
