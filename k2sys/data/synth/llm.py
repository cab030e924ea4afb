"""LLM backends for the synthesis roles: any OpenAI-compatible `/v1/chat/completions` endpoint.

Every model role of the pipeline (tool generator, agent/task writer, user simulator, task agent,
tool simulator, judge) talks to a `ChatBackend`: `await backend.chat(messages, tools=..., json_schema=...)`
returns a `ChatReply` (text, OpenAI-shaped tool calls, token usage). `OpenAIChatBackend` speaks the
route that `k2sys serve`, SGLang, vLLM and hosted APIs share; tests pass a scripted backend instead.

    retries     transport errors, 408/409/425/429 and 5xx are retried with exponential backoff and
                jitter (Retry-After honoured); other 4xx fail at once (a bad request will not heal).
                When the retries run out, `EndpointError` is raised: the caller decides (a
                trajectory is then left unfinished, so a rerun tries it again).
    JSON roles  `ask_json` asks for one JSON object (response_format json_schema by default, so a
                grammar-constrained server such as `k2sys serve` or SGLang always returns parseable
                JSON), parses it leniently (code fences, <think> blocks, text around the object),
                validates it with jsonschema (length caps such as maxLength steer the model but
                do not refuse a reply) and an optional check, and on a bad reply re-asks with the
                reason; `MalformedReply` after the last attempt.
    usage       every reply's token counts are added to a `Usage` meter by role, for the report.

`register_backend(name, backend)` makes an in-process backend reachable by name wherever an
endpoint URL is accepted (`backend_for(name)`): how tests and in-process engines plug in.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

__all__ = ["ChatReply", "ChatBackend", "OpenAIChatBackend", "EndpointError", "MalformedReply", "Usage",
           "ask_json", "parse_json_reply", "relax", "neutralize", "register_backend", "backend_for", "RETRY_STATUS"]

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class EndpointError(RuntimeError):
    """The endpoint could not answer: `transient` after retries ran out (down, overloaded: try the
    same request later), else it refused this request (a 4xx such as a prompt it cannot take)."""

    def __init__(self, message: str, *, status: int | None = None, transient: bool = True):
        super().__init__(message)
        self.status, self.transient = status, transient


class MalformedReply(ValueError):
    """A model reply that is not what the role asked for (after re-asking); the message says why."""

    def __init__(self, reason: str, raw: str = ""):
        super().__init__(reason)
        self.raw = raw


@dataclass
class ChatReply:
    content: str
    tool_calls: list[dict] = field(default_factory=list)   # OpenAI shape; arguments usually a JSON string
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


class ChatBackend(Protocol):
    async def chat(self, messages: list[dict], *, tools: list[dict] | None = None,
                   json_schema: dict | None = None, temperature: float | None = None,
                   max_tokens: int | None = None) -> ChatReply: ...


@dataclass
class Usage:
    """Token and call counts per role (summed over replies)."""

    by_role: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, role: str, reply: ChatReply | None = None, *, error: bool = False) -> None:
        d = self.by_role.setdefault(role, {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "errors": 0})
        if reply is not None:
            d["calls"] += 1
            d["prompt_tokens"] += int(reply.prompt_tokens or 0)
            d["completion_tokens"] += int(reply.completion_tokens or 0)
        if error:
            d["errors"] += 1

    def merge(self, other: "Usage | dict") -> None:
        items = other.by_role if isinstance(other, Usage) else other
        for role, d in items.items():
            mine = self.by_role.setdefault(role, {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "errors": 0})
            for k, v in d.items():
                mine[k] = mine.get(k, 0) + int(v)

    def totals(self) -> dict[str, int]:
        out = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "errors": 0}
        for d in self.by_role.values():
            for k in out:
                out[k] += d.get(k, 0)
        return out

    def to_dict(self) -> dict:
        return {role: dict(d) for role, d in sorted(self.by_role.items())}


_BACKENDS: dict[str, ChatBackend] = {}


def register_backend(name: str, backend: ChatBackend | None) -> None:
    """Make `backend` reachable as endpoint `name` in this process (None removes it)."""
    if backend is None:
        _BACKENDS.pop(name, None)
    else:
        _BACKENDS[name] = backend


def backend_for(endpoint: str | ChatBackend, model: str | None = None, **kw: Any) -> ChatBackend:
    """A backend object for an endpoint: a registered name, an http(s) URL, or a backend (returned as is)."""
    if not isinstance(endpoint, str):
        return endpoint
    if endpoint in _BACKENDS:
        return _BACKENDS[endpoint]
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"endpoint {endpoint!r}: give an http(s) URL of an OpenAI-compatible server "
                         f"(e.g. http://127.0.0.1:30000 for `k2sys serve`); registered in-process: {sorted(_BACKENDS)}")
    return OpenAIChatBackend(endpoint, model, **kw)


class OpenAIChatBackend:
    """`/v1/chat/completions` of an OpenAI-compatible server, with retries and backoff.

    `model=None` asks the server's `/v1/models` once and uses the first id. `json_mode` says how a
    JSON role asks for JSON: "schema" (response_format json_schema, grammar-constrained where the
    server supports it), "object" (json_object) or "none" (the prompt alone asks for JSON).
    """

    def __init__(self, base_url: str, model: str | None = None, *, api_key: str | None = None,
                 temperature: float = 0.7, max_tokens: int = 1024, timeout_s: float = 120.0,
                 max_retries: int = 5, backoff_s: float = 1.0, backoff_max_s: float = 30.0,
                 json_mode: str = "schema", client: Any = None, seed: int | None = None):
        import httpx

        if json_mode not in ("schema", "object", "none"):
            raise ValueError(f"json_mode must be schema, object or none, got {json_mode!r}")
        base = base_url.rstrip("/")
        self.prefix = "" if base.endswith("/v1") else "/v1"
        self.base_url, self.model, self.temperature, self.max_tokens = base, model, temperature, max_tokens
        self.max_retries, self.backoff_s, self.backoff_max_s = max_retries, backoff_s, backoff_max_s
        self.json_mode = json_mode
        self.retries = 0            # retried attempts so far (all requests)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = client or httpx.AsyncClient(base_url=base, timeout=timeout_s, headers=headers)
        self._rng = random.Random(seed)
        self._model_lock = asyncio.Lock()

    async def aclose(self) -> None:
        await self.client.aclose()

    async def resolve_model(self) -> str:
        """The model id: as given, or the first of the server's /v1/models (asked once)."""
        if self.model:
            return self.model
        async with self._model_lock:
            if not self.model:
                r = await self._request("GET", f"{self.prefix}/models", None)
                data = r.get("data") or []
                if not data or not isinstance(data[0], dict) or not data[0].get("id"):
                    raise EndpointError(f"{self.base_url}{self.prefix}/models lists no model; pass --model")
                self.model = str(data[0]["id"])
        return self.model

    async def _request(self, method: str, path: str, body: dict | None) -> dict:
        import httpx

        delay = self.backoff_s
        for attempt in range(self.max_retries + 1):
            wait: float | None = None
            try:
                r = await self.client.request(method, path, json=body)
            except httpx.TransportError as e:   # connection refused/reset, timeouts
                problem = f"{type(e).__name__}: {e}"
            else:
                if r.status_code < 400:
                    try:
                        return r.json()
                    except ValueError:
                        problem = f"HTTP {r.status_code} with a body that is not JSON: {r.text[:200]!r}"
                else:
                    problem = f"HTTP {r.status_code}: {r.text[:300]}"
                    if r.status_code not in RETRY_STATUS:
                        raise EndpointError(f"{self.base_url}{path}: {problem}", status=r.status_code, transient=False)
                    ra = r.headers.get("retry-after")
                    if ra:
                        try:
                            wait = min(float(ra), self.backoff_max_s)
                        except ValueError:
                            wait = None
            if attempt == self.max_retries:
                raise EndpointError(f"{self.base_url}{path}: {problem} (gave up after {attempt + 1} attempts)")
            self.retries += 1
            await asyncio.sleep(wait if wait is not None else delay * (0.5 + self._rng.random()))
            delay = min(delay * 2, self.backoff_max_s)
        raise AssertionError("unreachable")

    async def chat(self, messages: list[dict], *, tools: list[dict] | None = None,
                   json_schema: dict | None = None, temperature: float | None = None,
                   max_tokens: int | None = None, tool_choice: Any = None) -> ChatReply:
        body: dict[str, Any] = {"model": await self.resolve_model(), "messages": messages,
                                "temperature": self.temperature if temperature is None else temperature,
                                "max_tokens": self.max_tokens if max_tokens is None else max_tokens}
        if tools:
            body["tools"] = tools
            if tool_choice is not None:
                body["tool_choice"] = tool_choice
        if json_schema is not None and self.json_mode == "schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "reply", "schema": json_schema}}
        elif json_schema is not None and self.json_mode == "object":
            body["response_format"] = {"type": "json_object"}
        out = await self._request("POST", f"{self.prefix}/chat/completions", body)
        try:
            choice = out["choices"][0]
            msg = choice["message"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"{self.base_url}: reply has no choices[0].message: {str(out)[:200]}") from None
        usage = out.get("usage") or {}
        return ChatReply(content=msg.get("content") or "", tool_calls=list(msg.get("tool_calls") or []),
                         prompt_tokens=int(usage.get("prompt_tokens") or 0),
                         completion_tokens=int(usage.get("completion_tokens") or 0),
                         finish_reason=choice.get("finish_reason"))


_RESERVED = re.compile(r"<\|([^|<>\s]{1,48})\|>|<｜([^｜<>\s]{1,48})｜>|\[(BOS|EOS|PAD|UNK|CLS|SEP|MASK)\]|</?s>")


def neutralize(text: str) -> str:
    """Break up strings that look like a chat template's reserved tokens (<|im_end|>, <｜tool▁calls▁begin｜>,
    [BOS], </s>): generated text quoted into a prompt or a conversation must not be read as markup (and
    servers refuse messages holding them)."""
    def sub(m: "re.Match[str]") -> str:
        t = m.group(0)
        return t[0] + " " + t[1:-1] + " " + t[-1]
    return _RESERVED.sub(sub, text) if isinstance(text, str) else text


_THINK_RE = re.compile(r"<think>.*?</think>", re.S)
_FENCE_RE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)


def parse_json_reply(text: str) -> Any:
    """The JSON value in a model reply: the whole text, a fenced block, or the first object/array in it."""
    if not isinstance(text, str):
        raise MalformedReply(f"reply is {type(text).__name__}, not text")
    s = _THINK_RE.sub("", text).strip()
    if not s:
        raise MalformedReply("empty reply", text)
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        pass
    for block in _FENCE_RE.findall(s):
        try:
            return json.loads(block.strip())
        except json.JSONDecodeError:
            continue
    # Prose around the JSON: decode from the first '{' or '[' only. Later brackets are usually inside
    # the JSON's own strings (a reply cut off mid-way), and decoding from there would return a fragment.
    starts = [i for i in (s.find("{"), s.find("[")) if i >= 0]
    if starts:
        try:
            return json.JSONDecoder().raw_decode(s, min(starts))[0]
        except json.JSONDecodeError as e:
            raise MalformedReply(f"not JSON ({e.msg} at char {e.pos})", text) from None
    raise MalformedReply("not JSON (no object or array in the reply)", text)


_LENGTH_CAPS = ("maxLength", "maxItems", "maxProperties")


def relax(schema: Any) -> Any:
    """The schema without length caps: caps steer the model (and a grammar), but a reply that runs
    long is still usable; the caller clips what it keeps."""
    if isinstance(schema, dict):
        return {k: relax(v) for k, v in schema.items() if k not in _LENGTH_CAPS}
    if isinstance(schema, list):
        return [relax(v) for v in schema]
    return schema


def _schema_problem(obj: Any, schema: dict) -> str | None:
    import jsonschema

    try:
        jsonschema.validate(obj, schema)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        return f"{where}: {e.message[:300]}"
    return None


async def ask_json(backend: ChatBackend, messages: list[dict], *, schema: dict, role: str, usage: Usage | None = None,
                   attempts: int = 2, check: Callable[[Any], None] | None = None,
                   temperature: float | None = None, max_tokens: int | None = None,
                   request_schema: dict | None = None) -> Any:
    """Ask for one JSON value matching `schema` (and `check(obj)`, which raises ValueError to refuse it).

    `request_schema` (default `schema`) is what the endpoint is asked to follow (response_format);
    it may be stricter than `schema`, which decides whether the reply is usable at all (so one bad
    item of a list can be refused later without losing the others).
    A bad reply is answered with the reason and asked again, `attempts` times in all; then
    `MalformedReply`. `EndpointError` propagates (the endpoint, not the model, failed).
    """
    convo = list(messages)
    reason, raw = "", ""
    accept = relax(schema)
    for _ in range(max(1, attempts)):
        reply = await backend.chat(convo, json_schema=request_schema if request_schema is not None else schema,
                                   temperature=temperature, max_tokens=max_tokens)
        if usage is not None:
            usage.add(role, reply)
        raw = reply.content
        try:
            obj = parse_json_reply(raw)
            problem = _schema_problem(obj, accept)
            if problem is None and check is not None:
                try:
                    check(obj)
                except ValueError as e:
                    problem = str(e)
            if problem is None:
                return obj
            reason = f"schema: {problem}"
        except MalformedReply as e:
            reason = str(e)
            if reply.finish_reason == "length":
                reason += "; the reply was cut off at max_tokens"
        if usage is not None:
            usage.add(role, error=True)
        convo = convo + [{"role": "assistant", "content": raw[:4000]},
                         {"role": "user", "content": f"That reply was not usable ({reason}). Answer again with only "
                                                     "the JSON object, following the required format exactly."}]
    raise MalformedReply(f"{role}: {reason}", raw)
