"""OpenAI-compatible routes of `k2sys serve`: /v1/models, /v1/completions, /v1/chat/completions.

Every field of the OpenAI API (and SGLang's additions to it) is honoured or refused with a 400
that names it: the bodies are parsed by bodies.CompletionsBody / bodies.ChatBody, made from the
api_fields tables; what needs the engine (token ids, the context, the chat format) is checked here.
What the routes add on top of the engine:
  - completions `echo` + `logprobs` return the prompt's log-probs computed in the prefill
    (logprob_start_len=0), the shape lm-evaluation-harness' loglikelihood reads;
  - `logprobs=k` / `top_logprobs=k` return the k most likely tokens at each position, plus the
    chosen one (as OpenAI: up to k + 1 entries);
  - chat messages may carry content as a list of text parts and the role `developer` (= system);
  - tool-call ids in any form (OpenAI's `call_...`) are mapped to the model's own id format when
    the format has one (Kimi K2: functions.NAME:IDX, numbered over the conversation), and the
    reply's ids come back in the client's form;
  - tool_choice: a named function starts the reply with the format's markup opening that call and
    constrains the arguments to its parameter schema; `required` constrains the reply to a JSON
    array of calls (as SGLang does); both need xgrammar (see ToolChoice).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import Response

from k2sys.engine.api.api_fields import ApiError, check_token_ids, dumps, read_json
from k2sys.engine.api.openai_bodies import (MAX_TOP_LOGPROBS, ChatBody, CompletionsBody, check_tools, message_text,
                                            response_grammar)
from k2sys.engine.api.params import LogprobOptions, SamplingParams
from k2sys.engine.errors import EngineError, RequestError

__all__ = ["JSON", "MAX_TOP_LOGPROBS", "OpenAIRoutes", "check_tools", "normalize_messages", "render_prompt"]


class JSON(Response):
    """JSON that is always valid and ASCII (a lone surrogate or a -inf log-prob never turns into a 500)."""
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


def _text_bytes(obj: Any) -> int:
    """Characters of all strings in a (depth-limited) JSON value."""
    if isinstance(obj, str):
        return len(obj)
    if isinstance(obj, dict):
        return sum(_text_bytes(v) for v in obj.values())
    if isinstance(obj, list):
        return sum(_text_bytes(v) for v in obj)
    return 0


async def render_prompt(engine: Any, messages: list[dict], tools: list | None, **kw: Any) -> list[int]:
    """Prompt ids of a chat, rendered and tokenized on a worker thread (a conversation certainly longer
    than the context is refused first); whatever the chat format makes of the messages, a failure is
    a 400 about them."""
    def run() -> list[int]:
        size = _text_bytes(messages) + _text_bytes(tools)
        if size >= engine.max_model_len and size > engine.max_model_len * engine.max_token_bytes():
            raise RequestError(f"messages: {size} characters cannot fit max_model_len={engine.max_model_len} "
                               "tokens; shorten the conversation")
        try:
            return engine.render_chat(messages, tools, **kw)
        except (RequestError, EngineError):
            raise
        except Exception as e:  # noqa: BLE001 - the messages are the only input
            raise RequestError(f"messages: the chat format cannot render them ({type(e).__name__}: "
                               f"{str(e)[:200]})") from None
    ids = await asyncio.to_thread(run)
    if len(ids) >= engine.max_model_len:
        raise RequestError(f"messages: the prompt is {len(ids)} tokens, which does not fit max_model_len="
                           f"{engine.max_model_len}; shorten the conversation")
    return ids


def sampling_from_openai(body: Any, max_new_tokens: int, *, grammar: str | None = None,
                         extra_stop_ids: list[int] = (), skip_special_tokens: bool | None = None) -> SamplingParams:
    """SamplingParams from a parsed CompletionsBody / ChatBody (field types already checked there;
    the ranges are SamplingParams', its messages renamed to OpenAI's fields). `grammar` is a JSON
    schema the route imposes (tool_choice), `skip_special_tokens` a value it imposes."""
    sp: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("n", "n"), ("stop", "stop"),
                         ("sampling_seed", "seed"), ("top_k", "top_k"), ("min_p", "min_p"),
                         ("ignore_eos", "ignore_eos"), ("min_new_tokens", "min_tokens"),
                         ("frequency_penalty", "frequency_penalty"), ("presence_penalty", "presence_penalty"),
                         ("repetition_penalty", "repetition_penalty"), ("stop_regex", "stop_regex"),
                         ("no_stop_trim", "no_stop_trim"), ("regex", "regex"), ("ebnf", "ebnf"),
                         ("json_schema", "json_schema"), ("skip_special_tokens", "skip_special_tokens"),
                         ("logit_bias", "logit_bias")):
        v = getattr(body, theirs, None)
        if v is not None:
            sp[ours] = v
    sp["stop_token_ids"] = list(body.stop_token_ids or []) + list(extra_stop_ids)
    if skip_special_tokens is not None:
        sp["skip_special_tokens"] = skip_special_tokens
    rf = response_grammar(body.response_format)  # a clash with regex / ebnf / json_schema: refused by the body
    if rf is not None:
        sp[rf[0]] = rf[1]
    if grammar is not None:
        sp["json_schema"] = grammar
    try:
        return SamplingParams.from_sglang(sp)
    except RequestError as e:  # name the OpenAI field, not ours
        raise RequestError(openai_names(str(e))) from None


def openai_names(msg: str) -> str:
    """An engine message about sampling_params, in OpenAI's field names."""
    msg = msg.removeprefix("sampling_params.")
    for ours, theirs in (("sampling_seed", "seed"), ("min_new_tokens", "min_tokens"),
                         ("max_new_tokens", "max_tokens")):
        msg = msg.replace(ours, theirs)
    return msg


# ---- chat messages -------------------------------------------------------------------------------
def _kimi_ids(fmt: Any) -> bool:
    from k2sys.tokenizer import toolcalls
    from k2sys.tokenizer.formats import K2ChatFormat

    return isinstance(fmt, K2ChatFormat) or getattr(fmt, "tool_format", None) == toolcalls.KIMI_K2


def normalize_messages(messages: Any, fmt: Any) -> tuple[list[dict], dict[str, str], int]:
    """OpenAI messages -> what the model's chat format renders.

    Returns (messages, id_map, calls): id_map maps the client's tool-call ids to the model's own
    (empty when the ids were already the model's, or the format has no ids of its own); calls is
    the number of tool calls in the history (the next call's index in Kimi K2's numbering)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: a non-empty list of {role, content} objects")
    kimi = _kimi_ids(fmt)
    from k2sys.tokenizer.chat import _CALL_ID_RE

    out, id_map, calls = [], {}, 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where}: must be an object with role and content")
        m = dict(m)
        if m.get("role") == "developer":
            m["role"] = "system"  # OpenAI's newer name for the system prompt
        if "content" in m:
            m["content"] = message_text(m["content"], f"{where}.content")
        if m.get("role") == "assistant" and m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list):
                raise RequestError(f"{where}.tool_calls: must be a list")
            mapped = []
            for j, tc in enumerate(m["tool_calls"]):
                if not isinstance(tc, dict):
                    raise RequestError(f"{where}.tool_calls[{j}]: must be an object")
                tc = dict(tc)
                name = (tc.get("function") or {}).get("name") if isinstance(tc.get("function"), dict) else None
                cid = tc.get("id")
                if kimi and isinstance(name, str):
                    own = f"functions.{name}:{calls}"
                    hit = _CALL_ID_RE.fullmatch(cid) if isinstance(cid, str) else None
                    if cid is not None and (hit is None or hit.group(1) != name):
                        if cid in id_map:
                            raise RequestError(f"{where}.tool_calls[{j}].id {cid!r} is used twice")
                        id_map[cid] = own
                        tc["id"] = own
                mapped.append(tc)
                calls += 1
            m["tool_calls"] = mapped
        if m.get("role") == "tool" and m.get("tool_call_id") in id_map:
            m["tool_call_id"] = id_map[m["tool_call_id"]]
        out.append(m)
    return out, id_map, calls


class ToolChoice:
    """How a chat reply is made to call tools (tool_choice).

    auto / none: the model decides (none: tools are not shown).
    named {"type": "function", "function": {"name": N}}: the reply starts with the format's markup
        opening a call of N (Kimi K2: <|tool_calls_section_begin|><|tool_call_begin|>functions.N:IDX
        <|tool_call_argument_begin|>); the model writes the arguments, constrained to N's parameter
        schema; the markup closing the call is added after them.
    required: the reply is a JSON array of {"name", "parameters"} objects constrained to the tools'
        schemas (SGLang's approach), turned into tool calls.
    """

    def __init__(self, choice: Any, tools: list | None, fmt: Any, calls: int, parallel: bool):
        from k2sys.tokenizer import toolcalls

        self.mode, self.prefix, self.suffix, self.schema, self.name = "auto", "", "", None, None
        self.calls, self.kimi = calls, _kimi_ids(fmt)
        if choice in (None, "auto", "none"):
            return
        # ChatBody checked the choice's shape, that tools are given and that a named function is one of them
        params = {}
        for t in tools or []:
            schema = t["function"].get("parameters")
            params[t["function"]["name"]] = schema if isinstance(schema, dict) else {"type": "object"}
        if isinstance(choice, dict):
            name = choice["function"]["name"]
            self.mode, self.name, self.schema = "named", name, params[name]
            if self.kimi:
                self.prefix = (f"{toolcalls.KIMI_TOOL_TOKEN}<|tool_call_begin|>functions.{name}:{calls}"
                               "<|tool_call_argument_begin|>")
                self.suffix = "<|tool_call_end|><|tool_calls_section_end|>"
            elif getattr(fmt, "tool_format", None) == toolcalls.DEEPSEEK_V3:
                self.prefix = f"{toolcalls.DS_CALLS_BEGIN}{toolcalls.DS_CALL_BEGIN}function{toolcalls.DS_SEP}{name}\n```json\n"
                self.suffix = f"\n```{toolcalls.DS_CALL_END}{toolcalls.DS_CALLS_END}"
            else:
                raise RequestError(f"tool_choice={choice!r}: the model's chat format ({fmt!r}) has no tool-call markup")
        else:  # required
            self.mode = "required"
            self.schema = {"type": "array", "minItems": 1, "items": {"anyOf": [
                {"type": "object", "properties": {"name": {"type": "string", "enum": [n]}, "parameters": sch},
                 "required": ["name", "parameters"], "additionalProperties": False} for n, sch in params.items()]}}
            if not parallel:
                self.schema["maxItems"] = 1

    def grammar(self) -> str | None:
        return None if self.schema is None else json.dumps(self.schema)

    def reply(self, text: str, stop_texts: list[str]) -> str | list[dict] | None:
        """The generated text as the chat format parses it (named), the calls (required), or None (auto)."""
        if self.mode == "auto":
            return None
        for t in stop_texts:  # the turn's stop token the model emitted after the JSON
            if t and text.endswith(t):
                text = text[:-len(t)]
                break
        if self.mode == "named":
            return self.prefix + text + self.suffix
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            return []  # cut off (length) before the array closed: no complete call
        return [{"id": f"functions.{it['name']}:{self.calls + k}" if self.kimi else _client_id(f"{it['name']}:{k}", text),
                 "type": "function", "function": {"name": it["name"], "arguments": json.dumps(it["parameters"])}}
                for k, it in enumerate(items)]


def _client_id(own: str, salt: str) -> str:
    return "call_" + hashlib.blake2b(f"{salt}/{own}".encode(), digest_size=12).hexdigest()


def _usage(handles: list, outs: list[dict]) -> dict:
    prompt = sum(len(h.request.input_ids) for h in handles)
    completion = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(out: dict) -> str | None:
    reason = out["meta_info"]["finish_reason"]
    return None if reason is None else reason["type"]


def _matched(out: dict) -> Any:
    reason = out["meta_info"]["finish_reason"] or {}
    return reason.get("matched")


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def stable_delta(sent: str, text: str, final: bool) -> str:
    """New text since `sent`, holding back a trailing partial UTF-8 character (decoded as U+FFFD)
    until more tokens complete it."""
    if not text.startswith(sent):
        return ""
    new = text[len(sent):]
    if not final:
        new = new.rstrip("\ufffd")
    return new


class OpenAIRoutes:
    """/v1/models, /v1/completions, /v1/chat/completions."""

    def __init__(self, engine: Any, streams: Any):
        self.engine, self.streams = engine, streams
        self.model_name = engine.config.served_model_name

    async def _submit(self, items: list[dict], request: Request, field: str) -> Any:
        try:
            return await self.streams.submit(items, request, field)
        except ApiError as e:
            raise ApiError(e.status, openai_names(str(e)), e.headers) from None
        except RequestError as e:  # the engine's checks name sampling_params fields: use OpenAI's names
            raise RequestError(openai_names(str(e))) from None

    def register(self, app: FastAPI) -> None:
        app.get("/v1/models")(self.models)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat)

    async def models(self) -> dict:
        """SGLang's ModelList / ModelCard."""
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "k2sys", "root": self.model_name, "parent": None,
                                            "max_model_len": self.engine.max_model_len}]}

    def _tok(self, t: int) -> str:
        """A token's text for OpenAI logprobs; a piece of a UTF-8 character is shown one character per
        raw byte (latin-1), as SGLang does, so distinct tokens keep distinct strings."""
        raw = self.engine.token_bytes(t)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")

    def _top_dict(self, row: list | None, chosen: list) -> dict[str, float]:
        out = {self._tok(t): v for v, t, _ in (row or [])}
        out[self._tok(chosen[1])] = chosen[0]  # OpenAI: the chosen token is always listed
        return out

    # -- /v1/completions ---------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        body = CompletionsBody.parse(await read_json(request, allow_empty=False))
        prompts = body.prompts
        vocab, ctx = self.engine.model_config.vocab_size, self.engine.max_model_len

        def check_prompts() -> None:
            for i, p in enumerate(prompts):
                where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
                if isinstance(p, list):
                    if not p:
                        raise RequestError(f"{where}: an empty token list; give at least one token")
                    if len(p) >= ctx:
                        raise RequestError(f"{where}: prompt of {len(p)} tokens does not fit max_model_len={ctx}; "
                                           "shorten it")
                    check_token_ids(p, where, vocab)
        if len(getattr(request, "_body", b"")) > (1 << 20):  # long token lists: checked off the event loop
            await asyncio.to_thread(check_prompts)
        else:
            check_prompts()
        echo, stream, include_usage = bool(body.echo), bool(body.stream), body.include_usage
        return_ids, k = bool(body.return_token_ids), body.logprobs
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        params = sampling_from_openai(body, max_tokens)
        want_lp = k is not None
        opts = LogprobOptions(return_logprob=want_lp, logprob_start_len=0 if echo and want_lp else -1,
                              top_logprobs_num=k or 0)
        rids, salt = body.rids, body.salt
        items = [{("text" if isinstance(p, str) else "input_ids"): p, "params": params, "logprobs": opts,
                  "fit_context": body.max_tokens is None,  # OpenAI's default 16 stops at the context
                  "rid": rids[i], "cache_salt": salt} for i, p in enumerate(prompts)]
        call = await self._submit(items, request, "prompt")
        handles = call.handles
        try:
            echo_text = [(p if isinstance(p, str) else self.engine.detokenize(h.request.input_ids, True)) if echo
                         else "" for p, h in zip(prompts, handles)]
        except BaseException:
            call.close()
            raise
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": self.model_name}

        def logprobs(out: dict, start: int = 0, with_prompt: bool = False) -> dict | None:
            if not want_lp:
                return None
            meta = out["meta_info"]
            rows = (meta["input_token_logprobs"] if with_prompt else []) + meta["output_token_logprobs"][start:]
            tops = ((meta.get("input_top_logprobs") or []) if with_prompt else []) + \
                (meta.get("output_top_logprobs") or [None] * len(meta["output_token_logprobs"]))[start:]
            tokens = [self._tok(r[1]) for r in rows]
            offsets, pos = [], 0
            for t in tokens:
                offsets.append(pos)
                pos += len(t)
            return {"tokens": tokens, "token_logprobs": [r[0] for r in rows],
                    "top_logprobs": [None if r[0] is None else self._top_dict(top, r) for r, top in zip(rows, tops)],
                    "text_offset": offsets}

        def choice_extra(o: dict, idx: int) -> dict:
            extra: dict[str, Any] = {"matched_stop": _matched(o)}
            if return_ids:
                extra["token_ids"] = o["output_ids"]
                extra["prompt_token_ids"] = list(handles[idx].request.input_ids)
            return extra

        if not stream:
            outs = await call.results()
            choices = [{"index": i, "text": echo_text[i // params.n] + o["text"], "logprobs": logprobs(o, 0, echo),
                        "finish_reason": _finish(o), **choice_extra(o, i // params.n)} for i, o in enumerate(outs)]
            return JSON({**head, "choices": choices, "usage": _usage(handles, outs)})

        async def chunks() -> AsyncIterator[bytes]:
            sent_text: dict[int, str] = {}
            sent_tok: dict[int, int] = {}
            finals = []
            async for idx, sample, out, fin in call.events():
                i = idx * params.n + sample
                first = i not in sent_text
                delta = stable_delta(sent_text.get(i, ""), out["text"], fin)
                sent_text[i] = sent_text.get(i, "") + delta
                lp = logprobs(out, sent_tok.get(i, 0), echo and first)
                sent_tok[i] = len(out["output_ids"])
                if fin:
                    finals.append(out)
                if delta or fin or first:
                    c = {"index": i, "text": (echo_text[idx] if first else "") + delta, "logprobs": lp,
                         "finish_reason": _finish(out) if fin else None}
                    if fin:
                        c.update(choice_extra(out, idx))
                    yield sse({**head, "choices": [c]})
            if include_usage:
                yield sse({**head, "choices": [], "usage": _usage(handles, finals)})
            yield b"data: [DONE]\n\n"
        return call.sse(chunks())

    # -- /v1/chat/completions ----------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        body = ChatBody.parse(await read_json(request, allow_empty=False))
        fmt = self.engine.chat_format()
        messages, id_map, calls = normalize_messages(body.messages, fmt)
        choice = "auto" if body.tool_choice is None else body.tool_choice
        tools = None if choice == "none" else body.tools
        parallel = body.parallel_tool_calls is not False
        stream, include_usage = bool(body.stream), body.include_usage
        want_prompt_ids, want_ids = bool(body.return_prompt_token_ids), bool(body.return_token_ids)
        plan = ToolChoice(choice, tools, fmt, calls, parallel)
        max_tokens = body.max_new_tokens
        prompt_ids = await render_prompt(self.engine, messages, tools, suffix=plan.prefix)
        if max_tokens is None:  # OpenAI: up to the context length (and what the KV cache can hold)
            kv = self.engine.cache.num_blocks * self.engine.cache.block_size
            max_tokens = max(1, min(self.engine.max_model_len, kv) - len(prompt_ids))
        stop_ids = self.engine.chat_stop_ids()  # a grammar of tool_choice and response_format clash: refused by ChatBody
        params = sampling_from_openai(body, max_tokens, grammar=plan.grammar(), extra_stop_ids=stop_ids,
                                      skip_special_tokens=False)
        stop_texts = [self._tok(t) for t in stop_ids]
        want_lp = bool(body.logprobs)
        opts = LogprobOptions(return_logprob=want_lp, top_logprobs_num=body.top_logprobs or 0)
        call = await self._submit([{"input_ids": prompt_ids, "params": params, "logprobs": opts, "fit_context": False,
                                    "rid": body.rid, "cache_salt": body.salt}], request, "messages")
        handles, total = call.handles, call.total
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "chat.completion", "created": created, "model": self.model_name}

        def lp_block(out: dict, start: int = 0) -> dict | None:
            if not want_lp:
                return None
            meta = out["meta_info"]
            rows = meta["output_token_logprobs"][start:]
            tops = (meta.get("output_top_logprobs") or [[]] * len(meta["output_token_logprobs"]))[start:]

            def entry(v: float, t: int) -> dict:
                return {"token": self._tok(t), "logprob": v, "bytes": list(self.engine.token_bytes(t))}
            return {"content": [{**entry(r[0], r[1]), "top_logprobs": [entry(v, t) for v, t, _ in top]}
                                for r, top in zip(rows, tops)], "refusal": None}

        def message(text: str) -> tuple[dict, bool]:
            reply = plan.reply(text, stop_texts)
            if isinstance(reply, list):  # tool_choice=required: the calls themselves
                msg, has_calls = {"role": "assistant", "content": None}, bool(reply)
                if reply:
                    msg["tool_calls"] = reply
            else:
                msg, has_calls = self.engine.parse_chat_output(text if reply is None else reply)
            if has_calls:
                if not parallel:
                    msg["tool_calls"] = msg["tool_calls"][:1]
                if id_map:  # the client names calls its own way: answer in that form
                    for c in msg["tool_calls"]:
                        c["id"] = _client_id(c["id"], cid)
            return msg, has_calls

        def extra(o: dict) -> dict:
            e: dict[str, Any] = {"matched_stop": _matched(o)}
            if want_prompt_ids:
                e["prompt_token_ids"] = list(prompt_ids)
            if want_ids:
                e["token_ids"] = o["output_ids"]
            return e

        if not stream:
            outs = await call.results()
            choices = []
            for i, o in enumerate(outs):
                msg, calls_made = message(o["text"])
                reason = "tool_calls" if calls_made else _finish(o)
                choices.append({"index": i, "message": msg, "logprobs": lp_block(o), "finish_reason": reason,
                                **extra(o)})
            return JSON({**head, "choices": choices, "usage": _usage(handles, outs)})

        head = {**head, "object": "chat.completion.chunk"}

        async def chunks() -> AsyncIterator[bytes]:
            sent: dict[int, str] = {}
            sent_tok: dict[int, int] = {}
            finals = []
            for i in range(total):
                yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
            async for _, sample, out, fin in call.events():
                msg, calls_made = message(out["text"])
                delta = stable_delta(sent.get(sample, ""), msg.get("content") or "", fin)
                sent[sample] = sent.get(sample, "") + delta
                lp = lp_block(out, sent_tok.get(sample, 0))
                sent_tok[sample] = len(out["output_ids"])
                d: dict[str, Any] = {"content": delta} if delta else {}
                if fin and calls_made:
                    d["tool_calls"] = [{"index": j, **c} for j, c in enumerate(msg["tool_calls"])]
                if fin:
                    finals.append(out)
                if d or fin:
                    reason = ("tool_calls" if calls_made else _finish(out)) if fin else None
                    c = {"index": sample, "delta": d, "logprobs": lp, "finish_reason": reason}
                    if fin:
                        c.update(extra(out))
                    yield sse({**head, "choices": [c]})
            if include_usage:
                yield sse({**head, "choices": [], "usage": _usage(handles, finals)})
            yield b"data: [DONE]\n\n"
        return call.sse(chunks())
