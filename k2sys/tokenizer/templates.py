"""Chat templates of released checkpoints: where they are stored and how they render.

A checkpoint's template is, in the order transformers reads them:
  - `chat_template.jinja` (transformers >= 4.5x saves it so) plus `additional_chat_templates/*.jinja`;
  - else `chat_template` in tokenizer_config.json: a string, or a list of {"name", "template"} dicts
    (several named templates; "default", and "tool_use" when tools are passed).

Rendering follows transformers' `apply_chat_template` so the text is byte-identical: a sandboxed
(immutable) Jinja environment with trim_blocks and lstrip_blocks, the `loopcontrols` extension, a
`tojson` filter that does not escape HTML (json.dumps, ensure_ascii=False), `raise_exception`,
`strftime_now`, the tokenizer's named special tokens (bos_token, eos_token, ...) as variables, and
`{% generation %}...{% endgeneration %}` blocks that mark what the assistant generates. Messages
are copied to plain JSON data first, keys whose value is None are dropped, and a message's
reasoning given as `thinking` / `reasoning` is also offered as `reasoning_content`. `documents`
(retrieval context) is always None: k2sys passes none.
"""

from __future__ import annotations

import json
import os
import re
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
CONFIG_FILE = "tokenizer_config.json"
# Unicode noncharacters (reserved for internal use, never in interchange text) bracket the output of
# {% generation %} blocks while spans are tracked; they are removed before the text is returned.
GEN_START, GEN_END = "\ufdd0", "\ufdd1"
_MARKS = re.compile(f"[{GEN_START}{GEN_END}]")
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
_TRACKING: ContextVar[bool] = ContextVar("k2sys_chat_generation_tracking", default=False)

# Named special-token attributes of a tokenizer config (transformers' SPECIAL_TOKENS_ATTRIBUTES); their
# values are variables of every template.
SPECIAL_TOKEN_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

Template = str | dict[str, str]


def _token_name(value: Any, where: str) -> str | None:
    """A special-token entry of a tokenizer config: a string, an AddedToken dict, or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where} must be a token string or an AddedToken dict with 'content', got {value!r}")


def special_tokens_map(config: dict, where: str) -> dict[str, str]:
    """{bos_token: "[BOS]", ...} from a tokenizer config: the variables a chat template sees."""
    out = {}
    for attr in SPECIAL_TOKEN_ATTRIBUTES:
        name = _token_name(config.get(attr), f"{where}: {attr}")
        if name is not None:
            out[attr] = name
    return out


def read_chat_template(tok_dir: str | os.PathLike) -> Template | None:
    """The chat template(s) stored in a tokenizer directory, or None when it has none.

    Returns one template string, or {name: template} when there are several.
    """
    tok_dir = Path(tok_dir)
    found: dict[str, str] = {}
    if (tok_dir / CHAT_TEMPLATE_FILE).is_file():
        found["default"] = (tok_dir / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (tok_dir / CHAT_TEMPLATE_DIR).is_dir():
        for f in sorted((tok_dir / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            found[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    if found:  # template files take priority over the config entry, as in transformers
        return found["default"] if list(found) == ["default"] else found
    cfg_file = tok_dir / CONFIG_FILE
    if not cfg_file.is_file():
        return None
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
    value = config.get("chat_template") if isinstance(config, dict) else None
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        out = {}
        for k, entry in enumerate(value):
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise ValueError(f"{cfg_file}: chat_template[{k}] must be {{'name': str, 'template': str}}")
            out[entry["name"]] = entry["template"]
        return out
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    raise ValueError(f"{cfg_file}: chat_template must be a string or a list of {{'name', 'template'}} dicts, "
                     f"got {type(value).__name__}")


def select_template(template: Template, tools: Any, where: str = "chat template") -> str:
    """The template to render: the only one, or of several "tool_use" (with tools) / "default"."""
    if isinstance(template, str):
        return template
    if tools is not None and "tool_use" in template:
        return template["tool_use"]
    if "default" in template:
        return template["default"]
    raise ValueError(f"{where}: several chat templates ({sorted(template)}) and none is named 'default'; "
                     "rename the one to use to 'default'")


def has_generation_blocks(source: str) -> bool:
    """Whether the template marks assistant output with {% generation %} blocks."""
    return re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None


@lru_cache(maxsize=64)
def compile_template(source: str):
    """Compile `source` in the sandboxed environment described in the module docstring."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark_generation"), [], [], body).set_lineno(lineno)

        def _mark_generation(self, caller) -> str:
            out = caller()
            return f"{GEN_START}{out}{GEN_END}" if _TRACKING.get() else out

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not parse (line {e.lineno}): {e.message}") from None


def _plain(value: Any, where: str) -> Any:
    """A copy made of JSON types only (what a template may see); anything else is an error."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return _plain(value.item(), where)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(k, where): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise ValueError(f"{where} is a {type(value).__name__}; chat messages and tools must be JSON data "
                     "(dict, list, str, int, float, bool, None)")


def prepare_messages(messages: Sequence[Mapping]) -> list[dict]:
    """Messages as a template receives them (see the module docstring)."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"messages[{i}] must be a dict, got {type(msg).__name__}")
        m = {k: v for k, v in _plain(msg, f"messages[{i}]").items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_KEYS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render_template(source: str, messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None,
                    add_generation_prompt: bool = False, *, variables: Mapping[str, Any] | None = None,
                    track_generation: bool = False, where: str = "chat template") -> tuple[str, list[tuple[int, int]]]:
    """Render one conversation; returns (text, character spans of the {% generation %} blocks).

    `variables` (e.g. the special-token names) are visible to the template; spans are [] unless
    `track_generation`. Template errors (including raise_exception) become ValueError naming `where`.
    """
    import jinja2

    template = compile_template(source)
    msgs = prepare_messages(messages)
    tool_list = None if tools is None else _plain(list(tools), "tools")
    extra = _plain(dict(variables or {}), "template variables")
    if track_generation:
        blob = json.dumps([msgs, tool_list, extra], ensure_ascii=False)
        if GEN_START in blob or GEN_END in blob:
            raise ValueError("messages contain U+FDD0/U+FDD1 (Unicode noncharacters); remove them")
    token = _TRACKING.set(track_generation)
    try:
        text = template.render(**{**extra, "messages": msgs, "tools": tool_list, "documents": None,
                                  "add_generation_prompt": add_generation_prompt})
    except jinja2.TemplateError as e:
        raise ValueError(f"{where}: {type(e).__name__}: {e}") from None
    except (TypeError, KeyError, IndexError, AttributeError, ValueError) as e:
        raise ValueError(f"{where} failed on these messages ({type(e).__name__}: {e}); check that they have the "
                         "fields and types this template expects (e.g. tool-call arguments as a JSON string)") from None
    finally:
        _TRACKING.reset(token)
    if not track_generation:
        return text, []
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos, start, prev = 0, None, 0
    for m in _MARKS.finditer(text):
        parts.append(text[prev:m.start()])
        pos += m.start() - prev
        prev = m.end()
        if m.group() == GEN_START:
            if start is not None:
                raise ValueError(f"{where}: nested {{% generation %}} blocks")
            start = pos
        elif start is None:
            raise ValueError(f"{where}: a {{% generation %}} block's output was cut (by a filter or string method)")
        else:
            spans.append((start, pos))
            start = None
    parts.append(text[prev:])
    if start is not None:
        raise ValueError(f"{where}: a {{% generation %}} block's output was cut (by a filter or string method)")
    return "".join(parts), spans
