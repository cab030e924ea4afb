"""Train the byte-level BPE tokenizer locally and write it in Hugging Face layout.

texts -> strip special-token strings -> pre-tokenize (digits one by one, then GPT-2 byte-level
split) -> BPE merges -> tokenizer.json + tokenizer_config.json (with the chat template) +
special_tokens_map.json. No hub, no network, no transformers: the files load in
`transformers.AutoTokenizer` (tested) and in `tokenizers.Tokenizer.from_file`.

`default_corpus()` builds the built-in training text (task prompts, chat transcripts with tool
calls, JSON, English and some Chinese) from a seeded generator, so the same tokenizer comes out
on any machine.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .chat import BOS, CHAT_TEMPLATE, CHAT_TOKENS, EOS, PAD, SPECIAL_TOKENS, render_chat
from .formats import ChatFormat, K2ChatFormat, TemplateChatFormat, format_for_dir, has_k2_tokens
from .templates import CONFIG_FILE

DEFAULT_VOCAB_SIZE = 4096
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # byte alphabet + special tokens, before any merge
_SPECIAL_SPLIT = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Digits become single tokens so arithmetic sees place value the same way in every number
    # (the RL tasks are arithmetic); the rest is GPT-2's byte-level split, without a prefix space so
    # decode(encode(x)) == x.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


def _plain_text(texts: Iterable[str]) -> Iterator[str]:
    # Special-token strings must not feed merges ("<|im" would become a token the chat never uses as
    # text); split them out and train on what lies between.
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] is {type(text).__name__}; train_tokenizer needs an iterable of str")
        yield from (piece for piece in _SPECIAL_SPLIT.split(text) if piece)


def _write_atomic(path: Path, data: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; tokenizer files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | os.PathLike, model_max_length: int = 4096) -> Path:
    """Write `tokenizer` (one made by `train_tokenizer`) in HF layout into `out_dir`; returns out_dir.

    Each file is replaced atomically, so a reader never sees a half-written tokenizer; other files in
    `out_dir` (a checkpoint's config and weights) are left alone.
    """
    missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise ValueError(f"tokenizer lacks special tokens {missing}; train it with train_tokenizer")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
                   "additional_special_tokens": list(CHAT_TOKENS)}
    config = {
        # PreTrainedTokenizerFast + additional_special_tokens load in transformers 4.x (SGLang's pin) and 5.x.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": False,
        "add_eos_token": False,
        # Cleanup would turn " ." into "." and break decode(encode(x)) == x.
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(tokenizer.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                            "rstrip": False, "single_word": False, "special": True}
            for t in SPECIAL_TOKENS
        },
    }
    _write_atomic(out / "tokenizer.json", tokenizer.to_str(pretty=True))
    _write_atomic(out / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")
    # Written last: its presence is what marks the directory as a tokenizer.
    _write_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike, *,
                    min_frequency: int = 2, model_max_length: int = 4096) -> Path:
    """Train a byte-level BPE with the K2 special tokens on `texts`; save it to `out_dir`, return it.

    Special tokens get ids 0..12 in `SPECIAL_TOKENS` order, bytes follow, then merges. The vocabulary
    can come out smaller than `vocab_size` when the corpus has too few distinct pairs; size the
    model's embedding from `load_tokenizer(out_dir).get_vocab_size()`.
    """
    if not isinstance(vocab_size, int) or vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size!r} must be an int >= {_MIN_VOCAB} "
                         f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency!r} must be an int >= 1")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_plain_text(texts), trainer=trainer)
    return save_tokenizer(tok, out_dir, model_max_length=model_max_length)


def load_tokenizer(path: str | os.PathLike) -> Any:
    """Load the tokenizer in directory `path`, with its chat format attached as `.chat_format`.

    tokenizer.json (ours from `train_tokenizer`, or a release's) -> `tokenizers.Tokenizer`;
    else tiktoken.model + tokenizer_config.json (the Kimi release layout) -> `TiktokenTokenizer`.
    Both answer encode(text).ids / .offsets, decode, token_to_id, id_to_token, get_vocab_size.
    `.chat_format` is the directory's chat template, else the K2 format when the tokenizer has the
    K2 chat tokens, else None (see k2sys.tokenizer.formats). No transformers needed.
    """
    from .tiktoken_bpe import TIKTOKEN_FILE, TiktokenTokenizer

    tok_dir = Path(path)
    if (tok_dir / "tokenizer.json").is_file():
        tok: Any = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    elif (tok_dir / TIKTOKEN_FILE).is_file():
        tok = TiktokenTokenizer.from_dir(tok_dir)
    else:
        raise FileNotFoundError(
            f"no tokenizer in {tok_dir}: looked for tokenizer.json (Hugging Face tokenizers) and {TIKTOKEN_FILE} + "
            "tokenizer_config.json (tiktoken BPE, the Kimi release layout); create one with "
            "k2sys.tokenizer.train_tokenizer or copy the model's tokenizer files there")
    tok.chat_format = format_for_dir(tok_dir, tok)
    return tok


# English prose for the corpus: general words the tiny model's chat turns and task prompts use.
ENGLISH_TEXT = """\
The assistant reads the question carefully, thinks about what is being asked, and then answers
clearly. When a problem needs a calculation, it works step by step and checks the result before
giving the final answer. If a tool can help, the assistant calls the tool with the right
arguments, waits for the result, and explains what the result means for the user.
Good answers are short when the question is simple and detailed when the question is hard. The
assistant does not invent facts; when it is not sure, it says so and suggests how to find out.
Numbers are written with digits, lists are written one item per line, and code is shown exactly.
A language model predicts the next token from the tokens before it. Training on examples teaches
it the format of a conversation; reinforcement learning then rewards answers that are correct.
The weather today is sunny with a light wind from the west, and the temperature will reach
twenty degrees in the afternoon. Tomorrow there may be rain in the morning and clouds at night.
Please send me the report by Friday. The meeting has been moved to Thursday at three o'clock in
the small room on the second floor. Remember to bring the slides and the list of open questions.
To sort a list, compare pairs of items and swap them when they are out of order; repeat until no
swap is needed. To reverse a string, read its characters from the last to the first. The sum of
a list is the result of adding all of its items; the maximum is the largest item.
Error: the file was not found. Warning: the value is out of range. Note: this step is optional.
Thank you for your help! You're welcome. Could you explain that again? Of course, here it is.
"""

CHINESE_TEXT = """\
助手会仔细阅读问题，先思考再回答。遇到需要计算的问题时，它会一步一步地计算并检查结果。
如果工具能够帮助解决问题，助手会调用工具，等待结果，然后向用户解释结果的含义。
今天天气晴朗，下午气温将达到二十度。请在星期五之前把报告发给我。谢谢你的帮助！
"""

_WORDS = ("apple banana cherry river mountain window garden planet rocket silver orange purple "
          "python token model reward answer number letter string list value search weather city").split()
_CITIES = ("Beijing", "Shanghai", "London", "Paris", "Tokyo", "Berlin", "Madrid", "Cairo", "Lima", "Oslo")


def _arithmetic(rng: random.Random) -> str:
    a, b, c = rng.randint(0, 999), rng.randint(0, 999), rng.randint(1, 99)
    op = rng.choice("+-*")
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    form = rng.randrange(3)
    if form == 0:
        return f"Question: What is {a} {op} {b}?\nAnswer: {value}"
    if form == 1:
        return f"Compute ({a} {op} {b}) + {c}. First, {a} {op} {b} = {value}. Then {value} + {c} = {value + c}."
    return f"{a}{op}{b}={value}"


def _list_task(rng: random.Random) -> str:
    xs = [rng.randint(-50, 99) for _ in range(rng.randint(2, 8))]
    kind = rng.randrange(4)
    if kind == 0:
        return f"Sort the list {xs} in ascending order.\nAnswer: {sorted(xs)}"
    if kind == 1:
        return f"Reverse the list {xs}.\nAnswer: {xs[::-1]}"
    if kind == 2:
        return f"What is the largest number in {xs}?\nAnswer: {max(xs)}"
    return f"Sum the numbers {xs}.\nAnswer: {sum(xs)}"


def _string_task(rng: random.Random) -> str:
    w = rng.choice(_WORDS)
    kind = rng.randrange(3)
    if kind == 0:
        return f'Reverse the string "{w}".\nAnswer: "{w[::-1]}"'
    if kind == 1:
        ch = rng.choice(w)
        return f'How many times does the letter "{ch}" appear in "{w}"?\nAnswer: {w.count(ch)}'
    return f'Write "{w}" in upper case.\nAnswer: "{w.upper()}"'


_TOOLS = [
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"type": "string", "enum": ["C", "F"]}},
                       "required": ["city"]}}},
]


def _transcript(rng: random.Random) -> str:
    a, b = rng.randint(0, 9999), rng.randint(0, 999)
    city = rng.choice(_CITIES)
    temp = rng.randint(-10, 35)
    sky = rng.choice(["sunny", "cloudy", "rain"])
    msgs = [{"role": "system", "content": "You are a helpful assistant."}]
    if rng.random() < 0.5:
        msgs += [
            {"role": "user", "content": f"What is {a} * {b}?"},
            {"role": "assistant", "content": "Let me compute that.", "tool_calls": [
                {"type": "function", "function": {"name": "calculator", "arguments": {"expression": f"{a}*{b}"}}}]},
            {"role": "tool", "tool_call_id": "functions.calculator:0", "content": str(a * b)},
            {"role": "assistant", "content": f"{a} * {b} = {a * b}."},
        ]
    else:
        msgs += [
            {"role": "user", "content": f"How is the weather in {city}?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city, "unit": "C"}}}]},
            {"role": "tool", "tool_call_id": "functions.get_weather:0",
             "content": json.dumps({"city": city, "temperature": temp, "sky": sky})},
            {"role": "assistant", "content": f"It is {temp} degrees in {city} right now."},
        ]
    return render_chat(msgs, tools=_TOOLS)


def _json_snippet(rng: random.Random) -> str:
    obj = {"id": rng.randint(1, 10**6), "name": rng.choice(_WORDS), "tags": rng.sample(_WORDS, 3),
           "score": round(rng.random() * 100, 2), "active": rng.random() < 0.5, "parent": None}
    return json.dumps(obj, indent=rng.choice([None, 2]))


# Pure-Python stdlib modules whose source (code + English docstrings) widens the vocabulary past
# what the generated tasks reach. Their text changes only between Python releases; a model always
# ships with its own tokenizer files, so that drift never mismatches a checkpoint.
_STDLIB_MODULES = ("textwrap", "heapq", "bisect", "fractions", "statistics", "json.encoder", "json.decoder",
                   "string", "calendar", "difflib", "shlex", "csv", "dataclasses", "argparse")


def _stdlib_sources() -> list[str]:
    docs = []
    for name in _STDLIB_MODULES:
        try:
            docs.append(inspect.getsource(importlib.import_module(name)))
        except (OSError, TypeError):  # sources stripped from this Python install: train without them
            continue
    return docs


def default_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """The built-in training corpus: `n` generated documents, fixed prose and stdlib sources.

    Deterministic in `seed` for a given Python release; about 1.6 MB for the default `n`.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be a positive int")
    rng = random.Random(seed)
    makers = (_arithmetic, _list_task, _string_task, _transcript, _json_snippet)
    docs = [ENGLISH_TEXT, CHINESE_TEXT] * max(1, n // 100)  # repeat prose so its words clear min_frequency
    docs += _stdlib_sources()
    docs += [makers[i % len(makers)](rng) for i in range(n)]
    return docs


def chat_format_for(obj: Any) -> ChatFormat:
    """The chat format for a tokenizer directory, a tokenizer, or a ChatFormat (returned as is).

    A directory: its tokenizer is loaded (load_tokenizer) and its format returned. A tokenizer: the
    format `load_tokenizer` attached; else, for a transformers tokenizer, its `chat_template`; else
    the K2 format if it has the K2 chat tokens. Anything else is an error.
    """
    if isinstance(obj, ChatFormat):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        fmt = load_tokenizer(obj).chat_format
        if fmt is None:
            raise ValueError(f"{obj}: no chat template (looked for chat_template.jinja, additional_chat_templates/ "
                             f"and chat_template in {CONFIG_FILE}) and the tokenizer has no K2 chat tokens; add the "
                             "model's chat template, or train a K2 tokenizer with train_tokenizer")
        return fmt
    fmt = getattr(obj, "chat_format", None)
    if fmt is not None:
        return fmt
    template = getattr(obj, "chat_template", None)
    if template and hasattr(obj, "backend_tokenizer"):  # a transformers fast tokenizer
        if template == CHAT_TEMPLATE and has_k2_tokens(obj):
            return K2ChatFormat(obj)
        return TemplateChatFormat(obj, template, dict(obj.special_tokens_map), source="tokenizer.chat_template")
    if has_k2_tokens(obj):
        return K2ChatFormat(obj)
    raise ValueError(f"{type(obj).__name__} has no chat format: no chat template and no K2 chat tokens; load the "
                     "checkpoint's tokenizer with k2sys.tokenizer.load_tokenizer(dir) so its template is read")
