"""Pydantic models of the OpenAI request bodies: /v1/completions (`CompletionsBody`) and
/v1/chat/completions (`ChatBody`), built like bodies.GenerateBody from their api_fields tables
(COMPLETIONS, CHAT): the honoured fields typed here, the table's "no effect" and "off only" fields
added by `table_model`, so the tables and docs/engine_api.md stay the one list of fields.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BeforeValidator, model_validator

from k2sys.engine.api.api_fields import CHAT, COMPLETIONS, show
from k2sys.engine.api.bodies import Body, is_int, table_model
from k2sys.engine.errors import RequestError

__all__ = ["ChatBody", "CompletionsBody", "MAX_TOP_LOGPROBS", "check_messages", "check_tools", "message_text", "response_grammar"]

# ---- OpenAI /v1/completions and /v1/chat/completions ------------------------------------------------
# Errors name the field by its OpenAI name (`max_tokens`, `messages[1].content`): field checks raise
# their own RequestError; value ranges the sampler owns (temperature, seed, ...) are checked by
# SamplingParams when the route builds it (openai_api.sampling_from_openai renames its fields).
MAX_TOP_LOGPROBS = 20
"""OpenAI's limit on logprobs (completions) and top_logprobs (chat)."""


def _typed(name: str, ann: Any, ok: Any, what: str, fix: str) -> Any:
    """A field of type `ann` (or null) refused, unless ok(value), as `<name>: must be <what>, got <v>; <fix>`."""
    def check(v: Any) -> Any:
        if v is None or ok(v):
            return v
        raise RequestError(f"{name}: must be {what}, got {show(v)}; {fix}")
    return Annotated[ann | None, BeforeValidator(check)]


def _number(name: str) -> Any:
    return _typed(name, float, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "number",
                  "send a number")


def _int(name: str, lo: int | None = None, hi: int | None = None) -> Any:
    if lo is None:
        return _typed(name, int, is_int, "int", "send an integer")
    top = "inf" if hi is None else hi
    return _typed(name, int, lambda v: is_int(v) and v >= lo and (hi is None or v <= hi),
                  f"an int in [{lo}, {top}]", f"send an integer from {lo} to {top}")


def _bool(name: str) -> Any:
    return _typed(name, bool, lambda v: isinstance(v, bool), "true or false", "send true or false")


def _str(name: str) -> Any:
    return _typed(name, str, lambda v: isinstance(v, str), "a string", "send a string")


def _str_or_strs(name: str) -> Any:
    return _typed(name, str | list[str], lambda v: isinstance(v, str) or (
        isinstance(v, list) and all(isinstance(s, str) for s in v)), "a string or a list of strings", "send text")


def _logit_bias(v: Any) -> Any:
    if v is None:
        return v
    if not isinstance(v, dict):
        raise RequestError(f"logit_bias: must be an object {{token_id: bias}}, got {show(v)}; send e.g. {{\"50256\": -100}}")
    bad = {k: x for k, x in v.items() if isinstance(x, bool) or not isinstance(x, (int, float)) or not -100 <= x <= 100}
    if bad:
        raise RequestError(f"logit_bias: values must be numbers in [-100, 100], got {show(bad)}; send biases in that range")
    return v


def _stream_options(v: Any) -> Any:
    if v is None:
        return v
    if not isinstance(v, dict):
        raise RequestError(f"stream_options: must be an object, got {show(v)}; send {{\"include_usage\": true}}")
    unknown = sorted(str(k)[:40] for k in set(v) - {"include_usage", "continuous_usage_stats", "include_obfuscation"})
    if unknown:
        raise RequestError(f"stream_options: unknown field(s) {unknown}; only include_usage is honoured")
    if v.get("include_usage") is not None and not isinstance(v["include_usage"], bool):
        raise RequestError(f"stream_options.include_usage: must be true or false, got {show(v['include_usage'])}; "
                           "send true or false")
    if v.get("continuous_usage_stats"):
        raise RequestError("stream_options.continuous_usage_stats=true is not supported; usage comes in the last chunk")
    if v.get("include_obfuscation"):
        raise RequestError("stream_options.include_obfuscation=true is not supported; omit it or send false")
    return v


def response_grammar(rf: Any) -> tuple[str, str] | None:
    """OpenAI response_format -> (grammar kind, source), None for plain text (as SGLang maps it)."""
    if rf is None:
        return None
    shape = "send {'type': 'text' | 'json_object' | 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}"
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise RequestError(f"response_format: must be an object with a type, got {show(rf)}; {shape}")
    kind = rf["type"]
    extra = sorted(str(k)[:40] for k in set(rf) - {"type", "json_schema"})
    if extra:
        raise RequestError(f"response_format: unknown field(s) {extra}; {shape}")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_schema", '{"type": "object"}'
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise RequestError(f"response_format.json_schema: must be an object, got {show(js)}; {shape}")
        unknown = sorted(str(k)[:40] for k in set(js) - {"name", "schema", "strict", "description", "schema_"})
        if unknown:
            raise RequestError(f"response_format.json_schema: unknown field(s) {unknown}; "
                               "use name, schema, strict, description")
        schema = js.get("schema", js.get("schema_"))
        if not isinstance(schema, dict):
            raise RequestError("response_format.json_schema.schema: must be a JSON schema object; send a JSON schema")
        return "json_schema", json.dumps(schema)
    raise RequestError(f"response_format.type={kind!r} is not supported; use text, json_object or json_schema")


def _response_format(v: Any) -> Any:
    response_grammar(v)
    return v


_TEMPERATURE, _TOP_P, _MIN_P = _number("temperature"), _number("top_p"), _number("min_p")
_FREQ, _PRES, _REP = _number("frequency_penalty"), _number("presence_penalty"), _number("repetition_penalty")
_N, _SEED, _TOP_K, _MIN_TOKENS = _int("n"), _int("seed"), _int("top_k"), _int("min_tokens")
_STOP, _STOP_REGEX = _str_or_strs("stop"), _str_or_strs("stop_regex")
_STOP_IDS = _typed("stop_token_ids", list[int], lambda v: isinstance(v, list) and all(is_int(t) for t in v),
                   "a list of token ids", "send a list of ints")
_IGNORE_EOS, _NO_STOP_TRIM, _SKIP = _bool("ignore_eos"), _bool("no_stop_trim"), _bool("skip_special_tokens")
_STREAM, _RETURN_IDS, _ECHO = _bool("stream"), _bool("return_token_ids"), _bool("echo")
_REGEX, _EBNF, _JSON_SCHEMA = _str("regex"), _str("ebnf"), _str("json_schema")
_KEY, _CACHE_SALT, _CHAT_RID = _str("extra_key"), _str("cache_salt"), _str("rid")
_BIAS = Annotated[dict[str, Any] | None, BeforeValidator(_logit_bias)]
_STREAM_OPTIONS = Annotated[dict[str, Any] | None, BeforeValidator(_stream_options)]
_RESPONSE_FORMAT = Annotated[dict[str, Any] | None, BeforeValidator(_response_format)]
_LOGPROBS_K = _int("logprobs", 0, MAX_TOP_LOGPROBS)
_COMPLETION_MAX = _int("max_tokens", 0)


class _OpenAIFields(Body):
    """The sampling fields OpenAI's two bodies and SGLang's additions to them share."""
    temperature: _TEMPERATURE = None
    top_p: _TOP_P = None
    top_k: _TOP_K = None
    min_p: _MIN_P = None
    n: _N = None
    seed: _SEED = None
    stop: _STOP = None
    stop_regex: _STOP_REGEX = None
    stop_token_ids: _STOP_IDS = None
    min_tokens: _MIN_TOKENS = None
    frequency_penalty: _FREQ = None
    presence_penalty: _PRES = None
    repetition_penalty: _REP = None
    logit_bias: _BIAS = None
    ignore_eos: _IGNORE_EOS = None
    no_stop_trim: _NO_STOP_TRIM = None
    regex: _REGEX = None
    ebnf: _EBNF = None
    response_format: _RESPONSE_FORMAT = None
    stream: _STREAM = None
    stream_options: _STREAM_OPTIONS = None
    return_token_ids: _RETURN_IDS = None
    extra_key: _KEY = None
    cache_salt: _CACHE_SALT = None

    @model_validator(mode="after")
    def _one_grammar(self) -> _OpenAIFields:
        if self.response_format is not None and response_grammar(self.response_format) is not None:
            clash = [g for g in ("regex", "ebnf", "json_schema") if getattr(self, g, None) is not None]
            if clash:
                raise RequestError(f"response_format: give it or {clash[0]}, not both; drop one of them")
        return self

    @property
    def include_usage(self) -> bool:
        """stream_options.include_usage: a last chunk carries the usage."""
        return bool((self.stream_options or {}).get("include_usage"))

    @property
    def salt(self) -> str | None:
        """extra_key and cache_salt both namespace the prefix cache (as in SGLang)."""
        parts = (self.extra_key or "", self.cache_salt or "")
        return "\x00".join(parts) if any(parts) else None


def _completion_prompt(v: Any) -> Any:
    if isinstance(v, str) or (isinstance(v, list) and v and (type(v[0]) is int or all(isinstance(p, (str, list))
                                                                                     for p in v))):
        return v
    raise RequestError(f"prompt: must be a string, a list of strings, token ids, or a list of token id lists, got "
                       f"{show(v)}; send text or token ids")


def _completion_rid(v: Any) -> Any:
    if v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(r, str) for r in v)):
        return v
    raise RequestError(f"rid: must be a string or a list of strings with one per prompt, got {show(v)}; send strings")


_COMPLETION_PROMPT = Annotated[str | list[Any], BeforeValidator(_completion_prompt)]
_COMPLETION_RID = Annotated[str | list[str] | None, BeforeValidator(_completion_rid)]


class _CompletionsFields(_OpenAIFields):
    """OpenAI's CompletionCreateParams (+ SGLang's CompletionRequest): the fields the native engine reads.
    Token-id prompts are checked against the vocabulary and the context by the route (they need the engine)."""
    KIND = "completions"
    prompt: _COMPLETION_PROMPT
    echo: _ECHO = None
    logprobs: _LOGPROBS_K = None
    """0-20 alternatives per token (null: no log-probs)."""
    max_tokens: _COMPLETION_MAX = None
    """null = 16 (OpenAI's default), stopped at the context."""
    json_schema: _JSON_SCHEMA = None
    skip_special_tokens: _SKIP = None
    rid: _COMPLETION_RID = None
    """One prompt keeps it; a batch: a prefix ("rid-i") or one per prompt."""

    @model_validator(mode="after")
    def _cross(self) -> _CompletionsFields:
        if self.max_tokens == 0 and not self.echo:
            raise RequestError("max_tokens: must be >= 1 (0 only with echo, for the prompt's log-probs); "
                               "send max_tokens >= 1, or echo=true")
        k = len(self.prompts)
        if isinstance(self.rid, list) and len(self.rid) != k:
            raise RequestError(f"rid: {len(self.rid)} entries for {k} prompts; send a string or one per prompt")
        return self

    @property
    def prompts(self) -> list[Any]:
        """One entry per prompt: a string or a list of token ids."""
        p = self.prompt
        return [p] if isinstance(p, str) or type(p[0]) is int else list(p)

    @property
    def rids(self) -> list[str | None]:
        k, rid = len(self.prompts), self.rid
        if isinstance(rid, str):  # one prompt keeps it; a batch gets "rid-i" (as /generate)
            return [rid] if k == 1 else [f"{rid}-{i}" for i in range(k)]
        return list(rid) if rid is not None else [None] * k


CompletionsBody = table_model(_CompletionsFields, COMPLETIONS)
"""The /v1/completions body: every field of api_fields.COMPLETIONS, nothing else."""


def check_tools(tools: Any) -> list | None:
    """Chat tools: a list of objects (what each function declares is read by the chat format)."""
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RequestError(f"tools: must be a list of {{'type': 'function', 'function': {{...}}}} objects, got "
                           f"{show(tools)}; send one object per function")
    return tools


def message_text(content: Any, where: str) -> Any:
    """A message's content: a string, null, or a list of text parts -> their text, concatenated (as
    Kimi K2's template renders text parts)."""
    if not isinstance(content, list):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            raise RequestError(f"{where}[{j}]: content part of type {kind!r} is not supported; the native engine "
                               "takes text parts ({'type': 'text', 'text': ...}) only")
    return "".join(texts)


def check_messages(messages: Any) -> Any:
    """Chat messages: a non-empty list of objects whose content is a string, null or text parts
    (roles and tool calls are checked by the chat format that renders them)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(f"messages: must be a non-empty list of {{role, content}} objects, got {show(messages)}; "
                           "send at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}]: must be an object with role and content, got {show(m)}; "
                               "send {'role': ..., 'content': ...}")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise RequestError(f"messages[{i}].content: must be a string or a list of text parts, got {show(content)}; "
                               "send text")
        message_text(content, f"messages[{i}].content")
    return messages


def _tool_choice(v: Any) -> Any:
    if v is None or v in ("auto", "none", "required"):
        return v
    fn = v.get("function") if isinstance(v, dict) else None
    if isinstance(v, dict) and v.get("type") == "function" and isinstance(fn, dict) and isinstance(fn.get("name"), str):
        return v
    raise RequestError(f"tool_choice: must be 'auto', 'none', 'required' or {{'type': 'function', 'function': "
                       f"{{'name': ...}}}}, got {show(v)}; send one of them")


_MESSAGES = Annotated[list[dict[str, Any]], BeforeValidator(check_messages)]
_TOOLS = Annotated[list[dict[str, Any]] | None, BeforeValidator(check_tools)]
_TOOL_CHOICE_CHAT = Annotated[Any, BeforeValidator(_tool_choice)]
_CHAT_LOGPROBS, _PARALLEL, _PROMPT_IDS = _bool("logprobs"), _bool("parallel_tool_calls"), _bool("return_prompt_token_ids")
_TOP_LOGPROBS = _int("top_logprobs", 0, MAX_TOP_LOGPROBS)
_CHAT_MAX, _CHAT_MAX_COMPLETION = _int("max_tokens", 1), _int("max_completion_tokens", 1)


class _ChatFields(_OpenAIFields):
    """OpenAI's chat CompletionCreateParams (+ SGLang's ChatCompletionRequest): the fields the native
    engine reads. Messages are rendered by the model's chat format (its roles and tool calls), which
    tool_choice's markup also needs."""
    KIND = "chat.completions"
    messages: _MESSAGES
    tools: _TOOLS = None
    tool_choice: _TOOL_CHOICE_CHAT = None
    """null = auto."""
    parallel_tool_calls: _PARALLEL = None
    """null = true."""
    logprobs: _CHAT_LOGPROBS = None
    top_logprobs: _TOP_LOGPROBS = None
    max_tokens: _CHAT_MAX = None
    max_completion_tokens: _CHAT_MAX_COMPLETION = None
    """Takes precedence over max_tokens; both null: up to the context."""
    return_prompt_token_ids: _PROMPT_IDS = None
    rid: _CHAT_RID = None

    @model_validator(mode="after")
    def _cross(self) -> _ChatFields:
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs: needs logprobs=true; send logprobs=true or drop top_logprobs")
        choice = self.tool_choice
        if choice == "required" or isinstance(choice, dict):
            if not self.tools:
                raise RequestError(f"tool_choice={choice!r} needs tools; send tools, or tool_choice='auto'")
            names = []
            for k, t in enumerate(self.tools):
                fn = t.get("function")
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise RequestError(f"tools[{k}]: must be {{'type': 'function', 'function': {{'name': ...}}}}, got "
                                       f"{show(t)}; name each function")
                names.append(fn["name"])
            if isinstance(choice, dict) and choice["function"]["name"] not in names:
                raise RequestError(f"tool_choice.function.name {choice['function']['name']!r} is not one of the tools "
                                   f"{sorted(names)}; name one of them")
            clash = [g for g in ("response_format", "regex", "ebnf") if getattr(self, g) is not None]
            if clash:
                raise RequestError(f"tool_choice={choice!r} constrains the reply itself; drop {clash[0]}")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


ChatBody = table_model(_ChatFields, CHAT)
"""The /v1/chat/completions body: every field of api_fields.CHAT, nothing else."""
