"""Grounded answering as a generated task family (seed 4.1, faithfulness).

    a fictional entity with 3-4 facts (the context) + a question about 1-2 of them
    -> the model answers "using only the context"
    verify = k2sys.rewards.faithfulness.FaithfulnessReward: share of the response's sentences the
    grounding judge finds supported by the context, times the share of asked-for facts it states.

The entities are invented, so no fact can come from pre-training: only the context grounds an answer.
Params: facts (sentences in the context), asked (facts the question asks for), judge (None = the
deterministic lexical judge; or an OpenAI-compatible chat spec {"base_url", "model", ...} for the LLM
sentence-level judge).
"""

from __future__ import annotations

import random
from typing import Any

from k2sys.rewards.faithfulness import ChatGroundingJudge, FaithfulnessReward, LexicalGroundingJudge
from k2sys.rewards.judge_client import FailureCounter, make_chat
from k2sys.tasks.base import Task, TaskFamily, register_family

_SYL = ("var", "nel", "os", "mo", "tir", "ra", "bel", "kan", "dor", "ith", "lu", "zen", "qua", "mar", "po", "sil")
_RIVERS = ("Ambler", "Corran", "Feyle", "Loddon", "Marrow", "Teska")
_PEOPLE = ("Ada Brenn", "Otto Vail", "Mira Holt", "Ivo Strand", "Lena Cask")
_PRODUCTS = ("glass lamps", "wooden toys", "river boats", "wool blankets", "copper pots")
_CITIES = ("Harlow", "Dunmere", "Kestrel Bay", "Orford", "Penlow")
_MONTHS = ("March", "June", "August", "October")
_THINGS = ("kites", "bread", "old songs", "lanterns", "boats")

# kind -> [(attribute, fact template, question phrase, value maker)]
_KINDS: dict[str, tuple[str, list[tuple[str, str, str, Any]]]] = {
    "bridge": ("The {N} Bridge", [
        ("year", "{E} was built in {v}.", "when it was built", lambda r: str(r.randint(1820, 1990))),
        ("length", "{E} is {v} meters long.", "how long it is", lambda r: str(r.randint(40, 900))),
        ("river", "{E} crosses the {v} River.", "which river it crosses", lambda r: r.choice(_RIVERS)),
        ("designer", "{E} was designed by {v}.", "who designed it", lambda r: r.choice(_PEOPLE))]),
    "lake": ("Lake {N}", [
        ("depth", "{E} is {v} meters deep.", "how deep it is", lambda r: str(r.randint(5, 300))),
        ("river", "{E} is fed by the {v} River.", "which river feeds it", lambda r: r.choice(_RIVERS)),
        ("year", "{E} was first mapped in {v}.", "when it was first mapped", lambda r: str(r.randint(1600, 1950))),
        ("altitude", "{E} lies {v} meters above sea level.", "how high it lies",
         lambda r: str(r.randint(100, 2500)))]),
    "company": ("{N} Works", [
        ("year", "{E} was founded in {v}.", "when it was founded", lambda r: str(r.randint(1850, 2015))),
        ("staff", "{E} employs {v} people.", "how many people it employs", lambda r: str(r.randint(12, 4000))),
        ("product", "{E} makes {v}.", "what it makes", lambda r: r.choice(_PRODUCTS)),
        ("city", "{E} is based in {v}.", "where it is based", lambda r: r.choice(_CITIES))]),
    "festival": ("The {N} Festival", [
        ("month", "{E} is held every {v}.", "when it is held", lambda r: r.choice(_MONTHS)),
        ("year", "{E} began in {v}.", "when it began", lambda r: str(r.randint(1900, 2015))),
        ("visitors", "{E} draws about {v} visitors.", "how many visitors it draws",
         lambda r: str(r.randint(200, 90000))),
        ("theme", "{E} celebrates {v}.", "what it celebrates", lambda r: r.choice(_THINGS))]),
}


@register_family
class Faithfulness(TaskFamily):
    name = "faithfulness"

    def __init__(self, facts: int = 3, asked: int = 1, judge: Any = None, min_coverage: float = 0.8):
        if not isinstance(facts, int) or not 2 <= facts <= 4:
            raise ValueError(f"faithfulness facts must be an int in [2, 4], got {facts!r}")
        if not isinstance(asked, int) or not 1 <= asked <= min(2, facts):
            raise ValueError(f"faithfulness asked must be an int in [1, min(2, facts)], got {asked!r}")
        self.facts, self.asked, self.judge_spec = facts, asked, judge
        chat = make_chat(judge)
        self.reward = FaithfulnessReward(ChatGroundingJudge(chat) if chat else LexicalGroundingJudge(min_coverage))
        self.failures = FailureCounter(self.name)

    def params(self) -> dict[str, Any]:
        return {"facts": self.facts, "asked": self.asked}

    def sample(self, rng: random.Random) -> Task:
        kind = rng.choice(sorted(_KINDS))
        ent_t, attrs = _KINDS[kind]
        name = "".join(rng.choice(_SYL) for _ in range(2)).capitalize()
        entity = ent_t.format(N=name)
        chosen = rng.sample(attrs, self.facts)
        facts = [(a, tmpl.format(E=entity, v=(v := make(rng))), q, v) for a, tmpl, q, make in chosen]
        asked = rng.sample(facts, self.asked)
        context = " ".join(f for _, f, _, _ in facts)
        question = " and ".join(q for _, _, q, _ in asked)
        subject = entity[0].lower() + entity[1:] if entity.startswith("The ") else entity
        prompt = f"Context: {context}\nUsing only the context, say {question} for {subject}."
        answer = " ".join(f for _, f, _, _ in asked)
        return Task(prompt=prompt, answer=answer, family=self.name,
                    meta={"context": context, "required": [v for _, _, _, v in asked], "entity": entity})

    def score(self, task: Task, response: str):
        return self.reward.score(task.meta["context"], response, task.meta.get("required", ()))

    def verify(self, task: Task, response: str) -> float:
        return self.verify_batch([task], [response])[0]

    def verify_batch(self, tasks: list[Task], responses: list[str]) -> list[float]:
        out = []
        for t, r in zip(tasks, responses):
            self._check_task(t)
            res = self.failures.guard(self.score, t, r, what="faithfulness sample")
            out.append(0.0 if res is None else float(res.reward))
        return out

    def reward_stats(self) -> dict[str, int]:
        return self.failures.stats()
