"""Every request field SGLang 0.5.23 and the OpenAI API define, and what the native engine does with it.

One table per payload (SGLang /generate and its `sampling_params`, OpenAI /v1/completions and
/v1/chat/completions). A field is
    honoured    - implemented with its documented meaning;
    no effect   - accepted at any value because on a single native engine it changes nothing a
                  client can observe (bookkeeping, routing and tracing labels); listed so it is
                  never a surprise;
    off only    - not implemented: accepted only at the value that means "off" (null, false, 0,
                  [] or {}), any other value is a 400 that names the field.
A field in no table is a 400 "unknown field". docs/engine_api.md holds the same tables, made by
`markdown_tables()` (a test keeps them equal), and tests check the tables cover every field of
SGLang's GenerateReqInput / SamplingParams / CompletionRequest / ChatCompletionRequest and of the
`openai` package's create-params.

Field lists read from sglang 0.5.23 (`srt/managers/io_struct.py` GenerateReqInput,
`srt/sampling/sampling_params.py`, `srt/entrypoints/openai/protocol.py`) and openai-python's
`types/completion_create_params.py` and `types/chat/completion_create_params.py`.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from k2sys.engine.errors import RequestError

__all__ = ["CHAT", "COMPLETIONS", "ApiError", "FieldSpec", "GENERATE", "HONOURED", "JsonLimits", "NO_EFFECT",
           "OFF_ONLY", "SAMPLING", "check_sampling_types", "check_token_ids", "dumps", "is_off", "markdown_tables",
           "parse_json_body", "read_json", "show"]

HONOURED, NO_EFFECT, OFF_ONLY = "honoured", "no effect", "off only"


@dataclass(frozen=True)
class FieldSpec:
    status: str
    note: str = ""
    off: tuple = ()
    """For OFF_ONLY: the accepted values."""


def _h(note: str = "") -> FieldSpec:
    return FieldSpec(HONOURED, note)


def _n(note: str) -> FieldSpec:
    return FieldSpec(NO_EFFECT, note)


def _off(*values: Any, note: str = "") -> FieldSpec:
    return FieldSpec(OFF_ONLY, note, values)


_MM = "no multimodal inputs (text-only model)"
_PD = "no prefill/decode disaggregation"
_DP = "one data-parallel rank: only 0 or null"
_LORA = "no LoRA adapters"

GENERATE: dict[str, FieldSpec] = {
    "rid": _h("request id (a batch: one per prompt, or a prefix)"),
    "session_id": _n("an identity label; the prompt is not changed (as in SGLang)"),
    "text": _h(),
    "input_ids": _h(),
    "input_embeds": _off(None, note="token ids or text only"),
    "image_data": _off(None, note=_MM), "video_data": _off(None, note=_MM), "audio_data": _off(None, note=_MM),
    "mm_hashes": _off(None, note=_MM), "mm_content_hashes": _off(None, note=_MM),
    "use_audio_in_video": _off(False, None, note=_MM), "video_config": _off(None, note=_MM),
    "sampling_params": _h("see the sampling_params table"),
    "watermark": _off(None, note="no watermarking"),
    "return_logprob": _h("output_token_logprobs (+ input_token_logprobs, output_token_logprobs_length)"),
    "logprob_start_len": _h("prompt log-probs from this position (-1: none), computed in the prefill"),
    "top_logprobs_num": _h("input_top_logprobs / output_top_logprobs"),
    "token_ids_logprob": _h("input_token_ids_logprobs / output_token_ids_logprobs"),
    "return_sampling_mask": _off(None, False, note="sampling support is not returned"),
    "sampling_logprobs_mode": _off(None, note="sampling support is not returned"),
    "return_text_in_logprobs": _h("each logprob triple carries its token's text"),
    "return_flat_raw_top_logprobs": _off(False, None, note="nested lists only"),
    "return_flat_raw_output_top_logprobs": _off(False, None, note="nested lists only"),
    "return_flat_raw_top_logprobs_b64": _off(False, None, note="nested lists only"),
    "stream": _h("server-sent events, cumulative like SGLang"),
    "log_metrics": _n("the native engine keeps no per-request metrics"),
    "return_hidden_states": _off(False, None, note="hidden states are not returned"),
    "return_routed_experts": _off(False, None, note="routed experts are not captured"),
    "routed_experts_start_len": _off(0, None, note="routed experts are not captured"),
    "return_indexer_topk": _off(False, None, note="no sparse-attention indexer"),
    "modalities": _off(None, [], note=_MM),
    "session_params": _off(None, note="no session prompt reconstruction"),
    "lora_path": _off(None, note=_LORA), "lora_id": _off(None, note=_LORA),
    "custom_logit_processor": _off(None, note="no custom logit processors"),
    "positional_embed_overrides": _off(None, note="token ids or text only"),
    "bootstrap_host": _off(None, note=_PD), "bootstrap_port": _off(None, note=_PD),
    "bootstrap_room": _off(None, note=_PD), "bootstrap_pair_key": _off(None, note=_PD),
    "decode_tp_size": _off(None, note=_PD), "disagg_prefill_dp_rank": _off(None, note=_PD),
    "routed_dp_rank": _off(None, 0, note=_DP), "data_parallel_rank": _off(None, 0, note=_DP),
    "routing_key": _n("one engine, no router"),
    "conversation_id": _n("a tracking label"),
    "http_worker_ipc": _off(None, note="internal to SGLang"),
    "background": _off(False, None, note="no background responses"),
    "require_reasoning": _off(False, None, note="no hybrid-reasoning switch"),
    "max_thinking_tokens": _off(None, note="no thinking budget"),
    "priority": _off(None, note="first-come first-served scheduling only"),
    "extra_key": _h("prefix-cache namespace (with cache_salt)"),
    "no_logs": _n("the native engine logs no request contents"),
    "custom_labels": _n("metric labels; the native engine keeps no per-request metrics"),
    "return_bytes": _off(False, None, note="text outputs only"),
    "return_entropy": _off(False, None, note="entropy is not returned"),
    "return_prompt_token_ids": _h("the response carries prompt_token_ids"),
    "external_trace_header": _n("no tracing"),
    "received_time": _n("timing label"),
    "need_wait_for_mm_inputs": _off(None, False, note=_MM), "num_items_assigned": _off(None, note=_MM),
    "encoder_urls": _off(None, note=_MM),
    "max_dynamic_patch": _off(None, note=_MM), "min_dynamic_patch": _off(None, note=_MM),
    "image_max_dynamic_patch": _off(None, note=_MM), "video_max_dynamic_patch": _off(None, note=_MM),
    "images_config": _off(None, note=_MM), "mm_processor_kwargs": _off(None, note=_MM),
    "multi_item_delimiter_indices": _off(None, note="no multi-item scoring"),
    "token_indices_to_pool": _off(None, note="no pooling readout"),
    "cache_salt": _h("prefix-cache namespace: only requests with the same salt share cached blocks"),
    "kv_hints": _off(None, note="no hierarchical cache"),
}

SAMPLING: dict[str, FieldSpec] = {
    "max_new_tokens": _h("0 = prefill only (e.g. for prompt log-probs)"),
    "stop": _h("stop strings, trimmed from the text unless no_stop_trim"),
    "stop_token_ids": _h(),
    "stop_regex": _h("Python regexes searched in the decoded output; trimmed at the match like stop strings"),
    "temperature": _h("< 1e-6 is greedy"),
    "top_p": _h(), "top_k": _h("-1 = off"), "min_p": _h(),
    "frequency_penalty": _h("OpenAI: logit - f * count of the token in the output"),
    "presence_penalty": _h("OpenAI: logit - p if the token is in the output"),
    "repetition_penalty": _h("HF: tokens of prompt + output, logit * r if < 0 else logit / r"),
    "min_new_tokens": _h("EOS and stop ids are masked until then"),
    "n": _h("samples share the prompt's KV"),
    "beam_width": _off(None, 1, note="no beam search"),
    "json_schema": _h("structured output (xgrammar token masks)"),
    "regex": _h("structured output (xgrammar token masks)"),
    "ebnf": _h("structured output, GBNF/EBNF grammar (xgrammar)"),
    "structural_tag": _off(None, "", note="structural tags are not supported; use json_schema / regex / ebnf"),
    "ignore_eos": _h(), "skip_special_tokens": _h(),
    "spaces_between_special_tokens": _n("as in SGLang with a fast tokenizer, decoding does not use it"),
    "no_stop_trim": _h(),
    "stream_interval": _h("stream every k tokens (the final chunk is always sent)"),
    "logit_bias": _h("{token id: bias} added to the logits"),
    "sampling_seed": _h("reproducible per request in any batch"),
    "custom_params": _off(None, {}, note="no custom logit processors"),
    "watermark": _off(None, note="no watermarking"),
    "seed": _h("k2sys alias of sampling_seed"),
}

_SGLANG_OPENAI_COMMON: dict[str, FieldSpec] = {
    "bootstrap_host": _off(None, note=_PD), "bootstrap_port": _off(None, note=_PD),
    "bootstrap_room": _off(None, note=_PD), "routed_dp_rank": _off(None, 0, note=_DP),
    "disagg_prefill_dp_rank": _off(None, note=_PD), "data_parallel_rank": _off(None, 0, note=_DP),
    "return_hidden_states": _off(False, None, note="hidden states are not returned"),
    "return_routed_experts": _off(False, None, note="routed experts are not captured"),
    "routed_experts_start_len": _off(0, None, note="routed experts are not captured"),
    "return_cached_tokens_details": _off(False, None, note="usage reports totals only"),
    "return_spec_tokens_details": _off(False, None, note="no speculative decoding"),
    "top_k": _h(), "min_p": _h(), "min_tokens": _h("= min_new_tokens"),
    "regex": _h("structured output"), "ebnf": _h("structured output"),
    "repetition_penalty": _h("HF semantics, as in sampling_params"),
    "stop_token_ids": _h(), "stop_regex": _h(), "no_stop_trim": _h(), "ignore_eos": _h(),
    "skip_special_tokens": _h(),
    "lora_path": _off(None, note=_LORA),
    "session_id": _n("an identity label"),
    "session_params": _off(None, note="no session prompt reconstruction"),
    "custom_params": _off(None, {}, note="no custom logit processors"),
    "custom_logit_processor": _off(None, note="no custom logit processors"),
    "watermark": _off(None, note="no watermarking"),
    "images_config": _off(None, note=_MM), "mm_processor_kwargs": _off(None, note=_MM),
    "rid": _h("request id"),
    "extra_key": _h("prefix-cache namespace"), "cache_salt": _h("prefix-cache namespace"),
    "priority": _off(None, note="first-come first-served scheduling only"),
}

_OPENAI_COMMON: dict[str, FieldSpec] = {
    "model": _n("one model is served; any name is accepted and the served name is reported"),
    "frequency_penalty": _h("OpenAI semantics"), "presence_penalty": _h("OpenAI semantics"),
    "logit_bias": _h("{token id: bias in [-100, 100]}"),
    "n": _h(), "seed": _h(), "stop": _h(), "stream": _h(),
    "stream_options": _h("include_usage; continuous_usage_stats off only"),
    "temperature": _h(), "top_p": _h(),
    "user": _n("an end-user label"),
}

COMPLETIONS: dict[str, FieldSpec] = {
    **_OPENAI_COMMON, **_SGLANG_OPENAI_COMMON,
    "prompt": _h("string, list of strings, token ids or a list of token id lists"),
    "best_of": _off(None, 1, note="no server-side best-of; use n and rank client-side"),
    "echo": _h("the prompt is prepended to the text (and its log-probs to logprobs, computed in the prefill)"),
    "logprobs": _h("0-20: token log-probs and the top-k alternatives (+ the chosen token, as OpenAI)"),
    "max_tokens": _h("0 allowed with echo (prompt log-probs only)"),
    "suffix": _off(None, "", note="no insertion (fill-in-the-middle)"),
    "return_token_ids": _h("choices carry token_ids and prompt_token_ids"),
    "json_schema": _h("structured output"),
    "response_format": _h("text / json_object / json_schema (structured output)"),
    "custom_labels": _n("metric labels; the native engine keeps no per-request metrics"),
}

CHAT: dict[str, FieldSpec] = {
    **_OPENAI_COMMON, **_SGLANG_OPENAI_COMMON,
    "messages": _h("roles system/developer/user/assistant/tool; content a string or a list of text parts"),
    "logprobs": _h(), "top_logprobs": _h("0-20 alternatives per token"),
    "max_tokens": _h(), "max_completion_tokens": _h("takes precedence over max_tokens"),
    "response_format": _h("text / json_object / json_schema (structured output)"),
    "tools": _h("rendered by the model's chat format"),
    "tool_choice": _h("auto / none / required / {type: function, function: {name}}"),
    "parallel_tool_calls": _h("false: only the first tool call is returned"),
    "audio": _off(None, note="text output only"),
    "function_call": _off(None, "auto", "none", note="legacy functions: use tools / tool_choice"),
    "functions": _off(None, [], note="legacy functions: use tools"),
    "metadata": _n("stored-completion metadata; nothing is stored"),
    "modalities": _off(None, ["text"], note="text output only"),
    "moderation": _off(None, note="no moderation"),
    "prediction": _off(None, note="no predicted outputs"),
    "prompt_cache_key": _n("the prefix cache works on token content"),
    "prompt_cache_options": _off(None, note="the prefix cache is automatic"),
    "prompt_cache_retention": _off(None, note="the prefix cache is automatic (LRU)"),
    "reasoning_effort": _off(None, note="no reasoning-effort control"),
    "safety_identifier": _n("an end-user label"),
    "service_tier": _off(None, "auto", "default", note="one service tier"),
    "store": _off(None, False, note="nothing is stored"),
    "verbosity": _off(None, note="no verbosity control"),
    "web_search_options": _off(None, note="no web search"),
    "return_prompt_token_ids": _h("choices carry prompt_token_ids"),
    "return_token_ids": _h("choices carry token_ids"),
    "return_meta_info": _off(False, None, note="OpenAI shape only"),
    "return_input_ids_in_sglext": _off(False, None, note="no sglext block"),
    "return_output_ids_in_sglext": _off(False, None, note="no sglext block"),
    "return_sampling_mask": _off(False, None, note="sampling support is not returned"),
    "sampling_logprobs_mode": _off(None, note="sampling support is not returned"),
    "return_flat_raw_output_top_logprobs": _off(False, None, note="nested lists only"),
    "return_flat_raw_top_logprobs_b64": _off(False, None, note="nested lists only"),
    "thinking": _off(None, note="no thinking switch"),
    "task": _off(None, note="no task-specific rendering"),
    "continue_final_message": _off(False, None, note="the reply always starts a new assistant turn"),
    "separate_reasoning": _n("no reasoning parser is configured: there is no reasoning to separate"),
    "stream_reasoning": _n("no reasoning parser is configured"),
    "chat_template_kwargs": _off(None, {}, note="the chat format takes no extra template variables"),
    "max_dynamic_patch": _off(None, note=_MM), "min_dynamic_patch": _off(None, note=_MM),
    "use_audio_in_video": _off(False, None, note=_MM), "video_config": _off(None, note=_MM),
    "input_ids": _off(None, note="send messages (or use /generate with input_ids)"),
    "skip_special_tokens": _n("the reply is parsed from the text with special tokens kept; content holds no markup"),
}


# ---- request bodies: size, encoding, depth and number limits --------------------------------------
class ApiError(RequestError):
    """A request refused with a specific HTTP status (413 too large, 429 overloaded, 503 not now);
    the message names the field or limit and the fix. Plain RequestErrors are 400s."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, dict(headers or {})


@dataclass(frozen=True)
class JsonLimits:
    """What a request body may be before any of it is looked at (`k2sys serve` flags)."""
    max_body_bytes: int = 64 << 20
    """--max-body-bytes: every route but /update_weights_from_tensor."""
    max_weight_body_bytes: int = 4 << 30
    """--max-weight-body-bytes: /update_weights_from_tensor (base64 tensors; send big updates in buckets)."""
    max_depth: int = 64
    """--max-json-depth: nesting of objects and arrays (the body itself is level 1)."""
    max_number_chars: int = 40
    """Characters of one JSON number (int64 needs 20; 5,000-digit numbers are refused, not parsed)."""
    thread_bytes: int = 1 << 20
    """Bodies larger than this are decoded and parsed on a worker thread that yields the GIL, so
    the event loop (and /health) keeps answering while they are read."""


DEFAULT_LIMITS = JsonLimits()
_DIGIT_RUNS = bytes.maketrans(b"0123456789", b"0" * 10)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class _NumberTooLarge(ValueError):
    pass


def _decode_utf8(raw: bytes, in_pieces: bool) -> str:
    if not in_pieces:
        return raw.decode("utf-8")
    dec, parts, step = codecs.getincrementaldecoder("utf-8")(), [], 1 << 20
    for i in range(0, len(raw), step):  # pieces: the GIL is released between them
        try:
            parts.append(dec.decode(raw[i:i + step], final=i + step >= len(raw)))
        except UnicodeDecodeError as e:
            raise UnicodeDecodeError(e.encoding, raw, i + e.start, i + e.end, e.reason) from None
    return "".join(parts)


def parse_json_body(raw: bytes, limits: JsonLimits = DEFAULT_LIMITS, *, allow_empty: bool = True,
                    in_thread: bool = False) -> dict:
    """A request body -> its JSON object, or a RequestError (400) naming what is wrong and the fix:
    not UTF-8, malformed, not an object, nested deeper than limits.max_depth, a number longer than
    limits.max_number_chars or out of the float range, NaN/Infinity, or a string holding a lone
    UTF-16 surrogate (which no tokenizer or JSON encoder can take). in_thread: parse with Python
    number hooks, so a thread parsing a big body lets the event loop run between numbers."""
    if not raw.strip():
        if allow_empty:
            return {}
        raise RequestError("body: empty; send a JSON object")
    try:
        text = _decode_utf8(raw, in_thread)
    except UnicodeDecodeError as e:
        raise RequestError(f"body: not valid UTF-8 (bytes {raw[e.start:e.start + 4]!r} at offset {e.start}); "
                           "encode the JSON body as UTF-8") from None
    max_chars = limits.max_number_chars

    def number(s: str, kind: type) -> Any:
        if len(s) > max_chars:
            raise _NumberTooLarge(f"body: the number {s[:24]}... has {len(s)} characters (limit {max_chars}); "
                                  "send numbers in the int64 / float64 range")
        v = kind(s)
        if kind is float and not math.isfinite(v):
            raise _NumberTooLarge(f"body: the number {s} is out of the float64 range; send a finite number")
        return v

    def constant(s: str) -> Any:
        raise _NumberTooLarge(f"body: {s} is not JSON; send a finite number")

    hooks: dict[str, Any] = {"parse_float": lambda s: number(s, float), "parse_constant": constant}
    if in_thread or (b"0" * (max_chars + 1)) in raw.translate(_DIGIT_RUNS):
        hooks["parse_int"] = lambda s: number(s, int)
    try:
        body = json.loads(text, **hooks)
    except _NumberTooLarge as e:
        raise RequestError(str(e)) from None
    except RecursionError:
        raise RequestError(f"body: JSON nested deeper than {limits.max_depth} levels; flatten the request") from None
    except json.JSONDecodeError as e:
        raise RequestError(f"body: malformed JSON ({e}); send a JSON object") from None
    except ValueError as e:
        raise RequestError(f"body: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(f"body: expected a JSON object, got {type(body).__name__}")
    _check_tree(body, limits.max_depth, strings=_SURROGATE_ESCAPE.search(raw) is not None)
    return body


def _check_tree(body: dict, max_depth: int, strings: bool) -> None:
    """Nesting depth of every value; with `strings`, that no string (or key) holds a lone surrogate."""
    containers = (dict, list)

    def text_ok(s: str, where: str) -> None:
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(f"{where}: holds a lone UTF-16 surrogate (U+{ord(s[e.start]):04X} at character "
                               f"{e.start}); send valid Unicode (surrogates only in pairs)") from None

    stack: list[tuple[Any, int, str]] = [(body, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if type(node) is str:
            text_ok(node, path or "body")
            continue
        if depth > max_depth:
            raise RequestError(f"{path or 'body'}: JSON nested deeper than {max_depth} levels; flatten the request")
        if type(node) is dict:
            for k, v in node.items():
                where = f"{path}.{k}" if path else str(k)
                if strings:
                    text_ok(k, f"{path or 'body'} key")
                if type(v) in containers or (strings and type(v) is str):
                    stack.append((v, depth + 1, where))
        else:
            kinds = set(map(type, node))  # C speed on long token lists
            if dict in kinds or list in kinds or (strings and str in kinds):
                for i, v in enumerate(node):
                    if type(v) in containers or (strings and type(v) is str):
                        stack.append((v, depth + 1, f"{path}[{i}]"))


def limits_of(request: Any) -> JsonLimits:
    app = request.scope.get("app") if hasattr(request, "scope") else None
    return getattr(getattr(app, "state", None), "json_limits", None) or DEFAULT_LIMITS


async def read_body(request: Any, max_bytes: int) -> bytes:
    """The raw body, refused with a 413 as soon as it is known to exceed max_bytes (Content-Length,
    or the bytes received so far): a huge body is never held in memory."""
    def too_large(n: int | str) -> ApiError:
        return ApiError(413, f"body: {n} bytes is over this server's limit of {max_bytes} bytes "
                             "(k2sys serve --max-body-bytes / --max-weight-body-bytes); send a smaller request, "
                             "e.g. split the batch")

    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError(f"Content-Length: {declared!r} is not a byte count")
        if int(declared) > max_bytes:
            raise too_large(int(declared))
    cached = getattr(request, "_body", None)
    if cached is not None:
        if len(cached) > max_bytes:
            raise too_large(len(cached))
        return cached
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large(f"more than {size}")
        chunks.append(chunk)
    raw = b"".join(chunks)
    request._body = raw  # Starlette's cache: request.body() still works afterwards
    return raw


async def read_json(request: Any, allow_empty: bool = True, *, weights: bool = False) -> dict:
    """The JSON object body of an HTTP request under the app's JsonLimits (parse_json_body): a 413
    over the size limit, a 400 naming the problem otherwise. Big bodies are parsed off the event loop."""
    limits = limits_of(request)
    raw = await read_body(request, limits.max_weight_body_bytes if weights else limits.max_body_bytes)
    if len(raw) > limits.thread_bytes:
        return await asyncio.to_thread(parse_json_body, raw, limits, allow_empty=allow_empty, in_thread=True)
    return parse_json_body(raw, limits, allow_empty=allow_empty)


def dumps(obj: Any) -> bytes:
    """JSON bytes of a response: ASCII-safe and never invalid JSON (a non-finite float, e.g. the
    log-prob of a masked token, is written as -9999.0 / 9999.0 as vLLM does; NaN as null)."""
    try:
        return json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()
    except ValueError:
        return json.dumps(_finite(obj), allow_nan=False, separators=(",", ":")).encode()


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if obj != obj else (9999.0 if obj > 0 else -9999.0)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# ---- field values ----------------------------------------------------------------------------------
def is_token_list(v: Any) -> bool:
    """A non-empty list of JSON ints (not bools): checked at C speed for long prompts."""
    return isinstance(v, list) and bool(v) and set(map(type, v)) == {int}


def check_token_ids(ids: list, name: str, vocab: int, max_len: int | None = None) -> None:
    """A list of token ids: ints in [0, vocab), at most max_len of them (length first: cheap)."""
    if not isinstance(ids, list):
        raise RequestError(f"{name}: must be a list of token ids, got {show(ids)}")
    if max_len is not None and len(ids) > max_len:
        raise RequestError(f"{name}: {len(ids)} tokens is more than {max_len}; shorten it")
    if ids and not set(map(type, ids)) <= {int}:
        bad = next(t for t in ids if type(t) is not int)
        raise RequestError(f"{name}: token ids must be ints, got {show(bad)}")
    if ids and (min(ids) < 0 or max(ids) >= vocab):
        bad = min(ids) if min(ids) < 0 else max(ids)
        raise RequestError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab})")


def show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


# SGLang sampling_params: the JSON types each field may have (null = the default); checked before
# config.SamplingParams sees the values, so a wrong type is a 400 naming the field, never a crash.
_NUM, _INT, _STR, _BOOL, _LIST, _DICT = (int, float), int, str, bool, list, dict
SAMPLING_TYPES: dict[str, tuple[type, ...]] = {
    "max_new_tokens": (_INT,), "temperature": _NUM, "top_p": _NUM, "top_k": (_INT,), "min_p": _NUM,
    "frequency_penalty": _NUM, "presence_penalty": _NUM, "repetition_penalty": _NUM, "min_new_tokens": (_INT,),
    "n": (_INT,), "stop": (_STR, _LIST), "stop_token_ids": (_LIST,), "stop_regex": (_STR, _LIST),
    "ignore_eos": (_BOOL,), "skip_special_tokens": (_BOOL,), "spaces_between_special_tokens": (_BOOL,),
    "no_stop_trim": (_BOOL,), "sampling_seed": (_INT,), "seed": (_INT,), "logit_bias": (_DICT,),
    "json_schema": (_STR,), "regex": (_STR,), "ebnf": (_STR,), "stream_interval": (_INT,),
}


def check_sampling_types(d: Any, where: str = "sampling_params") -> None:
    if d is None:
        return
    if not isinstance(d, dict):
        raise RequestError(f"{where}: must be an object, got {show(d)}")
    for key, v in d.items():
        kinds = SAMPLING_TYPES.get(key)
        if v is None or kinds is None:
            continue  # null = default; unknown / off-only fields are named by SamplingParams.from_sglang
        ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
        if not ok:
            names = "/".join({int: "int", float: "number", str: "string", bool: "bool", list: "list",
                              dict: "object"}[k] for k in kinds)
            raise RequestError(f"{where}.{key}: must be {names}, got {show(v)}")
    if isinstance(d.get("stop"), list) and not all(isinstance(s, str) for s in d["stop"]):
        raise RequestError(f"{where}.stop: must be a string or a list of strings, got {show(d['stop'])}")
    if isinstance(d.get("stop_regex"), list) and not all(isinstance(s, str) for s in d["stop_regex"]):
        raise RequestError(f"{where}.stop_regex: must be a string or a list of strings, got {show(d['stop_regex'])}")


def _same(value: Any, off: Any) -> bool:
    return value == off and isinstance(value, bool) == isinstance(off, bool) and (value is None) == (off is None)


def is_off(value: Any, spec: FieldSpec, per_item: bool) -> bool:
    if any(_same(value, o) for o in spec.off):
        return True
    # a batched /generate may send one value per prompt
    return per_item and isinstance(value, list) and bool(value) and all(is_off(v, spec, False) for v in value)


def markdown_tables() -> str:
    """The field tables of docs/engine_api.md."""
    out = []
    for title, table in (("SGLang `/generate` (GenerateReqInput)", GENERATE),
                         ("SGLang `sampling_params` (also read by /generate's batched form)", SAMPLING),
                         ("OpenAI `/v1/completions`", COMPLETIONS),
                         ("OpenAI `/v1/chat/completions`", CHAT)):
        out.append(f"### {title}\n\n| field | status | notes |\n|---|---|---|")
        for name in sorted(table):
            spec = table[name]
            note = spec.note
            if spec.status == OFF_ONLY:
                offs = ", ".join("null" if o is None else repr(o) for o in spec.off)
                note = f"accepted: {offs}" + (f"; {note}" if note else "")
            out.append(f"| `{name}` | {spec.status} | {note.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)
