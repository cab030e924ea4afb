"""Tool calls in generated assistant text, in each model family's own format.

Kimi K2 (the K2 format of k2sys.tokenizer.chat):
    <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}
    <|tool_call_end|> ... <|tool_calls_section_end|>                 -> chat.parse_assistant
DeepSeek-V3:
    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{json}\\n```<｜tool▁call▁end｜>
    \\n<｜tool▁call▁begin｜>...<｜tool▁calls▁end｜><｜end▁of▁sentence｜>    -> parse_deepseek_v3
No tool format (a template without tool tokens): content up to the first stop token -> parse_plain.

Every parser returns a ParsedAssistant and never raises: a malformed call is left out of
`tool_calls` and described in `errors`.
"""

from __future__ import annotations

import json
import re
from typing import Sequence

from .chat import CHAT_TOKENS, ParsedAssistant, ToolCall, parse_assistant

KIMI_K2 = "kimi_k2"
DEEPSEEK_V3 = "deepseek_v3"

# Kimi K2 uses the K2 chat tokens; its turn ends with <|im_end|> (or [EOS]).
KIMI_TOOL_TOKEN = "<|tool_calls_section_begin|>"
KIMI_STRUCTURE = CHAT_TOKENS + ("[BOS]", "[EOS]")
KIMI_END_OF_TURN = ("<|im_end|>", "[EOS]")

DS_BOS, DS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
DS_USER, DS_ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
DS_CALLS_BEGIN, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
DS_OUTPUTS_BEGIN, DS_OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
DS_OUTPUT_BEGIN, DS_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
DS_STRUCTURE = (DS_BOS, DS_EOS, DS_USER, DS_ASSISTANT, DS_CALLS_BEGIN, DS_CALLS_END, DS_CALL_BEGIN, DS_CALL_END,
                DS_SEP, DS_OUTPUTS_BEGIN, DS_OUTPUTS_END, DS_OUTPUT_BEGIN, DS_OUTPUT_END)
DS_END_OF_TURN = (DS_EOS,)
_DS_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in DS_STRUCTURE) + ")")
# NAME on its own line, then the arguments in a ```json fence.
_DS_BODY = re.compile(r"\A([^\n]*)\n```json\n(.*)\n```\Z", re.DOTALL)


def parse_kimi_k2(text: str) -> ParsedAssistant:
    """Kimi K2's format is the K2 format: see k2sys.tokenizer.chat.parse_assistant."""
    return parse_assistant(text)


def parse_plain(text: str, stop_strings: Sequence[str]) -> ParsedAssistant:
    """Content up to the first stop string; text after it is reported, not kept."""
    cut, stop = len(text), None
    for s in stop_strings:
        k = text.find(s)
        if 0 <= k < cut:
            cut, stop = k, s
    errors = []
    if stop is not None and text[cut + len(stop):].strip():
        errors.append(f"text after the end of the turn ignored: {text[cut + len(stop):][:40]!r}")
    return ParsedAssistant(text[:cut], [], errors)


def parse_deepseek_v3(text: str, stop_strings: Sequence[str] = DS_END_OF_TURN) -> ParsedAssistant:
    """Content and tool calls of DeepSeek-V3 assistant text (special tokens not skipped).

    `text` is what follows `<｜Assistant｜>` (or `<｜tool▁outputs▁end｜>`), optionally ending in a stop
    token. Calls get ids "functions.NAME:K" (K = their position in this text): DeepSeek's format has no ids.
    """
    content: list[str] = []
    calls: list[ToolCall] = []
    errors: list[str] = []
    stops = set(stop_strings) | {DS_EOS}
    split = _DS_SPLIT if stops <= set(DS_STRUCTURE) else re.compile(
        "(" + "|".join(re.escape(t) for t in sorted(set(DS_STRUCTURE) | stops, key=len, reverse=True)) + ")")
    state = "content"  # content -> section -> call_type -> call_body -> section ... -> after -> done
    ctype: list[str] = []
    body: list[str] = []
    n_begun = 0

    def finish_call() -> None:
        k, kind, raw = n_begun - 1, "".join(ctype).strip(), "".join(body)
        if kind != "function":
            errors.append(f"tool call {k}: type {kind[:40]!r} is not 'function'; call dropped")
            return
        m = _DS_BODY.fullmatch(raw)
        if m is None:
            errors.append(f"tool call {k}: expected NAME\\n```json\\n{{...}}\\n``` after {DS_SEP}, got {raw[:60]!r}; "
                          "call dropped")
            return
        name = m.group(1).strip()
        if not name or any(c.isspace() for c in name):
            errors.append(f"tool call {k}: bad function name {name[:40]!r}; call dropped")
            return
        try:
            args = json.loads(m.group(2))
        except json.JSONDecodeError as e:
            errors.append(f"tool call {k} ({name}): arguments are not valid JSON ({e}); call dropped")
            return
        if not isinstance(args, dict):
            errors.append(f"tool call {k} ({name}): arguments must be a JSON object, got {type(args).__name__}; "
                          "call dropped")
            return
        calls.append(ToolCall(f"functions.{name}:{k}", name, args))

    for piece in split.split(text):
        if not piece:
            continue
        special = piece in DS_STRUCTURE or piece in stops
        if state == "done":
            if piece.strip():
                errors.append(f"text after the end of the turn ignored: {piece[:40]!r}")
        elif piece in stops:
            if state in ("call_type", "call_body"):
                errors.append(f"tool call {n_begun - 1}: {piece} before {DS_CALL_END}; call dropped")
            if state in ("section", "call_type", "call_body"):
                errors.append(f"{piece} before {DS_CALLS_END}")
            state = "done"
        elif state == "content":
            if piece == DS_CALLS_BEGIN:
                state = "section"
            else:
                if special:
                    errors.append(f"unexpected {piece} in content (kept)")
                content.append(piece)
        elif state == "after":
            if piece == DS_CALLS_BEGIN:
                errors.append("a second tool-call section; its calls are parsed too")
                state = "section"
            elif piece.strip():
                errors.append(f"text after {DS_CALLS_END} ignored: {piece[:40]!r}")
        elif state == "call_type" and not special:
            ctype.append(piece)
        elif state == "call_type" and piece == DS_SEP:
            state = "call_body"
        elif state == "call_body" and not special:
            body.append(piece)
        elif state == "call_body" and piece == DS_CALL_END:
            finish_call()
            state = "section"
        else:
            if state in ("call_type", "call_body"):
                want = DS_SEP if state == "call_type" else DS_CALL_END
                errors.append(f"tool call {n_begun - 1}: expected {want}, got {piece}; call dropped")
                state = "section"
                if piece == DS_CALL_END:  # the dropped call's own end token
                    continue
            # state == "section": calls separated by optional whitespace (the template puts "\n")
            if piece == DS_CALL_BEGIN:
                state, ctype, body, n_begun = "call_type", [], [], n_begun + 1
            elif piece == DS_CALLS_END:
                state = "after"
            elif special or piece.strip():
                errors.append(f"unexpected {piece[:40]!r} in the tool-call section")
    if state in ("call_type", "call_body"):
        errors.append(f"tool call {n_begun - 1}: text ended before {DS_CALL_END}; call dropped")
    if state in ("section", "call_type", "call_body"):
        errors.append(f"text ended before {DS_CALLS_END}")
    return ParsedAssistant("".join(content), calls, errors)
