"""Property-based fuzzing of the chat / tool-call parsers (issue 15): model output is untrusted text.

- parse_assistant (Kimi K2) and parse_deepseek_v3 never raise on any mix of their structure tokens
  and arbitrary text; every call they return has a str name and dict arguments, and a text with
  errors is never reported ok.
- Well-formed calls round-trip: render an assistant turn with tool calls, parse it back, get the
  same names and arguments with no errors.
- parse_chat (the inverse of render_chat) raises only ValueError on arbitrary input.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2sys.tokenizer.chat import CHAT_TOKENS, parse_assistant, parse_chat, render_chat
from k2sys.tokenizer.toolcalls import DS_STRUCTURE, parse_deepseek_v3

K2_TOKENS = sorted(set(CHAT_TOKENS) | {"[EOS]", "<|im_end|>"})
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                          st.floats(allow_nan=False, allow_infinity=False, width=32), st.text(max_size=12))
json_values = st.recursive(_json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=8)
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)
arguments = st.dictionaries(st.text(min_size=1, max_size=8), json_values, max_size=4)


def _noise(tokens):
    piece = st.one_of(st.sampled_from(tokens), st.text(max_size=20),
                      st.sampled_from(["functions.f:0", "function", "\n```json\n", "\n```", "{", "}", '{"a": 1}']))
    return st.lists(piece, max_size=25).map("".join)


def _check(parsed):
    for c in parsed.tool_calls:
        assert isinstance(c.name, str) and c.name
        assert isinstance(c.arguments, dict)
        assert isinstance(c.id, str)
    assert isinstance(parsed.content, str)
    assert parsed.ok == (not parsed.errors)


@SETTINGS
@given(_noise(K2_TOKENS))
def test_kimi_k2_parser_never_raises(text):
    _check(parse_assistant(text))


@SETTINGS
@given(_noise(list(DS_STRUCTURE)))
def test_deepseek_v3_parser_never_raises(text):
    _check(parse_deepseek_v3(text))


@SETTINGS
@given(st.text(max_size=40).filter(lambda s: not any(t in s for t in K2_TOKENS)),
       st.lists(st.tuples(names, arguments), min_size=1, max_size=3))
def test_rendered_k2_tool_calls_round_trip(content, calls):
    msg = {"role": "assistant", "content": content,
           "tool_calls": [{"id": f"functions.{n}:{k}", "type": "function",
                           "function": {"name": n, "arguments": json.dumps(a)}} for k, (n, a) in enumerate(calls)]}
    text = render_chat([{"role": "user", "content": "q"}, msg])
    body = text.split("<|im_assistant|>", 1)[1]
    body = body.split("<|im_middle|>", 1)[1] if "<|im_middle|>" in body else body
    parsed = parse_assistant(body)
    assert parsed.errors == [], (body, parsed.errors)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [(n, a) for n, a in calls]


@SETTINGS
@given(_noise(K2_TOKENS))
def test_parse_chat_raises_only_value_error(text):
    try:
        messages, tools, _ = parse_chat(text)
    except ValueError:
        return
    assert isinstance(messages, list)
    assert tools is None or isinstance(tools, list)
