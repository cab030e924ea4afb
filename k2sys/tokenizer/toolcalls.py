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

from .chat import CHAT_TOKENS, ParsedAssistant, ToolCall, ToolSection, parse_assistant, parse_tool_sections

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
    stops = set(stop_strings) | {DS_EOS}
    split = _DS_SPLIT if stops <= set(DS_STRUCTURE) else re.compile(
        "(" + "|".join(re.escape(t) for t in sorted(set(DS_STRUCTURE) | stops, key=len, reverse=True)) + ")")
    fmt = ToolSection(DS_CALLS_BEGIN, DS_CALLS_END, DS_CALL_BEGIN, DS_SEP, DS_CALL_END,
                      frozenset(DS_STRUCTURE) | stops, frozenset(stops), split)
    return parse_tool_sections(text, fmt, _ds_call)


def _ds_call(k: int, head: str, raw: str, errors: list[str]) -> ToolCall | None:
    """`function<｜tool▁sep｜>NAME\n```json\n{...}\n```` -> a call with id functions.NAME:K."""
    kind = head.strip()
    if kind != "function":
        errors.append(f"tool call {k}: type {kind[:40]!r} is not 'function'; call dropped")
        return None
    m = _DS_BODY.fullmatch(raw)
    if m is None:
        errors.append(f"tool call {k}: expected NAME\\n```json\\n{{...}}\\n``` after {DS_SEP}, got {raw[:60]!r}; "
                      "call dropped")
        return None
    name = m.group(1).strip()
    if not name or any(c.isspace() for c in name):
        errors.append(f"tool call {k}: bad function name {name[:40]!r}; call dropped")
        return None
    try:
        args = json.loads(m.group(2))
    except json.JSONDecodeError as e:
        errors.append(f"tool call {k} ({name}): arguments are not valid JSON ({e}); call dropped")
        return None
    if not isinstance(args, dict):
        errors.append(f"tool call {k} ({name}): arguments must be a JSON object, got {type(args).__name__}; "
                      "call dropped")
        return None
    return ToolCall(f"functions.{name}:{k}", name, args)
