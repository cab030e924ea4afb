"""Synthetic tools by domain hierarchy (seed section 3.1): category -> domains -> tools, by an LLM.

    for each category (e.g. "financial trading", "robot control"):
        the LLM names `n_domains` concrete application domains          (one JSON reply)
        for each domain: the LLM designs `n_tools` tools                 (one JSON reply)
            name, description (what it does, what it returns, its side effects), parameters
            (a JSON schema with a type and a description for every argument)
    -> candidate LibraryTools (source "synthetic", category, domain, provenance) for ToolLibrary.add,
       which validates them with jsonschema and drops near-duplicates.

A reply that is not the requested JSON is asked again once with the reason (llm.ask_json); a
domain whose replies stay malformed is skipped and reported; one bad tool in a reply is
reported and the others kept. Nothing here is fatal to the run.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from .library import LibraryTool, ToolSchemaError, validate_tool
from .llm import ChatBackend, EndpointError, MalformedReply, Usage, ask_json, neutralize

__all__ = ["DEFAULT_CATEGORIES", "ToolGenReport", "synthesize_tools", "DOMAINS_SCHEMA", "TOOLS_SCHEMA"]

DEFAULT_CATEGORIES = (
    "financial trading", "software applications", "robot control", "healthcare", "travel and logistics",
    "e-commerce", "education", "smart home and IoT", "data analysis", "media and entertainment",
    "human resources", "scientific research",
)

DOMAINS_SCHEMA = {
    "type": "object",
    "properties": {"domains": {"type": "array", "minItems": 1, "maxItems": 20, "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 80},
                       "description": {"type": "string", "maxLength": 400}},
        "required": ["name", "description"]}}},
    "required": ["domains"],
}

_PARAM_SCHEMA = {
    "type": "object",
    "properties": {"type": {"const": "object"},
                   "properties": {"type": "object", "additionalProperties": {
                       "type": "object",
                       "properties": {"type": {"type": "string", "enum": ["string", "number", "integer", "boolean",
                                                                          "array", "object"]},
                                      "description": {"type": "string", "maxLength": 300}},
                       "required": ["type", "description"]}},
                   "required": {"type": "array", "items": {"type": "string"}}},
    "required": ["type", "properties", "required"],
}

TOOLS_SCHEMA = {   # asked of the endpoint (a grammar-constrained server then only writes such tools)
    "type": "object",
    "properties": {"tools": {"type": "array", "minItems": 1, "maxItems": 20, "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,63}$"},
                       "description": {"type": "string", "minLength": 10, "maxLength": 600},
                       "parameters": _PARAM_SCHEMA},
        "required": ["name", "description", "parameters"]}}},
    "required": ["tools"],
}

_TOOLS_ACCEPT = {  # what makes a reply usable; each tool is then validated on its own (validate_tool)
    "type": "object",
    "properties": {"tools": {"type": "array", "minItems": 1, "items": {"type": "object"}}},
    "required": ["tools"],
}

_DOMAINS_PROMPT = """You design the tool ecosystem of AI agents. Category: "{category}".
Name {n} distinct, concrete application domains within this category (for example, for "financial
trading": "equity order execution", "crypto portfolio tracking"). Each domain needs its own tools.
{avoid}Reply with only JSON: {{"domains": [{{"name": "...", "description": "one sentence"}}]}}"""

_TOOLS_PROMPT = """Design {n} tools (functions an AI agent can call) for the domain "{domain}" ({description})
in the category "{category}". Each tool does one clear operation of a real service in this domain.
For each tool give:
- name: snake_case, specific (e.g. "place_limit_order", not "do_action")
- description: what it does, what it returns, and any side effect (what state it changes)
- parameters: a JSON schema {{"type": "object", "properties": {{...}}, "required": [...]}} in which every
  argument has a "type" and a "description" (add "enum" for closed sets, "format" for dates)
Make the tools work together (e.g. one creates an item, another looks it up by the id it returns).
{avoid}Reply with only JSON: {{"tools": [{{"name": "...", "description": "...", "parameters": {{...}}}}]}}"""


@dataclass
class ToolGenReport:
    domains: list[dict] = field(default_factory=list)          # {"category", "domain", "tools": n}
    malformed: list[str] = field(default_factory=list)         # what could not be parsed, and where
    invalid: list[tuple[str, str]] = field(default_factory=list)
    endpoint_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"domains": len(self.domains), "malformed": self.malformed[:50], "invalid": self.invalid[:50],
                "endpoint_errors": self.endpoint_errors[:20], "per_domain": self.domains}


def _check_tools(obj: Any) -> None:
    names = [t.get("name") for t in obj.get("tools", [])]
    if len(set(names)) != len(names):
        raise ValueError("two tools share a name")


async def _domain_tools(llm: ChatBackend, category: str, dom: dict, n_tools: int, usage: Usage,
                        rep: ToolGenReport, model_tag: dict, existing: Sequence[str]) -> list[LibraryTool]:
    avoid = f"Existing tools you must not repeat: {', '.join(existing[:60])}.\n" if existing else ""
    prompt = _TOOLS_PROMPT.format(n=n_tools, domain=dom["name"], description=dom["description"], category=category,
                                  avoid=avoid)
    try:
        obj = await ask_json(llm, [{"role": "user", "content": prompt}], schema=_TOOLS_ACCEPT,
                             request_schema=TOOLS_SCHEMA, role="toolgen", usage=usage, check=_check_tools)
    except MalformedReply as e:
        rep.malformed.append(f"tools of {category}/{dom['name']}: {e}")
        return []
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = []
    for raw in obj["tools"]:
        if raw.get("parameters") is None:   # a tool without arguments
            raw = {**raw, "parameters": {"type": "object", "properties": {}}}
        try:
            if isinstance(raw.get("description"), str):
                raw = {**raw, "description": neutralize(raw["description"])}
            out.append(validate_tool({**raw, "source": "synthetic", "category": category, "domain": dom["name"],
                                      "provenance": {**model_tag, "created": now, "category": category,
                                                     "domain": dom["name"], "domain_description": dom["description"]}},
                                     strict=True))
        except ToolSchemaError as e:
            rep.invalid.append((str(raw.get("name")), str(e)))
    rep.domains.append({"category": category, "domain": dom["name"], "tools": len(out)})
    return out


async def synthesize_tools(llm: ChatBackend, categories: Sequence[str] = DEFAULT_CATEGORIES, *, n_domains: int = 3,
                           n_tools: int = 5, concurrency: int = 8, usage: Usage | None = None,
                           model_tag: dict | None = None, existing_names: Sequence[str] = (),
                           existing_domains: dict[str, list[str]] | None = None,
                           progress: Any = None) -> tuple[list[LibraryTool], ToolGenReport]:
    """Candidate synthetic tools for every category; see the module doc. Endpoint failures of one
    category or domain are reported and the rest go on."""
    usage = usage if usage is not None else Usage()
    model_tag = dict(model_tag or {})
    rep = ToolGenReport()
    sem = asyncio.Semaphore(max(1, concurrency))

    async def domains_of(cat: str) -> list[dict]:
        seen = (existing_domains or {}).get(cat, [])
        avoid = f"Domains that already exist (name new ones): {', '.join(seen)}.\n" if seen else ""
        async with sem:
            try:
                obj = await ask_json(llm, [{"role": "user", "content": _DOMAINS_PROMPT.format(
                    category=cat, n=n_domains, avoid=avoid)}], schema=DOMAINS_SCHEMA, role="toolgen", usage=usage)
            except MalformedReply as e:
                rep.malformed.append(f"domains of {cat}: {e}")
                return []
            except EndpointError as e:
                rep.endpoint_errors.append(f"domains of {cat}: {e}")
                return []
        uniq, names = [], set(seen)
        for d in obj["domains"][:n_domains]:
            key = d["name"].strip()
            if key and key.casefold() not in {n.casefold() for n in names}:
                names.add(key)
                uniq.append({"name": neutralize(key[:80]), "description": neutralize(d["description"].strip()[:400])})
        return uniq

    all_domains = await asyncio.gather(*(domains_of(c) for c in categories))

    async def tools_of(cat: str, dom: dict) -> list[LibraryTool]:
        async with sem:
            try:
                got = await _domain_tools(llm, cat, dom, n_tools, usage, rep, model_tag, list(existing_names))
            except EndpointError as e:
                rep.endpoint_errors.append(f"tools of {cat}/{dom['name']}: {e}")
                got = []
        if progress is not None:
            progress.step(ok=bool(got))
        return got

    jobs = [(c, d) for c, doms in zip(categories, all_domains) for d in doms]
    if progress is not None:
        progress.add_total(len(jobs))
    results = await asyncio.gather(*(tools_of(c, d) for c, d in jobs))
    return [t for r in results for t in r], rep
