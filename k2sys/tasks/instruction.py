"""Instruction following as a generated task family (seed 4.1, complex instruction following).

    topic + 1..max_constraints verifiable constraints drawn from a catalogue of IFEval instruction
    ids (length, format, keywords, case, JSON, sections, start/end, punctuation, ...)
    -> a reference response built to satisfy all of them, then checked by the verifier itself
       (combinations the builder cannot satisfy together are redrawn)
    -> optional AutoIF constraints (checker programs, cross-validated in the sandbox) and soft
       constraints for an LLM judge
    verify = k2sys.rewards.instruction.InstructionVerifier: every check passes -> 1, else 0; a response
    that claims compliance ("I have followed all instructions") but fails a check -> hack_penalty (0).

Prompt: "Write about bicycles. Answer with exactly 2 bullet points ... Do not use any commas."
Params: min_constraints, max_constraints, kinds (subset of KINDS), autoif (share of tasks with one
AutoIF constraint), autoif_proposer (None = template proposer, or a chat spec for an LLM), soft (share
of tasks with one soft constraint; needs judge), judge (OpenAI-compatible chat spec:
{"base_url", "model", "api_key_env"?, "timeout_s"?}), partial_credit, hack_penalty.
"""

from __future__ import annotations

import json
import random
from typing import Any

from k2sys.rewards.instruction import (AutoIF, ChatConstraintJudge, ChatProposer, InstructionVerifier,
                                       TemplateProposer)
from k2sys.rewards.judge_client import FailureCounter, make_chat
from k2sys.tasks.base import Task, TaskFamily, register_family

TOPICS = ("bicycles", "city parks", "honeybees", "public libraries", "rainwater", "solar panels", "green tea",
          "volcanoes", "night trains", "recycling", "chess", "lighthouses", "bread baking", "rivers", "maps",
          "old bridges", "school gardens", "kites", "winter sports", "museums", "clocks", "forests", "radio",
          "coral reefs", "street markets", "sleep", "bird songs", "paper boats", "mountain huts", "wind farms")

_SENTENCES = ("{T} is an important part of daily life.", "Many people enjoy learning about {t}.",
              "The history of {t} is long and interesting.", "Experts say that {t} will matter more soon.",
              "It is easy to find good books about {t}.", "{T} can help a whole community grow.",
              "A simple plan makes {t} work well.", "Small changes in {t} can have a big effect.",
              "Children often ask questions about {t}.", "The best way to understand {t} is to look closely.")

_KEYWORDS = ("future", "simple", "careful", "bright", "local", "quiet", "useful", "modern", "strong", "fresh")
_FORBIDDEN = ("very", "really", "thing", "stuff", "maybe", "basically", "literally", "awesome")
_END_PHRASES = ("Is there anything else I can help with?", "That is all.", "Thank you for reading.",
                "Let me know if you have more questions.")
_SOFT = ("The tone is friendly and encouraging.", "The text is easy for a ten-year-old to read.",
         "The response sounds confident and professional.")

KINDS = ("bullets", "json", "sections", "paragraphs", "title", "keywords", "forbidden", "frequency", "lowercase",
         "uppercase", "no_commas", "end_phrase", "quotation", "postscript", "placeholders", "highlights",
         "max_words", "min_words", "max_sentences")
_GROUPS = ({"bullets", "json", "sections", "paragraphs"}, {"lowercase", "uppercase"},
           {"json", "quotation", "title", "postscript", "end_phrase", "sections"},
           {"max_words", "min_words", "max_sentences"})
"""At most one kind of each group per task (layouts; cases; things that cannot live inside JSON or
quotes or after an end phrase; length bounds), so most draws are satisfiable at once."""


def _c(iid: str, text: str, **kwargs: Any) -> dict:
    return {"kind": "ifeval", "id": iid, "kwargs": kwargs, "instruction": text}


@register_family
class InstructionFollowing(TaskFamily):
    name = "instruction"

    def __init__(self, min_constraints: int = 1, max_constraints: int = 2, kinds: list[str] | tuple[str, ...] = KINDS,
                 autoif: float = 0.0, autoif_proposer: Any = None, soft: float = 0.0, judge: Any = None,
                 partial_credit: bool = False, hack_penalty: float = 0.0, sentences: int = 2,
                 sandbox_time_limit_s: float = 10.0):
        kinds = tuple(kinds)
        if not kinds or any(k not in KINDS for k in kinds):
            raise ValueError(f"instruction kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
        if not (isinstance(min_constraints, int) and isinstance(max_constraints, int)
                and 1 <= min_constraints <= max_constraints <= 4):
            raise ValueError(f"instruction needs 1 <= min_constraints <= max_constraints <= 4, "
                             f"got {min_constraints}, {max_constraints}")
        if not isinstance(sentences, int) or not 1 <= sentences <= 6:
            raise ValueError(f"instruction sentences must be an int in [1, 6], got {sentences!r}")
        for key, v in (("autoif", autoif), ("soft", soft)):
            if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"instruction {key} is a share of tasks in [0, 1], got {v!r}")
        if soft > 0 and judge is None:
            raise ValueError("instruction soft > 0 needs a judge: {'base_url': ..., 'model': ...} of an "
                             "OpenAI-compatible server")
        if autoif > 0:
            from k2sys.rewards.sandbox import bwrap_available

            ok, why = bwrap_available()
            if not ok:
                raise ValueError(f"instruction autoif > 0: AutoIF checker programs run only in the bubblewrap "
                                 f"sandbox: {why}; or set autoif=0")
        self.min_constraints, self.max_constraints, self.kinds = min_constraints, max_constraints, kinds
        self.autoif, self.soft, self.sentences = float(autoif), float(soft), sentences
        self.judge_spec, self.proposer_spec = judge, autoif_proposer
        self.partial_credit, self.hack_penalty = bool(partial_credit), float(hack_penalty)
        from k2sys.rewards.sandbox import SandboxConfig

        self.sandbox = SandboxConfig(time_limit_s=float(sandbox_time_limit_s))
        chat = make_chat(judge)  # validates the spec now (config time); no call is made
        self.verifier = InstructionVerifier(judge=ChatConstraintJudge(chat) if chat else None,
                                            partial_credit=self.partial_credit, hack_penalty=self.hack_penalty,
                                            sandbox=self.sandbox)
        self.failures = FailureCounter(self.name)
        self.hacks = 0

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"min_constraints": self.min_constraints, "max_constraints": self.max_constraints,
                             "kinds": list(self.kinds), "sentences": self.sentences}
        if self.autoif:
            p["autoif"] = self.autoif
        if self.soft:
            p["soft"] = self.soft
        return p

    # ---- generation -----------------------------------------------------------------------------
    def _draw_kinds(self, rng: random.Random) -> list[str]:
        n = rng.randint(self.min_constraints, min(self.max_constraints, len(self.kinds)))
        pool = list(self.kinds)
        rng.shuffle(pool)
        out: list[str] = []
        for k in pool:
            if len(out) == n:
                break
            if all(not (k in g and any(o in g for o in out)) for g in _GROUPS):
                out.append(k)
        return out

    def sample(self, rng: random.Random) -> Task:
        for _ in range(50):
            task = self._try_sample(rng)
            if task is not None:
                return task
        raise ValueError(f"instruction{self.params()}: no satisfiable constraint combination in 50 draws; "
                         "widen kinds")

    def _try_sample(self, rng: random.Random) -> Task | None:
        topic = rng.choice(TOPICS)
        kinds = self._draw_kinds(rng)
        n_sent = self.sentences
        plan: dict[str, Any] = {}
        constraints: list[dict] = []
        if "bullets" in kinds:
            n_sent = plan["bullets"] = rng.randint(2, 3)
            constraints.append(_c("detectable_format:number_bullet_lists",
                                  f"Answer with exactly {n_sent} bullet points using markdown '* '.",
                                  num_bullets=n_sent))
        if "sections" in kinds:
            n_sent = plan["sections"] = rng.randint(2, 3)
            constraints.append(_c("detectable_format:multiple_sections",
                                  f"Divide the answer into {n_sent} sections, each starting with SECTION X.",
                                  section_spliter="SECTION", num_sections=n_sent))
        if "paragraphs" in kinds:
            n_sent = plan["paragraphs"] = rng.randint(2, 3)
            constraints.append(_c("length_constraints:number_paragraphs",
                                  f"Write {n_sent} paragraphs separated by the markdown divider ***.",
                                  num_paragraphs=n_sent))
        if "json" in kinds:
            plan["json"] = True
            constraints.append(_c("detectable_format:json_format", "Wrap the entire answer in JSON format."))
        if "title" in kinds:
            plan["title"] = topic.title()
            constraints.append(_c("detectable_format:title", "Include a title in double angular brackets, "
                                  "like <<title>>."))
        if "keywords" in kinds:
            kws = rng.sample(_KEYWORDS, 2)
            plan["keywords"] = kws
            constraints.append(_c("keywords:existence", f"Include the keywords {kws[0]} and {kws[1]}.",
                                  keywords=kws))
        if "forbidden" in kinds:
            bad = rng.sample(_FORBIDDEN, 2)
            constraints.append(_c("keywords:forbidden_words", f"Do not use the words {bad[0]} or {bad[1]}.",
                                  forbidden_words=bad))
        if "frequency" in kinds:
            word, k = rng.choice(_KEYWORDS), rng.randint(2, 3)
            plan["frequency"] = (word, k)
            constraints.append(_c("keywords:frequency", f"Use the word {word} at least {k} times.",
                                  keyword=word, relation="at least", frequency=k))
        if "placeholders" in kinds:
            plan["placeholders"] = rng.randint(1, 2)
            constraints.append(_c("detectable_content:number_placeholders",
                                  f"Include at least {plan['placeholders']} placeholders in square brackets, "
                                  "like [address].", num_placeholders=plan["placeholders"]))
        if "highlights" in kinds:
            plan["highlights"] = 1
            constraints.append(_c("detectable_format:number_highlighted_sections",
                                  "Highlight at least 1 section with markdown, like *highlighted section*.",
                                  num_highlights=1))
        if "postscript" in kinds:
            plan["postscript"] = True
            constraints.append(_c("detectable_content:postscript", "At the end, add a postscript starting with "
                                  "P.S.", postscript_marker="P.S."))
        if "end_phrase" in kinds:
            plan["end_phrase"] = rng.choice(_END_PHRASES)
            constraints.append(_c("startend:end_checker", f"Finish your response with this exact phrase: "
                                  f"{plan['end_phrase']}", end_phrase=plan["end_phrase"]))
        if "lowercase" in kinds:
            plan["case"] = "lower"
            constraints.append(_c("change_case:english_lowercase", "Your entire response must be in lowercase "
                                  "letters; no capital letters are allowed."))
        if "uppercase" in kinds:
            plan["case"] = "upper"
            constraints.append(_c("change_case:english_capital", "Your entire response must be in English and "
                                  "in all capital letters."))
        if "no_commas" in kinds:
            constraints.append(_c("punctuation:no_comma", "Do not use any commas."))
        if "quotation" in kinds:
            plan["quotation"] = True
            constraints.append(_c("startend:quotation", "Wrap your entire response in double quotation marks."))
        ref = self._build(topic, n_sent, plan, rng)
        if ref is None:
            return None
        words = len(ref.split())
        if "max_words" in kinds:
            n = words + rng.randint(3, 12)
            constraints.append(_c("length_constraints:number_words", f"Answer in fewer than {n} words.",
                                  relation="less than", num_words=n))
        if "min_words" in kinds:
            n = max(3, words - rng.randint(0, 6))
            constraints.append(_c("length_constraints:number_words", f"Answer with at least {n} words.",
                                  relation="at least", num_words=n))
        if "max_sentences" in kinds:
            from k2sys.rewards.ifeval import split_sentences

            n = len(split_sentences(ref)) + rng.randint(1, 3)
            constraints.append(_c("length_constraints:number_sentences", f"Use fewer than {n} sentences.",
                                  relation="less than", num_sentences=n))
        if self.soft and rng.random() < self.soft:
            constraints.append({"kind": "judge", "condition": rng.choice(_SOFT), "instruction": ""})
        order = list(range(len(constraints)))
        rng.shuffle(order)
        constraints = [constraints[i] for i in order]
        texts = [c["instruction"] or f"Make sure that: {c['condition'][0].lower()}{c['condition'][1:]}"
                 for c in constraints]
        prompt = f"Write about {topic}. " + " ".join(texts)
        task = Task(prompt=prompt, answer=ref, family=self.name, meta={"topic": topic, "constraints": constraints})
        hard = [c for c in constraints if c["kind"] != "judge"]
        probe = Task(prompt=prompt, answer=ref, family=self.name, meta={"constraints": hard})
        if not all(InstructionVerifier().check(probe, ref).checks.values()):
            return None
        return task

    @staticmethod
    def _build(topic: str, n_sent: int, plan: dict, rng: random.Random) -> str | None:
        t = topic
        pool = [s.format(t=t, T=t[0].upper() + t[1:]) for s in _SENTENCES]
        sents = rng.sample(pool, n_sent)
        if "keywords" in plan:
            a, b = plan["keywords"]
            sents[-1] = sents[-1].rstrip(".") + f" and it is {a} and {b}."
        if "frequency" in plan:
            w, k = plan["frequency"]
            sents[0] = sents[0].rstrip(".") + " " + " ".join([f"and {w}"] * k) + " ideas help."
        if "placeholders" in plan:
            spots = ["[address]", "[city]"][: plan["placeholders"]]
            sents[-1] = sents[-1].rstrip(".") + " near " + " and ".join(spots) + "."
        if "highlights" in plan:
            sents[0] = f"*{sents[0]}*"
        if "bullets" in plan:
            body = "\n".join(f"* {s}" for s in sents)
        elif "sections" in plan:
            body = "\n\n".join(f"SECTION {i + 1}\n{s}" for i, s in enumerate(sents))
        elif "paragraphs" in plan:
            body = "\n***\n".join(sents)
        else:
            body = " ".join(sents)
        if "title" in plan:
            body = f"<<{plan['title']}>>\n{body}"
        if "postscript" in plan:
            body += f"\nP.S. Learn more about {t} at your library."
        if "end_phrase" in plan:
            body += " " + plan["end_phrase"]
        if "json" in plan:
            body = json.dumps({"topic": t, "answer": body})
        if plan.get("case") == "lower":
            body = body.lower()
        elif plan.get("case") == "upper":
            body = body.upper()
        if plan.get("quotation"):
            body = f'"{body}"'
        return body

    def generate(self, n: int, seed: int, split: str = "train") -> list[Task]:
        """Base tasks (TaskFamily.generate), then AutoIF on a share `autoif` of them: one proposed
        constraint each, kept when its checker passes the reference and fails the violating responses in
        the sandbox (one run for the whole batch); rejected proposals leave the base task as it was."""
        base = super().generate(n, seed, split)
        if not self.autoif or not base:
            return base
        pick = random.Random(f"autoif|{seed}|{split}")
        chosen = [i for i in range(len(base)) if pick.random() < self.autoif]
        proposer = ChatProposer(make_chat(self.proposer_spec)) if self.proposer_spec is not None else TemplateProposer()
        aug = AutoIF(proposer, self.sandbox)
        done = aug.augment([base[i] for i in chosen], lambda t: random.Random(f"autoif|{t.prompt}"))
        out = list(base)
        seen = {t.prompt for t in base}
        for i, t in zip(chosen, done):
            if t is not None and t.prompt not in seen:
                out[i] = t
                seen.add(t.prompt)
        self.autoif_stats = dict(aug.stats)
        return out

    # ---- reward ---------------------------------------------------------------------------------
    def verify(self, task: Task, response: str) -> float:
        return self.verify_batch([task], [response])[0]

    def verify_batch(self, tasks: list[Task], responses: list[str]) -> list[float]:
        return [r for r, _ in self.score_details(tasks, responses)]

    def score_details(self, tasks: list[Task], responses: list[str]) -> list[tuple[float, dict[str, float]]]:
        """(reward, figures) per response; figures (what evaluation reports, k2sys.eval.harness):
        prompt_strict = every constraint followed, inst_strict = the share of its constraints followed.
        A failed check (judge or sandbox down) scores 0 and is counted."""
        for t in tasks:
            self._check_task(t)
        programs = self.verifier.run_programs(tasks, responses)
        out: list[tuple[float, dict[str, float]]] = []
        for t, r, prog in zip(tasks, responses, programs):
            res = self.failures.guard(self.verifier.check, t, r, prog, what="instruction sample")
            if res is None:
                out.append((0.0, {"prompt_strict": 0.0, "inst_strict": 0.0}))
                continue
            self.hacks += int(res.hacked)
            checks = list(res.checks.values())
            out.append((float(res.reward), {"prompt_strict": float(all(checks)),
                                            "inst_strict": sum(checks) / len(checks) if checks else 1.0}))
        return out

    def reward_stats(self) -> dict[str, int]:
        return {**self.failures.stats(), f"reward_hacks/{self.name}": self.hacks}
