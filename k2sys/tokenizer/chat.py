"""Kimi-K2-style chat format: render, parse, and mask for SFT.

One conversation is rendered as (no BOS, no newlines between turns, matching Kimi K2):

    [<|im_system|>tool_declare<|im_middle|>{tools as JSON}<|im_end|>]      only when tools are given
    <|im_system|>system<|im_middle|>{content}<|im_end|>
    <|im_user|>user<|im_middle|>{content}<|im_end|>
    <|im_assistant|>assistant<|im_middle|>{content}
        <|tool_calls_section_begin|>
          <|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{JSON args}<|tool_call_end|> ...
        <|tool_calls_section_end|><|im_end|>                               (section only if there are calls)
    <|im_system|>tool<|im_middle|>## Return of functions.NAME:IDX\\n{content}<|im_end|>
    [<|im_assistant|>assistant<|im_middle|>]                              add_generation_prompt

IDX counts tool calls across the whole conversation (0, 1, 2, ...) unless the call carries its own
id of that form. `render_chat` (Python) and `CHAT_TEMPLATE` (Jinja, stored in tokenizer_config.json)
produce byte-identical strings; tests/test_chat.py holds them to it through transformers.
The assistant span (content + tool calls + closing <|im_end|>) is what SFT trains on: the template
marks it with {% generation %} so transformers' return_assistant_tokens_mask agrees with
`tokenize_chat`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

# Document-level tokens, then the chat tokens (Kimi K2's names). The trainer gives them ids 0..N-1
# in this order.
PAD, BOS, EOS = "[PAD]", "[BOS]", "[EOS]"
IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE = (
    "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>")
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, CALL_ARGS, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
CHAT_TOKENS = (IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE,
               SECTION_BEGIN, SECTION_END, CALL_BEGIN, CALL_ARGS, CALL_END)
SPECIAL_TOKENS = (PAD, BOS, EOS) + CHAT_TOKENS
ROLES = ("system", "user", "assistant", "tool")
# A generation ends at either of these; engines and generation_config.json use both.
STOP_TOKENS = (IM_END, EOS)

_HEADER = {"system": IM_SYSTEM, "user": IM_USER, "assistant": IM_ASSISTANT, "tool": IM_SYSTEM}
_TOOL_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_CALL_ID_RE = re.compile(r"functions\.([A-Za-z0-9_.\-]+):(\d+)")
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

# Same format as `_render`. Every line break sits next to a `-` whitespace-control marker, so the
# newlines below are layout only (transformers renders with trim_blocks and lstrip_blocks).
CHAT_TEMPLATE = """\
{%- set ns = namespace(n=0) -%}
{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>{%- endif -%}
{%- for message in messages -%}
  {%- if message.role == 'assistant' -%}
    <|im_assistant|>assistant<|im_middle|>{%- generation -%}
    {%- if message.content -%}{{ message.content }}{%- endif -%}
    {%- if message.tool_calls -%}
      <|tool_calls_section_begin|>
      {%- for tc in message.tool_calls -%}
        <|tool_call_begin|>
        {%- if tc.id -%}{{ tc.id }}{%- else -%}functions.{{ tc.function.name }}:{{ ns.n }}{%- endif -%}
        <|tool_call_argument_begin|>
        {%- if tc.function.arguments is string -%}{{ tc.function.arguments }}
        {%- else -%}{{ tc.function.arguments | tojson }}{%- endif -%}
        <|tool_call_end|>
        {%- set ns.n = ns.n + 1 -%}
      {%- endfor -%}
      <|tool_calls_section_end|>
    {%- endif -%}
    <|im_end|>{%- endgeneration -%}
  {%- elif message.role == 'tool' -%}
    <|im_system|>tool<|im_middle|>## Return of {{ message.tool_call_id }}{{ '\\n' }}{{ message.content }}<|im_end|>
  {%- elif message.role == 'user' -%}
    <|im_user|>user<|im_middle|>{{ message.content }}<|im_end|>
  {%- else -%}
    <|im_system|>{{ message.role }}<|im_middle|>{{ message.content }}<|im_end|>
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"""


@dataclass(frozen=True)
class ToolCall:
    id: str  # "functions.NAME:IDX"
    name: str
    arguments: dict

    def to_dict(self) -> dict:
        """OpenAI-style tool call, the form `render_chat` accepts."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedAssistant:
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_message(self) -> dict:
        """The assistant message in canonical form (see `canonical_messages`)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        return msg


def _dumps(obj: Any) -> str:
    # Must equal transformers' `tojson` filter: json.dumps(x, ensure_ascii=False), default separators.
    return json.dumps(obj, ensure_ascii=False)


def _check_text(value: Any, where: str, allow_none: bool = False) -> str:
    if value is None and allow_none:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {type(value).__name__}; multimodal parts are not supported")
    hit = _SPECIAL_RE.search(value)
    if hit:
        raise ValueError(f"{where} contains the reserved token {hit.group(0)!r}; remove or escape it before rendering")
    return value


def canonical_messages(messages: Sequence[dict], tools: Sequence[dict] | None = None,
                       prior_call_ids: Sequence[str] = (), first_call_index: int = 0) -> list[dict]:
    """Validate `messages` and return them in the form `parse_chat` gives back.

    Canonical form: assistant content is a string ("" for None), tool calls have their rendered id
    and dict arguments, `tool_calls` is present only when non-empty, unknown keys are dropped.
    `prior_call_ids` / `first_call_index`: calls made earlier in the conversation, when `messages`
    continue one (tool results may answer them; automatic ids keep counting from there).
    Raises ValueError naming the offending field.
    """
    if tools is not None:
        _check_tools(tools)
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    out: list[dict] = []
    seen_ids: set[str] = set(prior_call_ids)
    n_calls = first_call_index
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ValueError(f"{where} must be a dict, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role is {role!r}; allowed: {', '.join(ROLES)}")
        if role == "assistant":
            content = _check_text(msg.get("content"), f"{where}.content", allow_none=True)
            calls = []
            for j, tc in enumerate(msg.get("tool_calls") or []):
                call = _canonical_call(tc, f"{where}.tool_calls[{j}]", n_calls)
                if call.id in seen_ids:
                    raise ValueError(f"{where}.tool_calls[{j}].id {call.id!r} is used twice; ids must be unique "
                                     "(omit ids to number calls automatically)")
                seen_ids.add(call.id)
                calls.append(call)
                n_calls += 1
            out.append(ParsedAssistant(content, calls).to_message())
        elif role == "tool":
            ref = msg.get("tool_call_id")
            if ref not in seen_ids:
                raise ValueError(f"{where}.tool_call_id {ref!r} names no earlier tool call; "
                                 f"known ids: {sorted(seen_ids) or 'none'}")
            out.append({"role": "tool", "tool_call_id": ref, "content": _check_text(msg.get("content"),
                                                                                    f"{where}.content")})
        else:
            out.append({"role": role, "content": _check_text(msg.get("content"), f"{where}.content")})
    return out


def _check_tools(tools: Sequence[dict]) -> None:
    if not isinstance(tools, (list, tuple)):
        raise ValueError("tools must be a list of {'type': 'function', 'function': {...}} dicts")
    for k, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not _TOOL_NAME_RE.fullmatch(str(fn.get("name", ""))):
            raise ValueError(f"tools[{k}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}} with a "
                             "name made of letters, digits, '_', '-', '.'")
    hit = _SPECIAL_RE.search(_dumps(list(tools)))
    if hit:
        raise ValueError(f"tools contain the reserved token {hit.group(0)!r}; remove it from the tool schemas")


def _canonical_call(tc: Any, where: str, index: int) -> ToolCall:
    fn = tc.get("function") if isinstance(tc, dict) else None
    if not isinstance(fn, dict):
        raise ValueError(f"{where} must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}")
    name = fn.get("name")
    if not isinstance(name, str) or not _TOOL_NAME_RE.fullmatch(name):
        raise ValueError(f"{where}.function.name {name!r} must be letters, digits, '_', '-', '.'")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}.function.arguments is not valid JSON ({e}); pass a dict or a JSON object string")
        args_dict = parsed
    else:
        args_dict = args
    if not isinstance(args_dict, dict):
        raise ValueError(f"{where}.function.arguments must be a JSON object (dict), got {type(args_dict).__name__}")
    _check_text(args if isinstance(args, str) else _dumps(args), f"{where}.function.arguments")
    call_id = tc.get("id") or f"functions.{name}:{index}"
    m = _CALL_ID_RE.fullmatch(call_id) if isinstance(call_id, str) else None
    if m is None or m.group(1) != name:
        raise ValueError(f"{where}.id {call_id!r} must be 'functions.{name}:<int>' (or omit it to number calls)")
    return ToolCall(call_id, name, args_dict)


def _render(messages: Sequence[dict], tools: Sequence[dict] | None,
            add_generation_prompt: bool, prior_call_ids: Sequence[str] = (),
            first_call_index: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """Render and return (text, assistant character spans [start, end))."""
    canonical = canonical_messages(messages, tools, prior_call_ids, first_call_index)
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0

    def emit(s: str) -> None:
        nonlocal pos
        parts.append(s)
        pos += len(s)

    if tools:
        emit(f"{IM_SYSTEM}tool_declare{IM_MIDDLE}{_dumps(list(tools))}{IM_END}")
    for raw, msg in zip(messages, canonical):
        role = msg["role"]
        emit(f"{_HEADER[role]}{role}{IM_MIDDLE}")
        if role == "assistant":
            start = pos
            emit(msg["content"])
            raw_calls = raw.get("tool_calls") or []
            if raw_calls:
                emit(SECTION_BEGIN)
                for tc, call in zip(raw_calls, msg["tool_calls"]):
                    args = tc["function"]["arguments"]
                    # A JSON string is rendered verbatim, as the Jinja template does.
                    emit(f"{CALL_BEGIN}{call['id']}{CALL_ARGS}{args if isinstance(args, str) else _dumps(args)}"
                         f"{CALL_END}")
                emit(SECTION_END)
            emit(IM_END)
            spans.append((start, pos))
        elif role == "tool":
            emit(f"## Return of {msg['tool_call_id']}\n{msg['content']}{IM_END}")
        else:
            emit(f"{msg['content']}{IM_END}")
    if add_generation_prompt:
        emit(f"{IM_ASSISTANT}assistant{IM_MIDDLE}")
    return "".join(parts), spans


def render_chat(messages: Sequence[dict], tools: Sequence[dict] | None = None,
                add_generation_prompt: bool = False) -> str:
    """Render OpenAI-style messages (roles system/user/assistant/tool) in the K2 chat format."""
    return _render(messages, tools, add_generation_prompt)[0]


def render_continuation(messages: Sequence[dict], prior_call_ids: Sequence[str] = (),
                        add_generation_prompt: bool = True) -> str:
    """Render turns that continue a conversation already rendered (e.g. tool results and the next
    user turn in a multi-turn rollout), plus the assistant generation prompt.

    Rendering is a concatenation of self-delimited turns, so for any split of a conversation
    render_chat(a + b) == render_chat(a) + render_continuation(b, ids of a's tool calls)
    (without a tools declaration in b). `prior_call_ids` are the tool-call ids the earlier turns
    made, which tool messages here may answer.
    """
    return _render(messages, None, add_generation_prompt, prior_call_ids, len(prior_call_ids))[0]


def _backend(tokenizer: Any) -> Any:
    # Accept a `tokenizers.Tokenizer`, a k2sys TiktokenTokenizer or a transformers fast tokenizer (which wraps one).
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "token_to_id") or backend.token_to_id(IM_END) is None:
        raise ValueError("tokenizer has no K2 chat tokens; use one made by k2sys.tokenizer.train_tokenizer, or "
                         "load a checkpoint's tokenizer with k2sys.tokenizer.load_tokenizer(dir) so its chat "
                         "template is used")
    return backend


def tokenize_chat(tokenizer: Any, messages: Sequence[dict],
                  tools: Sequence[dict] | None = None) -> tuple[list[int], list[int]]:
    """Tokenize a conversation for SFT: (input_ids, loss_mask), mask 1 on assistant tokens.

    A tokenizer from `load_tokenizer` carries its checkpoint's chat format (`tokenizer.chat_format`,
    see k2sys.tokenizer.formats) and is tokenized with it. Otherwise the K2 format: assistant tokens
    are each assistant turn's content, tool-call section and closing <|im_end|>; the
    `<|im_assistant|>assistant<|im_middle|>` header is the prompt and stays 0. Every span edge is a
    special token, so no token straddles one.
    """
    fmt = getattr(tokenizer, "chat_format", None)
    if fmt is not None:
        return fmt.tokenize(messages, tools)
    return tokenize_k2(tokenizer, messages, tools)


def tokenize_k2(tokenizer: Any, messages: Sequence[dict],
                tools: Sequence[dict] | None = None) -> tuple[list[int], list[int]]:
    """`tokenize_chat` in the K2 format, whatever format the tokenizer carries."""
    text, spans = _render(messages, tools, add_generation_prompt=False)
    enc = _backend(tokenizer).encode(text, add_special_tokens=False)
    mask = [0] * len(enc.ids)
    k = 0
    for i, (start, end) in enumerate(enc.offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[i] = 1
    return list(enc.ids), mask


@dataclass(frozen=True)
class ToolSection:
    """The special tokens of one model family's tool-call section:
    SECTION_BEGIN (CALL_BEGIN head SEP body CALL_END)* SECTION_END, then an end-of-turn stop token."""

    section_begin: str
    section_end: str
    call_begin: str
    sep: str
    call_end: str
    special: frozenset
    """Every structural token of the format (a stray one in content is reported)."""
    stops: frozenset
    """End-of-turn tokens."""
    split: "re.Pattern"
    """Splits text into special tokens and the text between them."""


def parse_tool_sections(text: str, fmt: ToolSection,
                        make_call: Callable[[int, str, str, list[str]], "ToolCall | None"]) -> ParsedAssistant:
    """Content and tool calls of generated assistant text in a sectioned tool-call format. Never raises:
    malformed calls (make_call returns None after appending its reason to errors), missing end tokens,
    stray or unexpected tokens are left out of `tool_calls` and described in `errors`."""
    content: list[str] = []
    calls: list[ToolCall] = []
    errors: list[str] = []
    state = "content"  # content -> section -> head -> body -> section ... -> after -> done
    head: list[str] = []
    body: list[str] = []
    n_begun = 0  # tool calls started, so errors can name the call by position
    for piece in fmt.split.split(text):
        if not piece:
            continue
        special = piece in fmt.special
        if state == "done":
            if piece.strip():
                errors.append(f"text after the end of the turn ignored: {piece[:40]!r}")
        elif piece in fmt.stops:
            if state in ("head", "body"):
                errors.append(f"tool call {n_begun - 1}: {piece} before {fmt.call_end}; call dropped")
            if state in ("section", "head", "body"):
                errors.append(f"{piece} before {fmt.section_end}")
            state = "done"
        elif state == "content":
            if piece == fmt.section_begin:
                state = "section"
            else:
                if special:
                    errors.append(f"unexpected {piece} in content (kept)")
                content.append(piece)
        elif state == "after":
            if piece == fmt.section_begin:
                errors.append("a second tool-call section; its calls are parsed too")
                state = "section"
            elif piece.strip():
                errors.append(f"text after {fmt.section_end} ignored: {piece[:40]!r}")
        elif state == "head" and not special:
            head.append(piece)
        elif state == "head" and piece == fmt.sep:
            state = "body"
        elif state == "body" and not special:
            body.append(piece)
        elif state == "body" and piece == fmt.call_end:
            call = make_call(n_begun - 1, "".join(head), "".join(body), errors)
            if call is not None:
                calls.append(call)
            state = "section"
        else:
            if state in ("head", "body"):
                want = fmt.sep if state == "head" else fmt.call_end
                errors.append(f"tool call {n_begun - 1}: expected {want}, got {piece}; call dropped")
                state = "section"
                if piece == fmt.call_end:  # the dropped call's own end token
                    continue
            # state == "section": calls separated by optional whitespace
            if piece == fmt.call_begin:
                state, head, body, n_begun = "head", [], [], n_begun + 1
            elif piece == fmt.section_end:
                state = "after"
            elif special or piece.strip():
                errors.append(f"unexpected {piece[:40]!r} in the tool-call section")
    if state in ("head", "body"):
        errors.append(f"tool call {n_begun - 1}: text ended before {fmt.call_end}; call dropped")
    if state in ("section", "head", "body"):
        errors.append(f"text ended before {fmt.section_end}")
    return ParsedAssistant("".join(content), calls, errors)


K2_TOOLS = ToolSection(SECTION_BEGIN, SECTION_END, CALL_BEGIN, CALL_ARGS, CALL_END, frozenset(SPECIAL_TOKENS),
                       frozenset(STOP_TOKENS), _SPECIAL_RE)


def _k2_call(k: int, head: str, raw: str, errors: list[str]) -> "ToolCall | None":
    cid = head.strip()
    m = _CALL_ID_RE.fullmatch(cid)
    if m is None:
        errors.append(f"tool call {k}: id {cid[:40]!r} is not 'functions.NAME:IDX'; call dropped")
        return None
    try:
        args = json.loads(raw)
    except json.JSONDecodeError as e:
        errors.append(f"tool call {k} ({cid}): arguments are not valid JSON ({e}); call dropped")
        return None
    if not isinstance(args, dict):
        errors.append(f"tool call {k} ({cid}): arguments must be a JSON object, got {type(args).__name__}; "
                      "call dropped")
        return None
    return ToolCall(cid, m.group(1), args)


def parse_assistant(text: str) -> ParsedAssistant:
    """Recover content and tool calls from generated assistant text (special tokens not skipped).

    `text` is what follows `<|im_assistant|>assistant<|im_middle|>`, optionally ending in <|im_end|>
    or [EOS]. Never raises: malformed calls (bad id, bad JSON, missing end tokens, stray or
    unexpected tokens) are left out of `tool_calls` and described in `errors`.
    """
    return parse_tool_sections(text, K2_TOOLS, _k2_call)


_TURN_RE = re.compile(
    "(" + "|".join(re.escape(t) for t in (IM_SYSTEM, IM_USER, IM_ASSISTANT)) + r")([a-z_]+)"
    + re.escape(IM_MIDDLE) + "(.*?)(" + re.escape(IM_END) + "|\\Z)", re.DOTALL)


def parse_chat(text: str) -> tuple[list[dict], list[dict] | None, bool]:
    """Parse a rendered conversation back into (canonical messages, tools, ends_with_generation_prompt).

    The inverse of `render_chat` for well-formed text; raises ValueError on anything else (use
    `parse_assistant` for model output).
    """
    messages: list[dict] = []
    tools = None
    pos, prompt = 0, False
    for m in _TURN_RE.finditer(text):
        if m.start() != pos:
            raise ValueError(f"unexpected text at character {pos}: {text[pos:m.start()][:40]!r}")
        header, role, body, end = m.groups()
        pos = m.end()
        if not end:
            if (header, role, body) != (IM_ASSISTANT, "assistant", ""):
                raise ValueError(f"turn at character {m.start()} has no {IM_END}")
            prompt = True
        elif role == "tool_declare" and header == IM_SYSTEM and not messages and tools is None:
            tools = json.loads(body)
        elif role == "assistant" and header == IM_ASSISTANT:
            parsed = parse_assistant(body)
            if parsed.errors:
                raise ValueError(f"assistant turn at character {m.start()}: {'; '.join(parsed.errors)}")
            messages.append(parsed.to_message())
        elif role == "tool" and header == IM_SYSTEM:
            ref, sep, content = body.partition("\n")
            if not ref.startswith("## Return of ") or not sep:
                raise ValueError(f"tool turn at character {m.start()} lacks its '## Return of ID' line")
            messages.append({"role": "tool", "tool_call_id": ref[len("## Return of "):], "content": content})
        elif role in ("system", "user") and header == _HEADER[role]:
            messages.append({"role": role, "content": body})
        else:
            raise ValueError(f"turn at character {m.start()}: header {header} with role {role!r} is not K2 format")
        if prompt:
            break
    if pos != len(text):
        raise ValueError(f"unexpected text at character {pos}: {text[pos:pos + 40]!r}")
    return messages, tools, prompt
