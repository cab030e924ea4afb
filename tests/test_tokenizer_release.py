"""Tokenizers and chat formats of released checkpoints (Kimi-K2 tiktoken layout, DeepSeek-V3 tokenizer.json).

Every tokenizer directory is built here, in the release layout: a small BPE trained by the test
(written as tiktoken.model, or as tokenizer.json), tokenizer_config.json with the release's special
tokens, and a chat template in the style of the release. References are independent of k2sys: a
`tiktoken.Encoding` built here, transformers' tiktoken converter, and transformers'
`apply_chat_template` (text, ids and `return_assistant_tokens_mask` on {% generation %} templates).
"""

import base64
import collections
import copy
import json
import re

import pytest

from k2sys.tokenizer import (
    K2ChatFormat,
    TemplateChatFormat,
    TiktokenTokenizer,
    chat_format_for,
    load_tokenizer,
    tokenize_chat,
)
from k2sys.tokenizer.chat import CHAT_TEMPLATE

tiktoken = pytest.importorskip("tiktoken")
transformers = pytest.importorskip("transformers")

# The split pattern of Kimi-K2's tokenization_kimi.py, written out here as the reference.
KIMI_PATTERN = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# Kimi-K2's special-token block: offset from the BPE size -> (name, special flag). The tool-call
# markers are declared non-special (decode with skip_special_tokens keeps them).
KIMI_ADDED = {0: ("[BOS]", True), 1: ("[EOS]", True), 2: ("<|im_end|>", True), 3: ("<|im_user|>", True),
              4: ("<|im_assistant|>", True), 6: ("<|start_header_id|>", True), 7: ("<|end_header_id|>", True),
              9: ("[EOT]", True), 10: ("<|im_system|>", True), 11: ("<|tool_calls_section_begin|>", False),
              12: ("<|tool_calls_section_end|>", False), 13: ("<|tool_call_begin|>", False),
              14: ("<|tool_call_argument_begin|>", False), 15: ("<|tool_call_end|>", False),
              17: ("<|im_middle|>", True), 254: ("[UNK]", True), 255: ("[PAD]", True)}

# A Kimi-K2-Instruct style template: default system prompt, role names, tool declarations, tool calls
# with their ids, "## Return of" tool results, and no <|im_end|> after the last turn unless a
# generation prompt follows.
KIMI_TEMPLATE = """\
{%- if tools -%}
  <|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>
{%- endif -%}
{%- for message in messages -%}
  {%- if loop.first and messages[0]['role'] != 'system' -%}
    <|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
  {%- endif -%}
  {%- set role_name = message.get('name') or message['role'] -%}
  {%- if message['role'] == 'user' -%}
    <|im_user|>{{ role_name }}<|im_middle|>
  {%- elif message['role'] == 'assistant' -%}
    <|im_assistant|>{{ role_name }}<|im_middle|>
  {%- else -%}
    <|im_system|>{{ role_name }}<|im_middle|>
  {%- endif -%}
  {%- if message['role'] == 'assistant' and message.get('tool_calls') -%}
    {%- if message['content'] -%}{{ message['content'] }}{%- endif -%}
    <|tool_calls_section_begin|>
    {%- for tool_call in message['tool_calls'] -%}
      <|tool_call_begin|>{{ tool_call['id'] }}<|tool_call_argument_begin|>{% if tool_call['function']['arguments'] is string %}{{ tool_call['function']['arguments'] }}{% else %}{{ tool_call['function']['arguments'] | tojson }}{% endif %}<|tool_call_end|>
    {%- endfor -%}
    <|tool_calls_section_end|>
  {%- elif message['role'] == 'tool' -%}
    ## Return of {{ message.tool_call_id }}
{{ message['content'] }}
  {%- elif message['content'] is string -%}
    {{ message['content'] }}
  {%- endif -%}
  {% if (loop.last and add_generation_prompt) or not loop.last %}<|im_end|>{% endif %}
{%- endfor -%}
{%- if add_generation_prompt -%}
  <|im_assistant|>assistant<|im_middle|>
{%- endif -%}"""

# The same output, with the assistant's part marked for transformers' return_assistant_tokens_mask.
KIMI_TEMPLATE_GEN = """\
{%- if tools -%}
  <|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>
{%- endif -%}
{%- for message in messages -%}
  {%- if loop.first and messages[0]['role'] != 'system' -%}
    <|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
  {%- endif -%}
  {%- set role_name = message.get('name') or message['role'] -%}
  {%- set close = (loop.last and add_generation_prompt) or not loop.last -%}
  {%- if message['role'] == 'assistant' -%}
    <|im_assistant|>{{ role_name }}<|im_middle|>
    {%- generation -%}
    {%- if message['content'] is string -%}{{ message['content'] }}{%- endif -%}
    {%- if message.get('tool_calls') -%}
      <|tool_calls_section_begin|>
      {%- for tool_call in message['tool_calls'] -%}
        <|tool_call_begin|>{{ tool_call['id'] }}<|tool_call_argument_begin|>{% if tool_call['function']['arguments'] is string %}{{ tool_call['function']['arguments'] }}{% else %}{{ tool_call['function']['arguments'] | tojson }}{% endif %}<|tool_call_end|>
      {%- endfor -%}
      <|tool_calls_section_end|>
    {%- endif -%}
    {%- if close -%}<|im_end|>{%- endif -%}
    {%- endgeneration -%}
  {%- else -%}
    {%- if message['role'] == 'user' -%}<|im_user|>{%- else -%}<|im_system|>{%- endif -%}
    {{ role_name }}<|im_middle|>
    {%- if message['role'] == 'tool' -%}
      ## Return of {{ message.tool_call_id }}{{ '\\n' }}{{ message['content'] }}
    {%- else -%}{{ message['content'] }}{%- endif -%}
    {%- if close -%}<|im_end|>{%- endif -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  <|im_assistant|>assistant<|im_middle|>
{%- endif -%}"""

DS = {"bos": "<｜begin▁of▁sentence｜>", "eos": "<｜end▁of▁sentence｜>", "user": "<｜User｜>", "asst": "<｜Assistant｜>",
      "calls_begin": "<｜tool▁calls▁begin｜>", "calls_end": "<｜tool▁calls▁end｜>", "call_begin": "<｜tool▁call▁begin｜>",
      "call_end": "<｜tool▁call▁end｜>", "sep": "<｜tool▁sep｜>", "outs_begin": "<｜tool▁outputs▁begin｜>",
      "outs_end": "<｜tool▁outputs▁end｜>", "out_begin": "<｜tool▁output▁begin｜>", "out_end": "<｜tool▁output▁end｜>"}

# A DeepSeek-V3 style template: BOS + joined system prompts, <｜User｜>/<｜Assistant｜> turns closed by
# <｜end▁of▁sentence｜>, tool calls as type<｜tool▁sep｜>name + a ```json fence, grouped tool outputs,
# and the answer after tool outputs directly following <｜tool▁outputs▁end｜>.
DS_TEMPLATE = """\
{%- set ns = namespace(system_prompt='', is_first_sp=true, is_tool=false, is_output_first=true) -%}
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}
    {%- if ns.is_first_sp -%}{%- set ns.system_prompt = message['content'] -%}{%- set ns.is_first_sp = false -%}
    {%- else -%}{%- set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] -%}{%- endif -%}
  {%- endif -%}
{%- endfor -%}
{{ bos_token }}{{ ns.system_prompt }}
{%- for message in messages -%}
  {%- if message['role'] == 'user' -%}
    {%- set ns.is_tool = false -%}{{ '<｜User｜>' + message['content'] }}
  {%- elif message['role'] == 'assistant' and 'tool_calls' in message -%}
    {%- set ns.is_tool = false -%}{%- set ns.is_output_first = true -%}
    {{ '<｜Assistant｜>' }}[[GEN]]{%- if message['content'] -%}{{ message['content'] }}{%- endif -%}
    {{ '<｜tool▁calls▁begin｜>' }}
    {%- for tool in message['tool_calls'] -%}
      {%- if not loop.first -%}{{ '\\n' }}{%- endif -%}
      {{ '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n```json\\n' + tool['function']['arguments'] + '\\n```<｜tool▁call▁end｜>' }}
    {%- endfor -%}
    {{ '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' }}[[ENDGEN]]
  {%- elif message['role'] == 'assistant' -%}
    {%- if ns.is_tool -%}{{ '<｜tool▁outputs▁end｜>' }}{%- set ns.is_tool = false -%}{%- else -%}{{ '<｜Assistant｜>' }}{%- endif -%}
    [[GEN]]{{ message['content'] + '<｜end▁of▁sentence｜>' }}[[ENDGEN]]
  {%- elif message['role'] == 'tool' -%}
    {%- set ns.is_tool = true -%}
    {%- if ns.is_output_first -%}{{ '<｜tool▁outputs▁begin｜>' }}{%- set ns.is_output_first = false -%}{%- else -%}{{ '\\n' }}{%- endif -%}
    {{ '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}
  {%- endif -%}
{%- endfor -%}
{%- if ns.is_tool -%}{{ '<｜tool▁outputs▁end｜>' }}{%- endif -%}
{%- if add_generation_prompt and not ns.is_tool -%}{{ '<｜Assistant｜>' }}{%- endif -%}"""
DS_TEMPLATE_GEN = DS_TEMPLATE.replace("[[GEN]]", "{%- generation -%}").replace("[[ENDGEN]]", "{%- endgeneration -%}")
DS_TEMPLATE = DS_TEMPLATE.replace("[[GEN]]", "").replace("[[ENDGEN]]", "")

CORPUS = ("The quick brown fox jumps over the lazy dog. It's 12345 degrees; we'll see what they've done.\n"
          "你好，世界。今天天气很好，我们去公园散步吧。中文English混合文本。\n"
          'def add(a, b):\n    return a + b  # sum\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
          "The assistant calls functions.get_weather and reads the result. Tool results come back.\n"
          "You are Kimi, an AI assistant created by Moonshot AI. Return of functions.add:0\n") * 3

TEXTS = ["Hello world", "中文English混合 It's 1234567 ok", "a  b\n\n  c\t d   \n", "café naïve 🚀 über ẞ ǅ",
         "<|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|>",
         "def f(x):\n    return x*2\n",
         '<|tool_calls_section_begin|><|tool_call_begin|>functions.add:0<|tool_call_argument_begin|>{"a": 1}'
         "<|tool_call_end|><|tool_calls_section_end|>[EOS]", "", " ", "unknown <|reserved_token_170000|> text"]


def train_bpe(text: str, n_merges: int) -> dict[bytes, int]:
    """A byte-level BPE trained by plain pair counting: ranks 0..255 are the bytes, then merges."""
    words = collections.Counter(re.findall(r"\s?\w+|\s?[^\w\s]+|\s+", text))
    seqs = {w: [bytes([b]) for b in w.encode()] for w in words}
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, c in words.items():
            for a, b in zip(seqs[w], seqs[w][1:]):
                pairs[a, b] += c
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if a + b not in ranks:
            ranks[a + b] = len(ranks)
        for w in words:
            s, out, i = seqs[w], [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return ranks


def write_tiktoken(path, ranks):
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(),
                                                                                        key=lambda kv: kv[1])))


def kimi_names(n):
    return [KIMI_ADDED[i - n][0] if i - n in KIMI_ADDED else f"<|reserved_token_{i}|>" for i in range(n, n + 256)]


def kimi_config(n, template=KIMI_TEMPLATE, auto_map=True):
    cfg = {
        "added_tokens_decoder": {str(n + k): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                                              "single_word": False, "special": special}
                                 for k, (name, special) in KIMI_ADDED.items()},
        "bos_token": "[BOS]", "eos_token": "[EOS]", "unk_token": "[UNK]", "pad_token": "[PAD]",
        "model_max_length": 1048576, "tokenizer_class": "TikTokenTokenizer",
    }
    if auto_map:
        cfg["auto_map"] = {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}
    if template is not None:
        cfg["chat_template"] = template
    return cfg


# A fake of the release's remote-code tokenizer module, for the static read of its split pattern
# (k2sys never imports or runs it).
FAKE_TOKENIZATION_KIMI = '''\
import tiktoken


class TikTokenTokenizer:
    """Fake of the release's tokenizer class, written by the test."""
    special_tokens = {}
    num_reserved_special_tokens = 256
    pat_str = "|".join(
        [
%s
        ]
    )

    def __init__(self, vocab_file):
        raise RuntimeError("never executed by k2sys")
'''


def fake_tokenization_module(pattern_parts):
    return FAKE_TOKENIZATION_KIMI % "\n".join(f"            r\"\"\"{p}\"\"\"," for p in pattern_parts)


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    """(directory, ranks, reference tiktoken.Encoding) of a tiny Kimi-layout tokenizer."""
    d = tmp_path_factory.mktemp("kimi")
    ranks = train_bpe(CORPUS, 320)
    n = len(ranks)
    write_tiktoken(d / "tiktoken.model", ranks)
    (d / "tokenizer_config.json").write_text(json.dumps(kimi_config(n), ensure_ascii=False, indent=2))
    (d / "tokenization_kimi.py").write_text(fake_tokenization_module(KIMI_PATTERN.split("|")[:1] + [
        KIMI_PATTERN.split("|", 1)[1]]))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": n + 2}))
    ref = tiktoken.Encoding("ref", pat_str=KIMI_PATTERN, mergeable_ranks=ranks,
                            special_tokens={name: n + k for k, name in enumerate(kimi_names(n))})
    return d, ranks, ref


@pytest.fixture(scope="module")
def kimi_hf(kimi, tmp_path_factory):
    """The same tokenizer as transformers sees it: tokenizer.json from transformers' tiktoken converter."""
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    d, ranks, _ = kimi
    n = len(ranks)
    out = tmp_path_factory.mktemp("kimi_hf")
    conv = TikTokenConverter(vocab_file=str(d / "tiktoken.model"), pattern=KIMI_PATTERN,
                             extra_special_tokens=kimi_names(n)).converted()
    assert conv.get_vocab_size() == n + 256
    conv.save(str(out / "tokenizer.json"))
    cfg = kimi_config(n, auto_map=False)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
    return AutoTokenizer.from_pretrained(str(out))


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """(directory, transformers tokenizer) of a tiny DeepSeek-V3-layout tokenizer (tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("deepseek")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=list(DS.values()), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer=trainer)
    tok.save(str(d / "tokenizer.json"))

    def added(s):
        return {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False}
    cfg = {"add_bos_token": False, "add_eos_token": False, "bos_token": added(DS["bos"]), "eos_token": added(DS["eos"]),
           "pad_token": added(DS["eos"]), "unk_token": None, "legacy": True, "model_max_length": 163840,
           "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "chat_template": DS_TEMPLATE}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2))
    return d, AutoTokenizer.from_pretrained(str(d))


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather «now» in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers.",
                                           "parameters": {"type": "object", "properties": {
                                               "a": {"type": "integer"}, "b": {"type": "integer"}}}}}]


def kimi_call(name, args, idx):
    return {"id": f"functions.{name}:{idx}", "type": "function", "function": {"name": name, "arguments": args}}


KIMI_CHATS = {
    "plain": ([{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, 你好."}], None),
    "system_multiturn_named": ([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?", "name": "alice"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 40+2?\nShow work."},
        {"role": "assistant", "content": "40 + 2 = 42\n\nDone."},
    ], None),
    "tools": ([
        {"role": "user", "content": "Weather in Paris, and 123456789 + 987654321?"},
        {"role": "assistant", "content": "Calling tools.", "tool_calls": [
            kimi_call("get_weather", {"city": "Paris"}, 0), kimi_call("add", '{"a": 123456789, "b": 987654321}', 1)]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": '{"temp": 21, "sky": "sunny"}'},
        {"role": "tool", "tool_call_id": "functions.add:1", "content": "1111111110"},
        {"role": "assistant", "content": None, "tool_calls": [kimi_call("add", {"a": 1, "b": -1}, 2)]},
        {"role": "tool", "tool_call_id": "functions.add:2", "content": "0"},
        {"role": "assistant", "content": "Sunny, 21 degrees; the sum is 1111111110."},
    ], TOOLS),
    "ends_on_user": ([{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                      {"role": "user", "content": "second"}], TOOLS[:1]),
}


def ds_call(name, args):
    return {"type": "function", "function": {"name": name, "arguments": args}}


DS_CHATS = {
    "plain": ([{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, 你好."}], None),
    "systems_multiturn": ([
        {"role": "system", "content": "You are terse."}, {"role": "system", "content": "Answer in English."},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 40+2?"}, {"role": "assistant", "content": "42"},
    ], None),
    "tools": ([
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris, and 1+2?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            ds_call("get_weather", '{"city": "Paris"}'), ds_call("add", '{"a": 1, "b": 2}')]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": "3"},
        {"role": "assistant", "content": "Sunny and 21; 1+2 = 3."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ], TOOLS),
}


# -- (a) the tiktoken tokenizer ------------------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_kimi_tiktoken_matches_tiktoken_and_transformers(kimi, kimi_hf, text):
    d, ranks, ref = kimi
    tok = load_tokenizer(d)
    assert isinstance(tok, TiktokenTokenizer)
    enc = tok.encode(text)
    assert enc.ids == ref.encode(text, allowed_special="all")
    hf = kimi_hf.backend_tokenizer.encode(text, add_special_tokens=False)
    assert enc.ids == hf.ids
    assert enc.offsets == hf.offsets
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    # skip_special_tokens drops the tokens the config declares special and the unnamed reserved ids
    skipped = {name for k, (name, special) in KIMI_ADDED.items() if special} | {
        name for name in kimi_names(len(ranks)) if name.startswith("<|reserved_token_")}
    want = text
    for name in skipped:
        want = want.replace(name, "")
    assert tok.decode(enc.ids, skip_special_tokens=True) == want


def test_kimi_special_tokens_vocab_and_decode(kimi):
    d, ranks, ref = kimi
    n = len(ranks)
    tok = load_tokenizer(d)
    assert tok.get_vocab_size() == n + 256 == ref.n_vocab
    assert tok.get_vocab_size(with_added_tokens=False) == n
    for k, (name, _) in KIMI_ADDED.items():
        assert tok.token_to_id(name) == n + k and tok.id_to_token(n + k) == name
        assert tok.encode(f"a{name}b").ids == [ref.encode("a")[0], n + k, ref.encode("b")[0]]
    assert tok.id_to_token(n + 5) == f"<|reserved_token_{n + 5}|>"
    assert tok.id_to_token(n + 256) is None and tok.token_to_id("<|nope|>") is None
    # BPE tokens by their GPT-2 byte-level spelling, as in an HF vocabulary
    assert tok.token_to_id("Ġthe") == ranks[b" the"] and tok.id_to_token(ranks[b" the"]) == "Ġthe"
    assert tok.get_vocab()["[EOS]"] == n + 1 and len(tok.get_vocab()) == n + 256
    ids = tok.encode("[BOS]hi<|tool_call_begin|>x<|im_end|>").ids
    assert tok.decode(ids, skip_special_tokens=True) == "hi<|tool_call_begin|>x"  # tool markers are not special
    assert tok.decode(ids[:1] + ref.encode("€")[:1], skip_special_tokens=False) == "[BOS]\ufffd"  # partial UTF-8
    assert tok.encode("hi", add_special_tokens=True).ids == tok.encode("hi", add_special_tokens=False).ids
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([n + 256])


def test_add_bos_token_is_honoured(kimi, tmp_path):
    d, ranks, ref = kimi
    cfg = kimi_config(len(ranks), auto_map=False)
    cfg["add_bos_token"] = True
    write_tiktoken(tmp_path / "tiktoken.model", ranks)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path)
    enc = tok.encode("hi there")
    assert enc.ids == [len(ranks)] + ref.encode("hi there")
    assert enc.offsets[0] == (0, 5) and tok.encode("hi", add_special_tokens=False).ids == ref.encode("hi")


def test_split_pattern_comes_from_the_remote_code_class(kimi, tmp_path):
    """A tokenizer class with another pattern (digits one by one) is honoured, read without running it."""
    d, ranks, _ = kimi
    parts = KIMI_PATTERN.split("|")
    parts = [r"\p{N}" if p == r"\p{N}{1,3}" else p for p in parts]
    other = "|".join(parts)
    write_tiktoken(tmp_path / "tiktoken.model", ranks)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(kimi_config(len(ranks))))
    (tmp_path / "tokenization_kimi.py").write_text(fake_tokenization_module(parts))
    tok = load_tokenizer(tmp_path)
    ref_other = tiktoken.Encoding("other", pat_str=other, mergeable_ranks=ranks, special_tokens={})
    ref_kimi = tiktoken.Encoding("kimi", pat_str=KIMI_PATTERN, mergeable_ranks=ranks, special_tokens={})
    text = "It's 12345 degrees and 2025 years"
    assert ref_other.encode(text) != ref_kimi.encode(text)
    assert tok.encode(text).ids == ref_other.encode(text)
    assert tok.pat_str == other and "TikTokenTokenizer" in tok.pattern_source
    # without auto_map: Kimi's own pattern
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(kimi_config(len(ranks), auto_map=False)))
    assert load_tokenizer(tmp_path).encode(text).ids == ref_kimi.encode(text)


def test_bad_tokenizer_dirs_fail_naming_the_file(kimi, tmp_path):
    d, ranks, _ = kimi
    n = len(ranks)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*tiktoken\.model"):
        load_tokenizer(tmp_path)
    write_tiktoken(tmp_path / "tiktoken.model", ranks)
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(kimi_config(n)))
    with pytest.raises(FileNotFoundError, match="tokenization_kimi.py"):  # auto_map names a missing file
        load_tokenizer(tmp_path)
    cfg = kimi_config(n, auto_map=False)
    cfg["added_tokens_decoder"][str(n + 256)] = {"content": "<|late|>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"id {n + 256} is outside"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(kimi_config(n, auto_map=False)))
    lines = (tmp_path / "tiktoken.model").read_text().splitlines()
    (tmp_path / "tiktoken.model").write_text("\n".join(lines[:300] + ["!!notbase64 300"] + lines[301:]) + "\n")
    with pytest.raises(ValueError, match=r"tiktoken\.model:301"):
        load_tokenizer(tmp_path)
    (tmp_path / "tiktoken.model").write_text("\n".join(lines[:300] + lines[301:]) + "\n")
    with pytest.raises(ValueError, match="rank 300 is missing"):
        load_tokenizer(tmp_path)


# -- chat templates rendered as transformers renders them ------------------------------------------------------
@pytest.mark.parametrize("name", KIMI_CHATS)
@pytest.mark.parametrize("gen_prompt", [False, True])
def test_kimi_template_render_and_ids_match_transformers(kimi, kimi_hf, name, gen_prompt):
    d, _, _ = kimi
    msgs, tools = KIMI_CHATS[name]
    fmt = chat_format_for(d)
    assert isinstance(fmt, TemplateChatFormat) and fmt.tool_format == "kimi_k2"
    text = fmt.render(msgs, tools, add_generation_prompt=gen_prompt)
    assert text == kimi_hf.apply_chat_template(copy.deepcopy(msgs), tools=tools, tokenize=False,
                                               add_generation_prompt=gen_prompt)
    ids, _ = fmt.tokenize(msgs, tools)
    assert ids == kimi_hf.apply_chat_template(copy.deepcopy(msgs), tools=tools)["input_ids"]
    if gen_prompt:
        assert fmt.prompt_ids(msgs, tools) == kimi_hf.apply_chat_template(copy.deepcopy(msgs), tools=tools,
                                                                          add_generation_prompt=True)["input_ids"]


@pytest.mark.parametrize("name", DS_CHATS)
@pytest.mark.parametrize("gen_prompt", [False, True])
def test_deepseek_template_render_and_ids_match_transformers(deepseek, name, gen_prompt):
    d, hf = deepseek
    msgs, tools = DS_CHATS[name]
    fmt = chat_format_for(d)
    assert isinstance(fmt, TemplateChatFormat) and fmt.tool_format == "deepseek_v3"
    text = fmt.render(msgs, tools, add_generation_prompt=gen_prompt)
    assert text.startswith(DS["bos"])
    assert text == hf.apply_chat_template(copy.deepcopy(msgs), tools=tools, tokenize=False,
                                          add_generation_prompt=gen_prompt)
    assert fmt.tokenize(msgs, tools)[0] == hf.apply_chat_template(copy.deepcopy(msgs), tools=tools)["input_ids"]
    assert tokenize_chat(load_tokenizer(d), msgs, tools) == fmt.tokenize(msgs, tools)


# -- (b) assistant-only loss masks ---------------------------------------------------------------------------
def _runs(ids, mask):
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def _kimi_expected_turns(msgs):
    """What each assistant turn generates, written from the messages: content, tool-call section, the
    closing <|im_end|> (absent after the conversation's last turn, as the template does)."""
    out = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        s = m.get("content") or ""
        if m.get("tool_calls"):
            s += "<|tool_calls_section_begin|>" + "".join(
                f"<|tool_call_begin|>{c['id']}<|tool_call_argument_begin|>"
                f"{a if isinstance(a := c['function']['arguments'], str) else json.dumps(a, ensure_ascii=False)}"
                "<|tool_call_end|>" for c in m["tool_calls"]) + "<|tool_calls_section_end|>"
        out.append(s + ("<|im_end|>" if i < len(msgs) - 1 else ""))
    return out


def _ds_expected_turns(msgs):
    out = []
    for m in msgs:
        if m["role"] != "assistant":
            continue
        if "tool_calls" in m:
            calls = "\n".join(f"{DS['call_begin']}function{DS['sep']}{c['function']['name']}\n```json\n"
                              f"{c['function']['arguments']}\n```{DS['call_end']}" for c in m["tool_calls"])
            out.append((m.get("content") or "") + DS["calls_begin"] + calls + DS["calls_end"] + DS["eos"])
        else:
            out.append(m["content"] + DS["eos"])
    return out


@pytest.mark.parametrize("name", KIMI_CHATS)
def test_kimi_mask_covers_exactly_the_assistant_turns(kimi, kimi_hf, name):
    d, _, _ = kimi
    msgs, tools = KIMI_CHATS[name]
    tok = load_tokenizer(d)
    ids, mask = tokenize_chat(tok, msgs, tools)  # the template has no {% generation %}: prefix rendering
    assert (ids, mask) == tok.chat_format.tokenize(msgs, tools)
    assert [tok.decode(r, skip_special_tokens=False) for r in _runs(ids, mask)] == \
        [t for t in _kimi_expected_turns(msgs) if t]
    # transformers' own mask, on a template that marks the same text with {% generation %}
    assert kimi_hf.apply_chat_template(copy.deepcopy(msgs), tools=tools, tokenize=False,
                                       chat_template=KIMI_TEMPLATE_GEN) == tok.chat_format.render(msgs, tools)
    ref = kimi_hf.apply_chat_template(copy.deepcopy(msgs), tools=tools, chat_template=KIMI_TEMPLATE_GEN,
                                      return_assistant_tokens_mask=True)
    assert ref["input_ids"] == ids and ref["assistant_masks"] == mask
    # our generation-block path gives the same
    gen = TemplateChatFormat(tok, KIMI_TEMPLATE_GEN, tok.special_tokens_map, mask="generation")
    assert gen.tokenize(msgs, tools) == (ids, mask)


@pytest.mark.parametrize("name", DS_CHATS)
def test_deepseek_mask_covers_exactly_the_assistant_turns(deepseek, name):
    d, hf = deepseek
    msgs, tools = DS_CHATS[name]
    fmt = chat_format_for(d)
    ids, mask = fmt.tokenize(msgs, tools)
    tok = fmt.tokenizer
    assert [tok.decode(r, skip_special_tokens=False) for r in _runs(ids, mask)] == _ds_expected_turns(msgs)
    ref = hf.apply_chat_template(copy.deepcopy(msgs), tools=tools, chat_template=DS_TEMPLATE_GEN,
                                 return_assistant_tokens_mask=True)
    assert ref["input_ids"] == ids and ref["assistant_masks"] == mask
    prefix = TemplateChatFormat(tok, DS_TEMPLATE_GEN, fmt.special_tokens, mask="prefix")
    assert prefix.tokenize(msgs, tools) == (ids, mask)  # prefix rendering ignores the blocks, same answer


def test_prefix_unstable_template_is_reported(deepseek):
    # drops the content of earlier assistant turns from history: prefixes are not prefixes of the whole
    template = ("{% for m in messages %}{% if m.role == 'user' %}<｜User｜>{{ m.content }}{% else %}<｜Assistant｜>"
                "{% if loop.last %}{{ m.content }}{% endif %}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")
    fmt = TemplateChatFormat(deepseek[1], template, {"eos_token": DS["eos"]})
    msgs = DS_CHATS["systems_multiturn"][0][2:]
    with pytest.raises(ValueError, match=r"messages\[1\].*generation"):
        fmt.tokenize(msgs)
    assert fmt.tokenize(msgs[:2])[1].count(1) > 0  # one assistant turn: fine


# -- (c) tool calls in each model's own format -----------------------------------------------------------------
def test_kimi_tool_calls_round_trip(kimi):
    d, _, _ = kimi
    tok = load_tokenizer(d)
    fmt = tok.chat_format
    msgs, tools = KIMI_CHATS["tools"]
    calls = [m for m in msgs if m["role"] == "assistant" and m.get("tool_calls")]
    for k, m in enumerate(calls):
        i = msgs.index(m)
        text = fmt.render(msgs[:i + 1], tools, add_generation_prompt=True)
        turn = text.split("<|im_assistant|>assistant<|im_middle|>")[-2]  # the last rendered assistant turn
        ids = tok.encode(turn).ids  # through the tokenizer and back, as generated tokens would be
        parsed = fmt.parse_assistant(tok.decode(ids, skip_special_tokens=False))
        assert parsed.ok, parsed.errors
        assert parsed.content == (m["content"] or "")
        args = [c["function"]["arguments"] for c in m["tool_calls"]]
        want = [(c["id"], c["function"]["name"], a if isinstance(a, dict) else json.loads(a))
                for c, a in zip(m["tool_calls"], args)]
        assert [(c.id, c.name, c.arguments) for c in parsed.tool_calls] == want
    assert fmt.stop_token_ids == [tok.token_to_id("[EOS]"), tok.token_to_id("<|im_end|>")]


def test_deepseek_tool_calls_round_trip(deepseek):
    d, hf = deepseek
    fmt = chat_format_for(d)
    msgs, tools = DS_CHATS["tools"]
    m = msgs[2]
    text = fmt.render(msgs[:3], tools)
    turn = text.split(DS["asst"])[-1]
    ids = fmt.tokenizer.encode(turn, add_special_tokens=False).ids
    parsed = fmt.parse_assistant(fmt.tokenizer.decode(ids, skip_special_tokens=False))
    assert parsed.ok, parsed.errors
    assert parsed.content == m["content"]
    assert [(c.id, c.name, c.arguments) for c in parsed.tool_calls] == [
        ("functions.get_weather:0", "get_weather", {"city": "Paris"}), ("functions.add:1", "add", {"a": 1, "b": 2})]
    assert fmt.stop_token_ids == [fmt.tokenizer.token_to_id(DS["eos"])]
    plain = fmt.parse_assistant("Just text." + DS["eos"])
    assert plain.ok and plain.content == "Just text." and not plain.tool_calls


DS_GOOD = f'{DS["call_begin"]}function{DS["sep"]}add\n```json\n{{"a": 1}}\n```{DS["call_end"]}'
DS_MALFORMED = {
    "bad_json": (f'{DS["calls_begin"]}{DS["call_begin"]}function{DS["sep"]}add\n```json\n{{"a": 1,}}\n```'
                 f'{DS["call_end"]}{DS["calls_end"]}', 0, "not valid JSON"),
    "args_not_object": (f'{DS["calls_begin"]}{DS["call_begin"]}function{DS["sep"]}add\n```json\n[1]\n```'
                        f'{DS["call_end"]}{DS["calls_end"]}', 0, "JSON object"),
    "wrong_type": (f'{DS["calls_begin"]}{DS["call_begin"]}retrieval{DS["sep"]}add\n```json\n{{}}\n```'
                   f'{DS["call_end"]}{DS_GOOD}{DS["calls_end"]}', 1, "not 'function'"),
    "no_fence": (f'{DS["calls_begin"]}{DS["call_begin"]}function{DS["sep"]}add {{"a": 1}}{DS["call_end"]}'
                 f'{DS["calls_end"]}', 0, "expected NAME"),
    "missing_call_end": (f'{DS["calls_begin"]}{DS_GOOD}{DS["call_begin"]}function{DS["sep"]}add\n```json\n{{}}\n```'
                         f'{DS["calls_end"]}', 1, "expected"),
    "missing_sep": (f'{DS["calls_begin"]}{DS["call_begin"]}function add{DS["call_end"]}{DS_GOOD}{DS["calls_end"]}',
                    1, f"expected {DS['sep']}"),
    "truncated": (f'{DS["calls_begin"]}{DS_GOOD}{DS["call_begin"]}function{DS["sep"]}add\n```json\n{{"a"', 1,
                  "text ended"),
    "eos_inside_section": (f'{DS["calls_begin"]}{DS_GOOD}{DS["eos"]}', 1, f"before {DS['calls_end']}"),
    "stray_token_in_content": (f'hi {DS["user"]} there', 0, "unexpected"),
    "junk_between_calls": (f'{DS["calls_begin"]}{DS_GOOD} junk {DS_GOOD}{DS["calls_end"]}', 2,
                           "in the tool-call section"),
    "text_after_end": (f'ok{DS["eos"]}tail', 0, "after the end of the turn"),
}


@pytest.mark.parametrize("name", DS_MALFORMED)
def test_deepseek_malformed_tool_calls_are_reported_not_raised(deepseek, name):
    text, n_good, needle = DS_MALFORMED[name]
    parsed = chat_format_for(deepseek[0]).parse_assistant(text)
    assert len(parsed.tool_calls) == n_good and all(c.name == "add" for c in parsed.tool_calls)
    assert not parsed.ok and any(needle in e for e in parsed.errors), parsed.errors


def test_kimi_malformed_tool_calls_are_reported_not_raised(kimi):
    fmt = load_tokenizer(kimi[0]).chat_format
    good = '<|tool_call_begin|>functions.add:0<|tool_call_argument_begin|>{"a": 1}<|tool_call_end|>'
    parsed = fmt.parse_assistant(f"x<|tool_calls_section_begin|>{good}<|tool_call_begin|>add"
                                 "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|><|im_end|>")
    assert [c.id for c in parsed.tool_calls] == ["functions.add:0"] and parsed.content == "x"
    assert any("functions.NAME:IDX" in e for e in parsed.errors)


# -- choosing the format -----------------------------------------------------------------------------------------
def test_format_choice_and_template_sources(kimi, deepseek, tmp_path):
    from tokenizers import Tokenizer, models

    d, ranks, _ = kimi
    n = len(ranks)
    # no template, but the Kimi tokenizer has the K2 chat tokens: our K2 format
    write_tiktoken(tmp_path / "tiktoken.model", ranks)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(kimi_config(n, template=None, auto_map=False)))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok.chat_format, K2ChatFormat) and isinstance(chat_format_for(tmp_path), K2ChatFormat)
    msgs = KIMI_CHATS["plain"][0]
    ids, mask = tokenize_chat(tok, msgs)
    assert tok.decode(ids, skip_special_tokens=False).startswith("<|im_user|>user<|im_middle|>Hello!")
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == "Hi, 你好.<|im_end|>"
    # our own K2 template in the config is recognised as the K2 format
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(kimi_config(n, template=CHAT_TEMPLATE, auto_map=False)))
    assert isinstance(load_tokenizer(tmp_path).chat_format, K2ChatFormat)
    # list-of-dicts form: "tool_use" with tools, "default" without; chat_template.jinja wins over the config
    a = "{% for m in messages %}A:{{ m.content }}[EOS]{% endfor %}"
    b = "{% for m in messages %}B:{{ m.content }}[EOS]{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(kimi_config(
        n, template=[{"name": "default", "template": a}, {"name": "tool_use", "template": b}], auto_map=False)))
    fmt = chat_format_for(tmp_path)
    assert fmt.render(msgs) == "A:Hello![EOS]A:Hi, 你好.[EOS]"
    assert fmt.render(msgs, TOOLS).startswith("B:Hello!")
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}J:{{ m.content }}{% endfor %}")
    assert chat_format_for(tmp_path).render(msgs) == "J:Hello!J:Hi, 你好."
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("T{{ tools | length }}")
    assert chat_format_for(tmp_path).render(msgs, TOOLS) == "T2"
    assert chat_format_for(tmp_path).render(msgs) == "J:Hello!J:Hi, 你好."
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").unlink()
    # a transformers tokenizer: its chat_template
    assert isinstance(chat_format_for(deepseek[1]), TemplateChatFormat)
    assert chat_format_for(deepseek[1]).render(msgs) == chat_format_for(deepseek[0]).render(msgs)
    # nothing to go on
    with pytest.raises(ValueError, match="no chat format"):
        chat_format_for(Tokenizer(models.BPE()))
    (tmp_path / "chat_template.jinja").unlink()
    cfg = kimi_config(n, template=None, auto_map=False)
    del cfg["added_tokens_decoder"][str(n + 2)]  # no <|im_end|>: not the K2 format
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no chat template"):
        chat_format_for(tmp_path)
    with pytest.raises(ValueError, match="chat tokens"):
        tokenize_chat(load_tokenizer(tmp_path), msgs)


def test_template_errors_and_reserved_tokens_are_clear(deepseek, kimi):
    fmt = chat_format_for(deepseek[0])
    with pytest.raises(ValueError, match=r"messages\[0\]\.content contains the reserved token"):
        fmt.render([{"role": "user", "content": f"hi {DS['eos']}"}])
    with pytest.raises(ValueError, match="JSON string"):  # this template concatenates arguments as a string
        fmt.render([{"role": "user", "content": "x"},
                    {"role": "assistant", "content": "", "tool_calls": [ds_call("add", {"a": 1})]}])
    tok = load_tokenizer(kimi[0])
    raising = TemplateChatFormat(tok, "{{ raise_exception('only user turns, got ' + messages[0].role) }}",
                                 tok.special_tokens_map)
    with pytest.raises(ValueError, match="only user turns, got system"):
        raising.render([{"role": "system", "content": "x"}])
    with pytest.raises(ValueError, match="does not parse"):
        TemplateChatFormat(tok, "{% for %}", {}).render([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        TemplateChatFormat(tok, "x", {"eos_token": "<|missing|>"})
    dated = TemplateChatFormat(tok, "{{ strftime_now('%Y') }}|{{ messages | tojson }}|{{ bos_token }}",
                               tok.special_tokens_map)
    year, body, bos = dated.render([{"role": "user", "content": "«é»", "meta": None}]).split("|")
    assert len(year) == 4 and year.isdigit() and bos == "[BOS]"
    assert json.loads(body) == [{"role": "user", "content": "«é»"}] and "«é»" in body  # None dropped, not escaped
