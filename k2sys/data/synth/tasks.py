"""Agents and rubric-carrying tasks for tool-use synthesis (seed section 3.2).

An agent is a system prompt plus a tool subset drawn from the library. For each agent, tasks are
made from templates that fit its tools, from one tool call to chains (lookup -> calculate,
convert -> save a note). Each goal carries a rubric: expected tool calls, facts the final answer
must state, the notebook state it must leave, and a tool-call budget. Expected values come from
running the real tool functions, so the rubric is exact.

A goal also carries its solution `plan` (steps whose arguments may refer to earlier results);
the scripted policy follows it, a model policy ignores it, and the judge never reads it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from .tools import LOOKUP_TABLES, TOOL_LIBRARY, calculate, convert_units, format_number

__all__ = ["ExpectedCall", "Rubric", "Step", "Goal", "AgentSpec", "Task", "USER_STYLES", "generate_tasks", "fill_args"]


@dataclass(frozen=True)
class ExpectedCall:
    name: str
    args: dict          # arguments that must match (numbers within 1e-6 relative, strings case-insensitive)


@dataclass(frozen=True)
class Rubric:
    expected_calls: tuple[ExpectedCall, ...]
    answer_facts: tuple[str, ...]                  # each must appear in the final answer (numbers compared as numbers)
    final_notes: dict = field(default_factory=dict)  # notebook title -> text that must be contained
    max_tool_calls: int = 4


@dataclass(frozen=True)
class Step:
    tool: str
    args: dict          # values may be "{r[i][field]}" templates over earlier step results


@dataclass(frozen=True)
class Goal:
    request: str
    rubric: Rubric
    plan: tuple[Step, ...]
    answer_template: str   # str.format over r = the list of parsed step results


@dataclass(frozen=True)
class AgentSpec:
    name: str
    system_prompt: str
    tools: tuple[str, ...]

    def openai_tools(self) -> list[dict]:
        return [TOOL_LIBRARY[t].openai() for t in self.tools]


@dataclass(frozen=True)
class Task:
    id: str
    agent: AgentSpec
    goals: tuple[Goal, ...]
    user_style: str


_PERSONAS = (
    ("lab_assistant", "You are a careful lab assistant. Use the tools for every number; never guess."),
    ("travel_helper", "You are a concise travel helper. Check facts with the tools before answering."),
    ("study_buddy", "You are a friendly study buddy. Use tools, then explain the result in one sentence."),
)
_LENGTH_PAIRS = (("km", "mi"), ("mi", "km"), ("ft", "m"), ("in", "cm"), ("m", "ft"))
_MASS_PAIRS = (("kg", "lb"), ("lb", "kg"), ("oz", "g"))
_TEMP_PAIRS = (("C", "F"), ("F", "C"), ("C", "K"))
USER_STYLES = ("terse", "polite", "curious")


def _calc_goal(rng: random.Random) -> Goal:
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
    expr = rng.choice([f"{a}*{b}+{c}", f"({a}+{b})*{c}", f"{a}*{b}-{c}*{c}", f"{a}**2-{b}"])
    val = format_number(calculate(expr))
    return Goal(f"What is {expr}?", Rubric((ExpectedCall("calculator", {"expression": expr}),), (val,)),
                (Step("calculator", {"expression": expr}),), "{r[0][value]} is the result of " + expr + ".")


def _convert_goal(rng: random.Random) -> Goal:
    frm, to = rng.choice(_LENGTH_PAIRS + _MASS_PAIRS + _TEMP_PAIRS)
    v = rng.choice([rng.randint(1, 500), round(rng.uniform(1, 100), 1)])
    out = format_number(convert_units(v, frm, to))
    args = {"value": v, "from_unit": frm, "to_unit": to}
    return Goal(f"Convert {format_number(v)} {frm} to {to}.", Rubric((ExpectedCall("convert_units", args),), (out,)),
                (Step("convert_units", args),), f"{format_number(v)} {frm} is " + "{r[0][value]} {r[0][unit]}.")


def _lookup_calc_goal(rng: random.Random) -> Goal:
    el = rng.choice(list(LOOKUP_TABLES["element_atomic_number"]))
    k = rng.randint(2, 12)
    z = LOOKUP_TABLES["element_atomic_number"][el]
    total = format_number(z * k)
    return Goal(f"What is {k} times the atomic number of {el}?",
                Rubric((ExpectedCall("lookup", {"table": "element_atomic_number", "key": el}),
                        ExpectedCall("calculator", {"expression": f"{z}*{k}"})), (total,)),
                (Step("lookup", {"table": "element_atomic_number", "key": el}),
                 Step("calculator", {"expression": "{r[0][value]}*" + str(k)})),
                el.capitalize() + " has atomic number {r[0][value]}, so " + str(k) + " times it is {r[1][value]}.")


def _capital_goal(rng: random.Random) -> Goal:
    country = rng.choice(list(LOOKUP_TABLES["country_capital"]))
    cap, code = LOOKUP_TABLES["country_capital"][country], LOOKUP_TABLES["country_calling_code"][country]
    return Goal(f"What is the capital of {country}, and its international calling code?",
                Rubric((ExpectedCall("lookup", {"table": "country_capital", "key": country}),
                        ExpectedCall("lookup", {"table": "country_calling_code", "key": country})), (cap, str(code))),
                (Step("lookup", {"table": "country_capital", "key": country}),
                 Step("lookup", {"table": "country_calling_code", "key": country})),
                "The capital of " + country + " is {r[0][value]}; its calling code is +{r[1][value]}.")


def _convert_note_goal(rng: random.Random) -> Goal:
    frm, to = rng.choice(_TEMP_PAIRS + _LENGTH_PAIRS)
    v = rng.randint(1, 300)
    out = format_number(convert_units(v, frm, to))
    title = rng.choice(["reading", "trip", "homework", "log"])
    args = {"value": v, "from_unit": frm, "to_unit": to}
    return Goal(f"Convert {v} {frm} to {to} and save the result in my notebook under '{title}'.",
                Rubric((ExpectedCall("convert_units", args), ExpectedCall("save_note", {"title": title})), (out,),
                       final_notes={title: out}),
                (Step("convert_units", args),
                 Step("save_note", {"title": title, "text": f"{v} {frm} = " + "{r[0][value]} {r[0][unit]}"})),
                f"{v} {frm} is " + "{r[0][value]} {r[0][unit]}; saved under '" + title + "'.")


# goal maker -> tools it needs
_GOAL_MAKERS = ((_calc_goal, {"calculator"}), (_convert_goal, {"convert_units"}),
                (_lookup_calc_goal, {"lookup", "calculator"}), (_capital_goal, {"lookup"}),
                (_convert_note_goal, {"convert_units", "save_note"}))


def _sample_agent(rng: random.Random, k: int) -> AgentSpec:
    name, prompt = _PERSONAS[rng.randrange(len(_PERSONAS))]
    maker, needed = _GOAL_MAKERS[rng.randrange(len(_GOAL_MAKERS))]
    extra = [t for t in TOOL_LIBRARY if t not in needed]
    rng.shuffle(extra)
    # Tools the agent has but no goal needs: the model must learn to choose among them.
    tools = sorted(needed | set(extra[:rng.randint(0, 2)]))
    return AgentSpec(f"{name}_{k}", prompt, tuple(tools))


def generate_tasks(n: int, seed: int) -> list[Task]:
    """`n` tasks, deterministic in seed: sample an agent (persona + tool subset), then 1-2 goals its
    tools can achieve, and a user style."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    rng = random.Random(f"synth-tasks|{seed}")
    tasks = []
    for k in range(n):
        agent = _sample_agent(rng, k)
        fitting = [m for m, needed in _GOAL_MAKERS if needed <= set(agent.tools)]
        goals: list[Goal] = []
        titles: set[str] = set()
        for _ in range(rng.randint(1, 2)):
            goal = fitting[rng.randrange(len(fitting))](rng)
            if titles & set(goal.rubric.final_notes):
                continue  # a second note under the same title would overwrite the first goal's result
            titles |= set(goal.rubric.final_notes)
            goals.append(goal)
        tasks.append(Task(f"synth-{seed}-{k}", agent, tuple(goals), USER_STYLES[rng.randrange(len(USER_STYLES))]))
    return tasks


def fill_args(args: dict, results: list[Any]) -> dict:
    """Substitute "{r[i][field]}" templates in a plan step's arguments with earlier results."""
    out: dict[str, Any] = {}
    for k, v in args.items():
        out[k] = v.format(r=results) if isinstance(v, str) and "{r[" in v else v
    return out
