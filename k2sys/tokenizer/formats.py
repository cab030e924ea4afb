"""Chat formats: how a model's conversations become tokens, and its output becomes messages.

A ChatFormat is bound to one tokenizer and offers
    render(messages, tools=None, add_generation_prompt=False) -> str
    tokenize(messages, tools=None) -> (input_ids, loss_mask)      mask 1 on what the assistant generates
    prompt_ids(messages, tools=None) -> ids of the rendered prompt + generation prompt
    parse_assistant(text) -> ParsedAssistant                      tool calls in the model's own format
    stop_token_ids                                                ids that end an assistant turn

Two implementations:
  - K2ChatFormat: our K2 format (k2sys.tokenizer.chat), the default for models trained from scratch.
  - TemplateChatFormat: a released checkpoint's own Jinja chat template, rendered as transformers
    renders it (k2sys.tokenizer.templates). The assistant-only loss mask comes from the template's
    {% generation %} blocks when it has them; otherwise from rendering prefixes of the conversation:
    assistant message i spans from the end of render(messages[:i], add_generation_prompt=True) to the
    end of render(messages[:i+1]), plus, when that does not end in a stop token, the stop token that
    follows in the full conversation (some templates close a turn only once another turn follows).
    A template for which these renderings are not prefixes of the full text is reported, not guessed.
    Tool calls are parsed in the family's format, picked from the tokens the tokenizer has: Kimi K2
    (<|tool_calls_section_begin|>) or DeepSeek-V3 (<｜tool▁calls▁begin｜>); otherwise no tool calls.

`load_tokenizer(dir)` attaches the directory's format as `tokenizer.chat_format`; `chat_format_for`
finds or builds one for a directory or a tokenizer object.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Mapping, Sequence

import k2sys.tokenizer.toolcalls as toolcalls
from .chat import (
    CHAT_TEMPLATE,
    STOP_TOKENS,
    ParsedAssistant,
    parse_assistant,
    render_chat,
    render_continuation,
    tokenize_k2,
)
from .templates import (
    CONFIG_FILE,
    SPECIAL_TOKEN_ATTRIBUTES,
    Template,
    has_generation_blocks,
    read_chat_template,
    render_template,
    select_template,
    special_tokens_map,
)

GENERATION_CONFIG = "generation_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"


def _backend(tokenizer: Any) -> Any:
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def _encode(tokenizer: Any, text: str) -> Any:
    return _backend(tokenizer).encode(text, add_special_tokens=False)


def mask_from_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for every token whose character span overlaps one of `spans` (sorted), else 0."""
    mask = [0] * len(offsets)
    k = 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[i] = 1
    return mask


class ChatFormat(ABC):
    """A model's chat format, bound to its tokenizer (see the module docstring)."""

    name: str
    tokenizer: Any

    @abstractmethod
    def render(self, messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None,
               add_generation_prompt: bool = False) -> str: ...

    @abstractmethod
    def tokenize(self, messages: Sequence[Mapping],
                 tools: Sequence[Mapping] | None = None) -> tuple[list[int], list[int]]: ...

    @abstractmethod
    def parse_assistant(self, text: str) -> ParsedAssistant: ...

    @property
    @abstractmethod
    def stop_token_ids(self) -> list[int]: ...

    def prompt_ids(self, messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None) -> list[int]:
        """Token ids of the conversation so far plus the assistant generation prompt."""
        return list(_encode(self.tokenizer, self.render(messages, tools, add_generation_prompt=True)).ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class K2ChatFormat(ChatFormat):
    """Our K2 chat format (k2sys.tokenizer.chat) on a tokenizer that has the K2 chat tokens."""

    name = "k2"

    def __init__(self, tokenizer: Any):
        backend = _backend(tokenizer)
        missing = [t for t in STOP_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the K2 chat tokens {missing}; it cannot use the K2 chat format")
        self.tokenizer = tokenizer
        self._stop_ids = [backend.token_to_id(t) for t in STOP_TOKENS]

    def render(self, messages, tools=None, add_generation_prompt=False) -> str:
        return render_chat(messages, tools, add_generation_prompt)

    def render_continuation(self, messages, prior_call_ids=(), add_generation_prompt=True) -> str:
        return render_continuation(messages, prior_call_ids, add_generation_prompt)

    def tokenize(self, messages, tools=None) -> tuple[list[int], list[int]]:
        return tokenize_k2(self.tokenizer, messages, tools)

    def parse_assistant(self, text: str) -> ParsedAssistant:
        return parse_assistant(text)

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self._stop_ids)


def tool_format_of(tokenizer: Any) -> str | None:
    """The tool-call format a tokenizer's special tokens imply: KIMI_K2, DEEPSEEK_V3 or None."""
    backend = _backend(tokenizer)
    if backend.token_to_id(toolcalls.KIMI_TOOL_TOKEN) is not None:
        return toolcalls.KIMI_K2
    if backend.token_to_id(toolcalls.DS_CALLS_BEGIN) is not None:
        return toolcalls.DEEPSEEK_V3
    return None


class TemplateChatFormat(ChatFormat):
    """A checkpoint's Jinja chat template (see the module docstring).

    tokenizer: a k2sys tokenizer (tokenizers.Tokenizer / TiktokenTokenizer) or a transformers one.
    template: the template string, or {name: template} ("default", "tool_use").
    special_tokens: {bos_token: ..., eos_token: ...} as in the tokenizer config; template variables.
    extra_stop_ids: more ids that end a turn (generation_config.json's eos_token_id).
    mask: "auto" ({% generation %} blocks when present, else prefix rendering), "generation" or "prefix".
    """

    def __init__(self, tokenizer: Any, template: Template, special_tokens: Mapping[str, str] | None = None, *,
                 extra_stop_ids: Sequence[int] = (), mask: str = "auto", source: str = "chat template"):
        if mask not in ("auto", "generation", "prefix"):
            raise ValueError(f"mask={mask!r}; use 'auto', 'generation' or 'prefix'")
        if not template:
            raise ValueError(f"{source}: the chat template is empty")
        backend = _backend(tokenizer)
        self.tokenizer, self.template, self.source, self.mask = tokenizer, template, source, mask
        self.special_tokens = dict(special_tokens or {})
        for attr, tok in self.special_tokens.items():
            if attr not in SPECIAL_TOKEN_ATTRIBUTES:
                raise ValueError(f"{source}: unknown special-token attribute {attr!r}; "
                                 f"expected one of {SPECIAL_TOKEN_ATTRIBUTES}")
            if backend.token_to_id(tok) is None:
                raise ValueError(f"{source}: {attr} {tok!r} is not in the tokenizer's vocabulary")
        self.tool_format = tool_format_of(tokenizer)
        self.name = f"template:{self.tool_format or 'plain'}"
        family_stops = {toolcalls.KIMI_K2: toolcalls.KIMI_END_OF_TURN,
                        toolcalls.DEEPSEEK_V3: toolcalls.DS_END_OF_TURN}.get(self.tool_format, ())
        stop_strings = [self.special_tokens["eos_token"]] if "eos_token" in self.special_tokens else []
        stop_strings += [t for t in family_stops if backend.token_to_id(t) is not None]
        ids: list[int] = []
        for t in stop_strings:
            ids.append(backend.token_to_id(t))
        vocab = backend.get_vocab_size()
        for i in extra_stop_ids:
            if not (isinstance(i, int) and 0 <= i < vocab):
                raise ValueError(f"{source}: stop token id {i!r} is not in the vocabulary 0..{vocab - 1}")
            ids.append(i)
        self._stop_ids = list(dict.fromkeys(ids))
        if not self._stop_ids:
            raise ValueError(f"{source}: no stop token: the config names no eos_token and the tokenizer has no "
                             "known end-of-turn token; set eos_token in tokenizer_config.json")
        self._stop_strings = [s for s in (backend.id_to_token(i) for i in self._stop_ids) if s]
        structure = {toolcalls.KIMI_K2: toolcalls.KIMI_STRUCTURE,
                     toolcalls.DEEPSEEK_V3: toolcalls.DS_STRUCTURE}.get(self.tool_format, ())
        self._reserved = sorted({*self._stop_strings, *self.special_tokens.values(),
                                 *(t for t in structure if backend.token_to_id(t) is not None)}, key=len, reverse=True)

    # -- rendering ----------------------------------------------------------------------------
    def _check(self, messages: Sequence[Mapping], tools: Sequence[Mapping] | None) -> None:
        """Reject message text that contains the format's structural tokens (it would forge turns)."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")

        def walk(value: Any, where: str) -> None:
            if isinstance(value, str):
                for tok in self._reserved:
                    if tok in value:
                        raise ValueError(f"{where} contains the reserved token {tok!r}; remove or escape it "
                                         "before rendering")
            elif isinstance(value, Mapping):
                for k, v in value.items():
                    walk(v, f"{where}.{k}")
            elif isinstance(value, (list, tuple)):
                for k, v in enumerate(value):
                    walk(v, f"{where}[{k}]")

        for i, msg in enumerate(messages):
            if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str):
                raise ValueError(f"messages[{i}] must be a dict with a string 'role'")
            walk(msg, f"messages[{i}]")
        if tools is not None:
            walk(list(tools), "tools")

    def _render(self, messages, tools, add_generation_prompt: bool, track: bool = False):
        return render_template(select_template(self.template, tools, self.source), messages, tools,
                               add_generation_prompt, variables=self.special_tokens, track_generation=track,
                               where=self.source)

    def render(self, messages, tools=None, add_generation_prompt=False) -> str:
        self._check(messages, tools)
        return self._render(messages, tools, add_generation_prompt)[0]

    # -- SFT tokens and mask ----------------------------------------------------------------------
    def assistant_spans(self, messages, tools=None) -> tuple[str, list[tuple[int, int]]]:
        """(rendered conversation, character spans of what the assistant generates)."""
        self._check(messages, tools)
        source = select_template(self.template, tools, self.source)
        use_generation = self.mask == "generation" or (self.mask == "auto" and has_generation_blocks(source))
        if use_generation:
            if not has_generation_blocks(source):
                raise ValueError(f"{self.source}: mask='generation' but the template has no {{% generation %}} block")
            return self._render(messages, tools, False, track=True)
        full = self._render(messages, tools, False)[0]
        spans = []
        for i, msg in enumerate(messages):
            if msg.get("role") != "assistant":
                continue
            where = f"{self.source}, messages[{i}]"
            if i == 0:
                raise ValueError(f"{where}: the conversation starts with an assistant turn; its prompt cannot be "
                                 "rendered (no messages before it)")
            head = self._render(messages[:i], tools, True)[0]
            upto = self._render(messages[:i + 1], tools, False)[0]
            if not (full.startswith(head) and full.startswith(upto) and len(upto) >= len(head)):
                raise ValueError(
                    f"{where}: cannot find the assistant span by rendering prefixes: the template renders an "
                    "earlier turn differently once later turns follow (e.g. it drops reasoning from history). "
                    "Mark the assistant output in the template with {% generation %} ... {% endgeneration %}")
            end = len(upto)
            if not any(upto.endswith(s) for s in self._stop_strings):
                # the turn's closing token, which some templates write only once a later turn follows
                end += next((len(s) for s in self._stop_strings if full.startswith(s, end)), 0)
            spans.append((len(head), end))
        return full, spans

    def tokenize(self, messages, tools=None) -> tuple[list[int], list[int]]:
        text, spans = self.assistant_spans(messages, tools)
        enc = _encode(self.tokenizer, text)
        return list(enc.ids), mask_from_spans(enc.offsets, spans)

    # -- generation ----------------------------------------------------------------------------
    def parse_assistant(self, text: str) -> ParsedAssistant:
        if self.tool_format == toolcalls.KIMI_K2:
            return toolcalls.parse_kimi_k2(text)
        if self.tool_format == toolcalls.DEEPSEEK_V3:
            return toolcalls.parse_deepseek_v3(text, self._stop_strings)
        return toolcalls.parse_plain(text, self._stop_strings)

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self._stop_ids)


# -- finding a checkpoint's format ------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _generation_eos_ids(tok_dir: Path) -> list[int]:
    file = tok_dir / GENERATION_CONFIG
    if not file.is_file():
        return []
    eos = _read_json(file).get("eos_token_id")
    if eos is None:
        return []
    ids = eos if isinstance(eos, list) else [eos]
    if not all(type(i) is int for i in ids):
        raise ValueError(f"{file}: eos_token_id must be an int or a list of ints, got {eos!r}")
    return ids


def has_k2_tokens(tokenizer: Any) -> bool:
    backend = _backend(tokenizer)
    return hasattr(backend, "token_to_id") and all(backend.token_to_id(t) is not None for t in STOP_TOKENS)


def format_for_dir(tok_dir: str | os.PathLike, tokenizer: Any) -> ChatFormat | None:
    """The chat format of the tokenizer stored in `tok_dir` (loaded as `tokenizer`), or None.

    The directory's chat template if it has one (our own K2 template -> K2ChatFormat), else the K2
    format if the tokenizer has the K2 chat tokens, else None.
    """
    tok_dir = Path(tok_dir)
    template = read_chat_template(tok_dir)
    if template is None:
        return K2ChatFormat(tokenizer) if has_k2_tokens(tokenizer) else None
    if template == CHAT_TEMPLATE and has_k2_tokens(tokenizer):
        return K2ChatFormat(tokenizer)
    smap = getattr(tokenizer, "special_tokens_map", None)
    if not isinstance(smap, dict):
        cfg = tok_dir / CONFIG_FILE
        smap = special_tokens_map(_read_json(cfg), str(cfg)) if cfg.is_file() else {}
        extra = tok_dir / SPECIAL_TOKENS_MAP_FILE
        if extra.is_file():  # fills what the config leaves out
            for attr, tok in special_tokens_map(_read_json(extra), str(extra)).items():
                smap.setdefault(attr, tok)
    return TemplateChatFormat(tokenizer, template, smap, extra_stop_ids=_generation_eos_ids(tok_dir),
                              source=f"chat template of {tok_dir}")
