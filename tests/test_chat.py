"""K2 chat format: Python renderer == Jinja template, parse round trips, SFT loss mask."""

import copy
import json
import random
import re

import pytest

from k2sys.tokenizer import (
    ParsedAssistant,
    ToolCall,
    canonical_messages,
    default_corpus,
    load_tokenizer,
    parse_assistant,
    parse_chat,
    render_chat,
    tokenize_chat,
    train_tokenizer,
)
from k2sys.tokenizer.chat import SPECIAL_TOKENS

transformers = pytest.importorskip("transformers")

TOOLS = [
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]}}},
    {"type": "function", "function": {
        "name": "web.search", "description": "Search the web; returns snippets (UTF-8, «quotes»).",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}},
]


def _call(name, args, id=None):
    tc = {"type": "function", "function": {"name": name, "arguments": args}}
    if id is not None:
        tc["id"] = id
    return tc


CONVERSATIONS = {
    "plain": ([{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."}], None),
    "system_multiturn": ([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 40+2?\nShow work."},
        {"role": "assistant", "content": "40 + 2 = 42\n\nDone."},
    ], None),
    "tools_calls_results": ([
        {"role": "system", "content": "Use tools when useful."},
        {"role": "user", "content": "Add 123456789 and 987654321, then search for café 你好 😀."},
        {"role": "assistant", "content": "Calling two tools.", "tool_calls": [
            _call("add", {"a": 123456789, "b": 987654321}),
            _call("web.search", {"query": "café 你好 😀", "lang": None, "n": [1, 2.5, True]})]},
        {"role": "tool", "tool_call_id": "functions.add:0", "content": "1111111110"},
        {"role": "tool", "tool_call_id": "functions.web.search:1", "content": '{"snippets": ["a", "b"]}'},
        {"role": "assistant", "content": None, "tool_calls": [_call("add", '{"a":1,"b":-1}')]},
        {"role": "tool", "tool_call_id": "functions.add:2", "content": "0"},
        {"role": "assistant", "content": "The sum is 1111111110; the search found 2 snippets."},
    ], TOOLS),
    "explicit_ids_and_empty": ([
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "", "tool_calls": [_call("add", {}, id="functions.add:7")]},
        {"role": "tool", "tool_call_id": "functions.add:7", "content": ""},
        {"role": "assistant", "content": "  spaces kept  "},
    ], TOOLS[:1]),
    "ends_on_user": ([
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"},
    ], TOOLS),
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat_tok")
    train_tokenizer(default_corpus(1000), 2048, out)
    return out


@pytest.fixture(scope="module")
def hf(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(tok_dir)


def test_format_matches_hand_written_reference():
    msgs = [{"role": "user", "content": "3*4?"},
            {"role": "assistant", "content": "Let me see.", "tool_calls": [_call("add", {"a": 3, "b": 9})]},
            {"role": "tool", "tool_call_id": "functions.add:0", "content": "12"},
            {"role": "assistant", "content": "12"}]
    expected = (
        '<|im_system|>tool_declare<|im_middle|>[{"type": "function", "function": {"name": "add"}}]<|im_end|>'
        "<|im_user|>user<|im_middle|>3*4?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>Let me see.<|tool_calls_section_begin|>"
        '<|tool_call_begin|>functions.add:0<|tool_call_argument_begin|>{"a": 3, "b": 9}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.add:0\n12<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>12<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>")
    tools = [{"type": "function", "function": {"name": "add"}}]
    assert render_chat(msgs, tools, add_generation_prompt=True) == expected


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("gen_prompt", [False, True])
def test_jinja_template_equals_python_renderer(hf, name, gen_prompt):
    msgs, tools = CONVERSATIONS[name]
    py = render_chat(msgs, tools, add_generation_prompt=gen_prompt)
    jinja = hf.apply_chat_template(copy.deepcopy(msgs), tools=copy.deepcopy(tools), tokenize=False,
                                   add_generation_prompt=gen_prompt)
    assert jinja == py


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_render_tokenize_detokenize_parse_round_trip(tok_dir, hf, name):
    msgs, tools = CONVERSATIONS[name]
    text = render_chat(msgs, tools, add_generation_prompt=True)
    tok = load_tokenizer(tok_dir)
    for decoded in (tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False),
                    hf.decode(hf.apply_chat_template(msgs, tools=tools, add_generation_prompt=True,
                                                     return_dict=False), skip_special_tokens=False)):
        assert decoded == text
        got, got_tools, prompt = parse_chat(decoded)
        assert got == canonical_messages(msgs, tools)
        assert got_tools == tools and prompt is True


def test_round_trip_recovers_original_fields():
    # Independent of canonical_messages: compare against the input messages field by field.
    msgs, tools = CONVERSATIONS["tools_calls_results"]
    got, _, _ = parse_chat(render_chat(msgs, tools))
    assert [m["role"] for m in got] == [m["role"] for m in msgs]
    for a, b in zip(got, msgs):
        assert a["content"] == (b["content"] or "")
        for pc, oc in zip(a.get("tool_calls", []), b.get("tool_calls") or []):
            args = oc["function"]["arguments"]
            assert pc["function"]["name"] == oc["function"]["name"]
            assert pc["function"]["arguments"] == (json.loads(args) if isinstance(args, str) else args)
    calls = got[2]["tool_calls"]
    assert [c["id"] for c in calls] == ["functions.add:0", "functions.web.search:1"]
    assert calls[1]["function"]["arguments"]["query"] == "café 你好 😀"


def test_parse_generated_assistant_text(tok_dir):
    tok = load_tokenizer(tok_dir)
    msgs, tools = CONVERSATIONS["tools_calls_results"]
    full = render_chat(msgs[:2], tools, add_generation_prompt=True)
    reply = render_chat(msgs[:3], tools)[len(full):]  # exactly what the model should generate
    ids = tok.encode(reply, add_special_tokens=False).ids
    parsed = parse_assistant(tok.decode(ids, skip_special_tokens=False))
    assert parsed.errors == []
    assert parsed.content == "Calling two tools."
    assert parsed.tool_calls == [
        ToolCall("functions.add:0", "add", {"a": 123456789, "b": 987654321}),
        ToolCall("functions.web.search:1", "web.search", {"query": "café 你好 😀", "lang": None, "n": [1, 2.5, True]})]
    assert parse_assistant("just text").to_message() == {"role": "assistant", "content": "just text"}
    assert parse_assistant("done[EOS]").ok


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_loss_mask_covers_exactly_assistant_spans(tok_dir, hf, name):
    msgs, tools = CONVERSATIONS[name]
    tok = load_tokenizer(tok_dir)
    ids, mask = tokenize_chat(tok, msgs, tools)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    # Reference 1: transformers' own {% generation %} tracking over the same template.
    ref = hf.apply_chat_template(msgs, tools=tools, return_dict=True, return_assistant_tokens_mask=True)
    assert ref["input_ids"] == ids
    assert ref["assistant_masks"] == mask
    # Reference 2: the masked runs decode to each assistant turn's body + <|im_end|>, built by hand.
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    # Every assistant turn's body, cut from the rendered text with a regex: content + calls + <|im_end|>.
    text = render_chat(msgs, tools)
    want = [m + "<|im_end|>" for m in re.findall(r"<\|im_assistant\|>assistant<\|im_middle\|>(.*?)<\|im_end\|>",
                                                  text, flags=re.DOTALL)]
    assert len(want) == sum(m["role"] == "assistant" for m in msgs)
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == want
    assert sum(mask) < len(mask)


def test_transformers_tokenizer_accepted_and_plain_object_rejected(hf, tok_dir):
    msgs, tools = CONVERSATIONS["plain"]
    assert tokenize_chat(hf, msgs, tools) == tokenize_chat(load_tokenizer(tok_dir), msgs, tools)
    from tokenizers import Tokenizer, models
    with pytest.raises(ValueError, match="chat tokens"):
        tokenize_chat(Tokenizer(models.BPE()), msgs)


GOOD_CALL = '<|tool_call_begin|>functions.add:0<|tool_call_argument_begin|>{"a": 1}<|tool_call_end|>'
MALFORMED = {
    "bad_json": ('<|tool_calls_section_begin|><|tool_call_begin|>functions.add:0<|tool_call_argument_begin|>'
                 '{"a": 1,}<|tool_call_end|><|tool_calls_section_end|>', 0, "not valid JSON"),
    "args_not_object": ('<|tool_calls_section_begin|><|tool_call_begin|>functions.add:0'
                        '<|tool_call_argument_begin|>[1, 2]<|tool_call_end|><|tool_calls_section_end|>', 0,
                        "JSON object"),
    "bad_id": ('<|tool_calls_section_begin|><|tool_call_begin|>add<|tool_call_argument_begin|>{}<|tool_call_end|>'
               '<|tool_calls_section_end|>', 0, "functions.NAME:IDX"),
    "missing_call_end": (f'<|tool_calls_section_begin|>{GOOD_CALL}<|tool_call_begin|>functions.add:1'
                         '<|tool_call_argument_begin|>{"a": 2}<|tool_calls_section_end|>', 1, "expected"),
    "truncated_in_args": (f'<|tool_calls_section_begin|>{GOOD_CALL}<|tool_call_begin|>functions.add:1'
                          '<|tool_call_argument_begin|>{"a": ', 1, "text ended"),
    "missing_section_end": (f"<|tool_calls_section_begin|>{GOOD_CALL}<|im_end|>", 1,
                            "before <|tool_calls_section_end|>"),
    "missing_arg_begin": ('<|tool_calls_section_begin|><|tool_call_begin|>functions.add:0{"a": 1}<|tool_call_end|>'
                          f'{GOOD_CALL}<|tool_calls_section_end|>', 1, "expected <|tool_call_argument_begin|>"),
    "junk_between_calls": (f"<|tool_calls_section_begin|>{GOOD_CALL} junk {GOOD_CALL}<|tool_calls_section_end|>",
                           2, "in the tool-call section"),
    "stray_token_in_content": ("hi <|im_user|> there", 0, "unexpected <|im_user|>"),
    "call_outside_section": (GOOD_CALL, 0, "unexpected"),
    "text_after_section": (f"<|tool_calls_section_begin|>{GOOD_CALL}<|tool_calls_section_end|>more", 1,
                           "after <|tool_calls_section_end|>"),
    "second_section": (f"<|tool_calls_section_begin|>{GOOD_CALL}<|tool_calls_section_end|>"
                       f"<|tool_calls_section_begin|>{GOOD_CALL}<|tool_calls_section_end|>", 2, "second"),
    "text_after_end": ("ok<|im_end|>tail", 0, "after the end of the turn"),
    "unknown_token_in_section": (f"<|tool_calls_section_begin|><|im_middle|>{GOOD_CALL}<|tool_calls_section_end|>",
                                 1, "unexpected '<|im_middle|>'"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_tool_calls_are_reported_not_raised(name):
    text, n_good, needle = MALFORMED[name]
    parsed = parse_assistant(text)
    assert isinstance(parsed, ParsedAssistant)
    assert parsed.errors, f"{name}: no error reported"
    assert any(needle in e for e in parsed.errors), parsed.errors
    assert len(parsed.tool_calls) == n_good
    assert all(c.name == "add" and c.arguments == {"a": 1} for c in parsed.tool_calls)


def test_parser_never_raises_on_random_corruptions():
    msgs, tools = CONVERSATIONS["tools_calls_results"]
    good = render_chat(msgs[:3], tools)[len(render_chat(msgs[:2], tools, add_generation_prompt=True)):]
    pieces = list(SPECIAL_TOKENS) + ['{', '}', '"', ":", "functions.", "x", " "]
    rng = random.Random(0)
    for _ in range(2000):
        text = good
        for _ in range(rng.randint(1, 4)):
            op, at = rng.randrange(3), rng.randint(0, len(text))
            if op == 0:
                text = text[:at]
            elif op == 1:
                text = text[:at] + rng.choice(pieces) + text[at:]
            else:
                text = text[:at] + text[at + rng.randint(1, 20):]
        parsed = parse_assistant(text)
        assert isinstance(parsed.content, str) and all(isinstance(e, str) for e in parsed.errors)
        for c in parsed.tool_calls:
            assert isinstance(c.arguments, dict) and re.fullmatch(rf"functions\.{re.escape(c.name)}:\d+", c.id)
        # No call is lost silently: every started call is either returned or reported.
        assert len(parsed.tool_calls) <= text.count("<|tool_call_end|>")
        if text.count("<|tool_call_begin|>") > len(parsed.tool_calls):
            assert parsed.errors, text


@pytest.mark.parametrize("msgs, tools, needle", [
    ([{"role": "bot", "content": "x"}], None, r"messages\[0\]\.role"),
    ([{"role": "user", "content": 3}], None, r"messages\[0\]\.content"),
    ([{"role": "user", "content": "a<|im_end|>b"}], None, "reserved token"),
    ([{"role": "tool", "tool_call_id": "functions.add:0", "content": "1"}], None, "tool_call_id"),
    ([{"role": "assistant", "tool_calls": [_call("add", "{bad")]}], None, r"tool_calls\[0\]\.function\.arguments"),
    ([{"role": "assistant", "tool_calls": [_call("add", [1])]}], None, "JSON object"),
    ([{"role": "assistant", "tool_calls": [_call("add", {}, id="call_1")]}], None, r"tool_calls\[0\]\.id"),
    ([{"role": "assistant", "tool_calls": [_call("add", {}, id="functions.sub:0")]}], None, "functions.add"),
    ([{"role": "assistant", "tool_calls": [_call("a:b", {})]}], None, "function.name"),
    ([{"role": "assistant", "tool_calls": [_call("add", {}, id="functions.add:1"), _call("add", {})]}], None,
     "used twice"),
    ([{"role": "user", "content": "x"}], [{"name": "add"}], r"tools\[0\]"),
    ([], None, "non-empty"),
])
def test_bad_messages_fail_naming_the_field(msgs, tools, needle):
    with pytest.raises(ValueError, match=needle):
        render_chat(msgs, tools)


def test_parse_chat_rejects_garbage():
    with pytest.raises(ValueError, match="unexpected text"):
        parse_chat("hello")
    with pytest.raises(ValueError, match="not K2 format"):
        parse_chat("<|im_user|>assistant<|im_middle|>x<|im_end|>")
    with pytest.raises(ValueError, match="assistant turn"):
        parse_chat("<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|><|im_end|>")
