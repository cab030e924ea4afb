"""`k2sys serve`: the native engine behind SGLang's HTTP routes and OpenAI's /v1 routes.

    HTTP (uvicorn event loop) --submit/control (worker threads)--> NativeEngine scheduler thread
    scheduler thread --loop.call_soon_threadsafe--> per-request asyncio queues --> JSON / SSE

Payloads follow sglang 0.5.23 (`GenerateReqInput`, `SamplingParams`, `ReleaseMemoryOccupationReqInput`,
`UpdateWeightsFromTensorReqInput`, `PauseGenerationReqInput`, `AbortReq`), so the same client code
talks to this server and to SGLang. Malformed JSON, unknown fields and bad values get a 400 with a
message; the server keeps serving others. SIGTERM aborts in-flight requests (their callers get
finish_reason "abort"), drains the HTTP connections and stops the engine thread.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from k2sys.engine.wire import tensors_from_update
from k2sys.engine.config import EngineConfig, EngineError, RequestError, SamplingParams
from k2sys.engine.engine import NativeEngine
from k2sys.engine.protocol import ProtocolError, UpdateWeightsFromTensorPayload
from k2sys.engine.shm import ShmReader, ShmUpdatePayload, server_transports

__all__ = ["build_app", "main", "parse_generate"]

log = logging.getLogger(__name__)

# GenerateReqInput fields we accept; the second group only with their default value.
_GENERATE_FIELDS = {"text", "input_ids", "sampling_params", "return_logprob", "stream", "rid",
                    "return_text_in_logprobs", "log_metrics"}
_GENERATE_DEFAULTS = {"logprob_start_len": (None, -1), "top_logprobs_num": (None, 0), "lora_path": (None,),
                      "image_data": (None,), "custom_logit_processor": (None,), "token_ids_logprob": (None,),
                      "return_hidden_states": (None, False), "session_params": (None,)}


def error(status: int, message: str) -> JSONResponse:
    """SGLang/OpenAI error body: both clients read error.message or message."""
    return JSONResponse({"object": "error", "message": message, "type": "BadRequest" if status < 500 else "Error",
                         "param": None, "code": status, "error": {"message": message, "code": status}},
                        status_code=status)


async def read_json(request: Request, allow_empty: bool = True) -> dict:
    raw = await request.body()
    if not raw.strip():
        if allow_empty:
            return {}
        raise RequestError("body: empty; send a JSON object")
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RequestError(f"body: malformed JSON ({e}); send a JSON object") from None
    if not isinstance(body, dict):
        raise RequestError(f"body: expected a JSON object, got {type(body).__name__}")
    return body


def check_fields(kind: str, body: dict, known: set[str], defaults: dict[str, tuple] | None = None) -> None:
    defaults = defaults or {}
    for key, value in body.items():
        if key in known:
            continue
        if key in defaults:
            if value not in defaults[key]:
                raise RequestError(f"{kind}.{key}={value!r} is not supported by the native engine; omit it")
            continue
        raise RequestError(f"{kind}: unknown field {key!r}; known fields are {sorted(known | set(defaults))}")


def parse_generate(body: dict) -> tuple[list[dict], bool, bool]:
    """A /generate body -> (one submit kwargs dict per prompt, batched, stream)."""
    check_fields("generate", body, _GENERATE_FIELDS, _GENERATE_DEFAULTS)
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise RequestError("generate: give exactly one of text or input_ids")
    if text is not None:
        batched = isinstance(text, list)
        prompts = text if batched else [text]
        if not all(isinstance(t, str) for t in prompts):
            raise RequestError("text: must be a string or a list of strings")
        key = "text"
    else:
        if not isinstance(ids, list) or not ids:
            raise RequestError("input_ids: must be a non-empty list of token ids (or a list of such lists)")
        batched = isinstance(ids[0], list)
        prompts = ids if batched else [ids]
        for p in prompts:
            if not isinstance(p, list) or not p or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                raise RequestError("input_ids: each prompt must be a non-empty list of ints")
        key = "input_ids"
    k = len(prompts)

    def per_prompt(name: str, default: Any) -> list:
        v = body.get(name, default)
        if batched and isinstance(v, list) and name != "sampling_params" or (name == "sampling_params" and isinstance(v, list)):
            if len(v) != k:
                raise RequestError(f"{name}: {len(v)} entries for {k} prompts; send one per prompt or a single value")
            return v
        return [v] * k

    rids = body.get("rid")
    if isinstance(rids, str) and batched:
        rids = [f"{rids}-{i}" for i in range(k)]
    rid_list = per_prompt("rid", None) if not isinstance(rids, list) else rids
    if isinstance(rids, list) and len(rids) != k:
        raise RequestError(f"rid: {len(rids)} entries for {k} prompts")
    sps = per_prompt("sampling_params", None)
    lps = per_prompt("return_logprob", False)
    stream = bool(body.get("stream", False))
    items = []
    for i in range(k):
        if not isinstance(sps[i], (dict, type(None))):
            raise RequestError("sampling_params: must be an object (or a list of objects, one per prompt)")
        items.append({key: prompts[i], "params": SamplingParams.from_dict(sps[i]),
                      "rid": rids if isinstance(rids, str) and not batched else rid_list[i],
                      "return_logprob": bool(lps[i])})
    return items, batched, stream


class Streams:
    """Bridges engine listener callbacks (scheduler thread) into one asyncio queue per HTTP call."""

    def __init__(self, engine: NativeEngine):
        self.engine = engine

    async def submit(self, items: list[dict], transform: Callable[[dict], dict] | None = None):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        subs = []
        for idx, kw in enumerate(items):
            def on_update(sample: int, out: dict, finished: bool, idx: int = idx) -> None:
                loop.call_soon_threadsafe(q.put_nowait, (idx, sample, out, finished))
            subs.append({**kw, "on_update": on_update})
        handles = await asyncio.to_thread(self.engine.submit_many, subs)
        total = sum(h.request.params.n for h in handles)
        return handles, q, total

    async def results(self, handles: list, q: asyncio.Queue, total: int) -> list[dict]:
        done: dict[tuple[int, int], dict] = {}
        while len(done) < total:
            idx, sample, out, finished = await q.get()
            if finished:
                done[(idx, sample)] = out
        return [done[key] for key in sorted(done)]

    async def events(self, handles: list, q: asyncio.Queue, total: int) -> AsyncIterator[tuple[int, int, dict, bool]]:
        finished = 0
        try:
            while finished < total:
                idx, sample, out, fin = await q.get()
                finished += fin
                yield idx, sample, out, fin
        finally:
            if finished < total:  # client went away: stop spending compute on it
                for h in handles:
                    if not h.done.is_set():
                        await asyncio.to_thread(self.engine.abort, h.request.rid)


# ---- OpenAI-compatible routes ------------------------------------------------------------------
_COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed",
                      "logprobs", "user", "stream_options", "top_k", "ignore_eos", "min_p", "stop_token_ids"}
_CHAT_FIELDS = {"model", "messages", "tools", "tool_choice", "max_tokens", "max_completion_tokens", "temperature",
                "top_p", "n", "stream", "stop", "seed", "logprobs", "top_logprobs", "user", "stream_options",
                "parallel_tool_calls", "top_k", "min_p", "ignore_eos", "stop_token_ids"}
_OPENAI_DEFAULTS = {"presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "echo": (None, False),
                    "best_of": (None, 1), "suffix": (None,), "logit_bias": (None, {}), "response_format": (None,),
                    "service_tier": (None, "auto", "default")}


class OpenAIRoutes:
    """/v1/models, /v1/completions, /v1/chat/completions (tools via the K2 chat template)."""

    def __init__(self, engine: NativeEngine, streams: Streams):
        self.engine, self.streams = engine, streams
        self.model_name = engine.config.served_model_name

    def register(self, app: FastAPI) -> None:
        app.get("/v1/models")(self.models)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat)

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "k2sys", "max_model_len": self.engine.max_model_len}]}

    def _params(self, body: dict, max_tokens: Any, extra_stop_ids: list[int] = ()) -> SamplingParams:
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise RequestError(f"max_tokens: must be a positive int, got {max_tokens!r}")
        sp: dict[str, Any] = {"max_new_tokens": max_tokens if max_tokens is not None else 16}
        for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("n", "n"), ("stop", "stop"),
                             ("sampling_seed", "seed"), ("top_k", "top_k"), ("min_p", "min_p"),
                             ("ignore_eos", "ignore_eos")):
            if body.get(theirs) is not None:
                sp[ours] = body[theirs]
        sp["stop_token_ids"] = list(body.get("stop_token_ids") or []) + list(extra_stop_ids)
        sp["skip_special_tokens"] = not extra_stop_ids  # chat keeps tool-call markup for the parser
        return SamplingParams.from_dict(sp)

    @staticmethod
    def _usage(outs: list[dict]) -> dict:
        prompt = sum({o["meta_info"]["id"].rsplit("-", 1)[0]: o["meta_info"]["prompt_tokens"] for o in outs}.values())
        completion = sum(o["meta_info"]["completion_tokens"] for o in outs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @staticmethod
    def _finish(out: dict) -> str | None:
        reason = out["meta_info"]["finish_reason"]
        return None if reason is None else reason["type"]

    # -- /v1/completions
    async def completions(self, request: Request) -> Response:
        body = await read_json(request, allow_empty=False)
        check_fields("completions", body, _COMPLETION_FIELDS, _OPENAI_DEFAULTS)
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            prompts = prompt
        else:
            raise RequestError("prompt: a string, a list of strings, token ids, or a list of token id lists")
        params = self._params(body, body.get("max_tokens"))
        want_lp = body.get("logprobs") is not None
        items = [{("text" if isinstance(p, str) else "input_ids"): p, "params": params, "rid": None,
                  "return_logprob": want_lp} for p in prompts]
        handles, q, total = await self.streams.submit(items)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": self.model_name}

        def logprobs(out: dict, start: int = 0) -> dict | None:
            if not want_lp:
                return None
            rows = out["meta_info"]["output_token_logprobs"][start:]
            toks = [self.engine.decode_token(r[1]) for r in rows]
            return {"tokens": toks, "token_logprobs": [r[0] for r in rows], "top_logprobs": None, "text_offset": None}

        if not body.get("stream"):
            outs = await self.streams.results(handles, q, total)
            choices = [{"index": i, "text": o["text"], "logprobs": logprobs(o), "finish_reason": self._finish(o)}
                       for i, o in enumerate(outs)]
            return JSONResponse({**head, "choices": choices, "usage": self._usage(outs)})

        async def chunks() -> AsyncIterator[bytes]:
            sent_text: dict[int, str] = {}
            sent_tok: dict[int, int] = {}
            finals = []
            async for idx, sample, out, fin in self.streams.events(handles, q, total):
                i = idx * params.n + sample
                delta = _stable_delta(sent_text.get(i, ""), out["text"], fin)
                sent_text[i] = sent_text.get(i, "") + delta
                lp = logprobs(out, sent_tok.get(i, 0))
                sent_tok[i] = len(out["output_ids"])
                if fin:
                    finals.append(out)
                if delta or fin:
                    yield sse({**head, "choices": [{"index": i, "text": delta, "logprobs": lp,
                                                    "finish_reason": self._finish(out) if fin else None}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                yield sse({**head, "choices": [], "usage": self._usage(finals)})
            yield b"data: [DONE]\n\n"
        return StreamingResponse(chunks(), media_type="text/event-stream")

    # -- /v1/chat/completions
    async def chat(self, request: Request) -> Response:
        body = await read_json(request, allow_empty=False)
        check_fields("chat.completions", body, _CHAT_FIELDS, _OPENAI_DEFAULTS)
        messages, tools = body.get("messages"), body.get("tools")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages: a non-empty list of {role, content} objects")
        choice = body.get("tool_choice", "auto")
        if choice not in (None, "auto", "none"):
            raise RequestError(f"tool_choice={choice!r} is not supported; use 'auto' or 'none'")
        if choice == "none":
            tools = None
        prompt_ids = self.engine.render_chat(messages, tools)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        params = self._params(body, max_tokens if max_tokens is not None else 256, self.engine.chat_stop_ids())
        want_lp = bool(body.get("logprobs"))
        if body.get("top_logprobs"):
            raise RequestError("top_logprobs: not supported by the native engine; omit it")
        handles, q, total = await self.streams.submit([{"input_ids": prompt_ids, "params": params, "rid": None,
                                                        "return_logprob": want_lp}])
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "chat.completion", "created": created, "model": self.model_name}

        def lp_block(out: dict, start: int = 0) -> dict | None:
            if not want_lp:
                return None
            rows = out["meta_info"]["output_token_logprobs"][start:]
            return {"content": [{"token": self.engine.decode_token(r[1]), "logprob": r[0], "bytes": None,
                                 "top_logprobs": []} for r in rows]}

        if not body.get("stream"):
            outs = await self.streams.results(handles, q, total)
            choices = []
            for i, o in enumerate(outs):
                msg, calls = self.engine.parse_chat_output(o["text"])
                reason = "tool_calls" if calls else self._finish(o)
                choices.append({"index": i, "message": msg, "logprobs": lp_block(o), "finish_reason": reason})
            return JSONResponse({**head, "choices": choices, "usage": self._usage(outs)})

        head = {**head, "object": "chat.completion.chunk"}

        async def chunks() -> AsyncIterator[bytes]:
            sent: dict[int, str] = {}
            sent_tok: dict[int, int] = {}
            finals = []
            for i in range(total):
                yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                "finish_reason": None}]})
            async for _, sample, out, fin in self.streams.events(handles, q, total):
                msg, calls = self.engine.parse_chat_output(out["text"])
                delta = _stable_delta(sent.get(sample, ""), msg.get("content") or "", fin)
                sent[sample] = sent.get(sample, "") + delta
                lp = lp_block(out, sent_tok.get(sample, 0))
                sent_tok[sample] = len(out["output_ids"])
                d: dict[str, Any] = {"content": delta} if delta else {}
                if fin and calls:
                    d["tool_calls"] = [{"index": k, **c} for k, c in enumerate(msg["tool_calls"])]
                if fin:
                    finals.append(out)
                if d or fin:
                    reason = ("tool_calls" if calls else self._finish(out)) if fin else None
                    yield sse({**head, "choices": [{"index": sample, "delta": d, "logprobs": lp,
                                                    "finish_reason": reason}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                yield sse({**head, "choices": [], "usage": self._usage(finals)})
            yield b"data: [DONE]\n\n"
        return StreamingResponse(chunks(), media_type="text/event-stream")


def _stable_delta(sent: str, text: str, final: bool) -> str:
    """New text since `sent`, holding back a trailing partial UTF-8 character (decoded as U+FFFD)
    until more tokens complete it."""
    if not text.startswith(sent):
        return ""
    new = text[len(sent):]
    if not final:
        new = new.rstrip("\ufffd")
    return new


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def build_app(engine: NativeEngine, model_path: str | None = None) -> FastAPI:
    app = FastAPI(title="k2sys native engine", openapi_url=None)
    streams = Streams(engine)
    app.state.engine = engine
    shm_reader = app.state.shm_reader = ShmReader()

    @app.exception_handler(RequestError)
    @app.exception_handler(ProtocolError)
    async def _bad_request(_: Request, exc: Exception) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(EngineError)
    async def _engine_state(_: Request, exc: Exception) -> JSONResponse:
        return error(400, str(exc))

    @app.api_route("/health", methods=["GET", "POST"])
    @app.api_route("/health_generate", methods=["GET", "POST"])
    async def health() -> Response:
        return Response(status_code=200 if engine.health() else 503)

    @app.get("/get_model_info")
    async def model_info() -> dict:
        return {"model_path": model_path or engine.model_path, "tokenizer_path": model_path or engine.model_path,
                "is_generation": True, "preferred_sampling_params": None, "weight_version": engine.weight_version}

    @app.get("/get_server_info")
    async def server_info() -> dict:
        return {"engine": "k2sys-native", **engine.stats(), "max_total_num_tokens": engine.config.max_total_tokens,
                "max_model_len": engine.max_model_len, "memory_bytes": engine.memory_bytes(),
                "quantization": engine.config.quantization,
                "weight_transports": server_transports()}

    @app.get("/get_weight_version")
    async def weight_version() -> dict:
        return {"weight_version": engine.weight_version}

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request) -> Response:
        items, batched, stream = parse_generate(await read_json(request, allow_empty=False))
        handles, q, total = await streams.submit(items)
        multi = batched or total > 1
        if not stream:
            outs = await streams.results(handles, q, total)
            return JSONResponse(outs if multi else outs[0])

        async def body() -> AsyncIterator[bytes]:
            async for idx, sample, out, _ in streams.events(handles, q, total):
                if multi:
                    out = {**out, "index": idx * items[idx]["params"].n + sample}
                yield sse(out)
            yield b"data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream")

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        try:
            await asyncio.to_thread(engine.flush_cache)
        except EngineError as e:
            return Response(content=f"Cache not flushed: {e}\n", status_code=400)
        return Response(content="Cache flushed.\n", status_code=200)

    async def _memory(request: Request, fn: Callable) -> JSONResponse:
        body = await read_json(request)
        check_fields("memory", body, {"tags"})
        await asyncio.to_thread(fn, body.get("tags"))
        return JSONResponse({"success": True, "message": f"{fn.__name__} done", **engine.memory_bytes()})

    @app.api_route("/release_memory_occupation", methods=["GET", "POST"])
    async def release(request: Request) -> JSONResponse:
        return await _memory(request, engine.release_memory)

    @app.api_route("/resume_memory_occupation", methods=["GET", "POST"])
    async def resume(request: Request) -> JSONResponse:
        return await _memory(request, engine.resume_memory)

    @app.post("/begin_weight_update")
    async def begin(request: Request) -> JSONResponse:
        check_fields("begin_weight_update", await read_json(request), set(), {"selector": (None, "all")})
        await asyncio.to_thread(engine.begin_weight_update)
        return JSONResponse({"success": True, "message": "weight update session open"})

    @app.post("/update_weights_from_tensor")
    async def update_tensor(request: Request) -> JSONResponse:
        payload = UpdateWeightsFromTensorPayload.from_sglang(await read_json(request, allow_empty=False))
        try:
            named = tensors_from_update(payload)
        except (ProtocolError, ValueError, KeyError) as e:
            raise RequestError(f"serialized_named_tensors: cannot decode ({e})") from None
        if payload.abort_all_requests:
            await asyncio.to_thread(engine.abort, None)
        await asyncio.to_thread(engine.update_weights, named, weight_version=payload.weight_version)
        return JSONResponse({"success": True, "message": f"staged {len(named)} tensors"})

    @app.post("/update_weights_from_shm")
    async def update_shm(request: Request) -> JSONResponse:
        payload = ShmUpdatePayload.from_json(await read_json(request, allow_empty=False))
        n = await asyncio.to_thread(shm_reader.apply, payload, engine.update_weights)
        return JSONResponse({"success": True, "message": f"staged {n} tensors from {payload.transport}"})

    @app.post("/end_weight_update")
    async def end(request: Request) -> JSONResponse:
        check_fields("end_weight_update", await read_json(request), set())
        version = await asyncio.to_thread(engine.end_weight_update)
        return JSONResponse({"success": True, "message": f"weights updated to version {version}",
                             "weight_version": version})

    @app.post("/abort_weight_update")
    async def abort_update(request: Request) -> JSONResponse:
        check_fields("abort_weight_update", await read_json(request), set())
        await asyncio.to_thread(engine.abort_weight_update)
        return JSONResponse({"success": True, "message": "weight update session discarded",
                             "weight_version": engine.weight_version})

    @app.api_route("/get_weights_by_name", methods=["GET", "POST"])
    async def get_weights(request: Request) -> JSONResponse:
        body = await read_json(request, allow_empty=False)
        check_fields("get_weights_by_name", body, {"name", "truncate_size"})
        if not isinstance(body.get("name"), str):
            raise RequestError("name: required, an HF parameter name")
        size = body.get("truncate_size", 100)
        if not isinstance(size, int) or size < 1:
            raise RequestError(f"truncate_size: must be an int >= 1, got {size!r}")
        return JSONResponse(await asyncio.to_thread(engine.get_weights_by_name, body["name"], size))

    @app.post("/pause_generation")
    async def pause(request: Request) -> JSONResponse:
        body = await read_json(request)
        check_fields("pause_generation", body, {"mode"})
        mode = body.get("mode", "abort")
        detail = await asyncio.to_thread(engine.pause_detail, mode)
        keep = ("rid", "input_ids", "output_ids", "output_logprobs", "sampling_params", "return_logprob",
                "weight_version")
        paused = [{k: d[k] for k in keep} for d in detail] if mode == "abort" else []
        return JSONResponse({"message": "Generation paused successfully.", "status": "ok", "mode": mode,
                             "paused_requests": paused, "requests": detail})

    @app.post("/continue_generation")
    async def cont(request: Request) -> JSONResponse:
        await read_json(request)
        await asyncio.to_thread(engine.continue_generation)
        return JSONResponse({"message": "Generation continued successfully.", "status": "ok"})

    @app.post("/abort_request")
    async def abort(request: Request) -> Response:
        body = await read_json(request)
        check_fields("abort_request", body, {"rid", "abort_all", "finished_reason", "abort_message"})
        rid = body.get("rid") or None
        if not body.get("abort_all") and rid is None:
            raise RequestError("abort_request: give rid, or abort_all=true")
        await asyncio.to_thread(engine.abort, None if body.get("abort_all") else rid)
        return Response(status_code=200)

    OpenAIRoutes(engine, streams).register(app)
    return app


# ---- the `serve` command -------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="k2sys serve", description="Serve a K2 checkpoint with the native engine "
                                 "(SGLang-compatible HTTP + OpenAI /v1).")
    ap.add_argument("--model", "--model-path", dest="model", required=True, help="HF checkpoint directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-total-tokens", type=int, default=EngineConfig.max_total_tokens)
    ap.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens)
    ap.add_argument("--max-running-requests", type=int, default=EngineConfig.max_running_requests)
    ap.add_argument("--block-size", type=int, default=EngineConfig.block_size)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--served-model-name", default=EngineConfig.served_model_name)
    ap.add_argument("--disable-radix-cache", action="store_true",
                    help="turn off prefix caching (SGLang's flag name; the native engine caches whole KV blocks)")
    ap.add_argument("--moe-kernels", default=EngineConfig.moe_kernels, choices=["auto", "triton", "torch"],
                    help="MoE layers: Triton kernels on CUDA (auto), always (triton) or never (torch)")
    ap.add_argument("--quantization", default=EngineConfig.quantization, choices=["none", "fp8"],
                    help="weights served: none (the compute dtype) or fp8 (e4m3 with 128x128 block scales, the "
                         "Kimi-K2/DeepSeek-V3 release format; a bf16 checkpoint or trainer update is quantized)")
    ap.add_argument("--log-level", default="warning")
    return ap


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = EngineConfig(dtype=args.dtype, device=args.device, max_total_tokens=args.max_total_tokens,
                       max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                       max_running_requests=args.max_running_requests, max_model_len=args.max_model_len,
                       served_model_name=args.served_model_name, moe_kernels=args.moe_kernels,
                       enable_prefix_caching=not args.disable_radix_cache, quantization=args.quantization)
    engine = NativeEngine.from_pretrained(args.model, cfg)
    app = build_app(engine, args.model)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Abort first so streaming responses end and uvicorn's connection drain completes.
            engine.begin_shutdown("server shutting down")
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the captured signal after shutdown (exit status -15); a drained,
            # orderly stop on SIGTERM/SIGINT exits 0 instead.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    # Keep idle connections far longer than clients do (HTTPEngine drops its idle ones after
    # KEEPALIVE_EXPIRY_S): with equal timeouts a client can send on a connection the server is
    # closing at that moment, and the request dies with "connection reset by peer".
    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                   timeout_graceful_shutdown=10, timeout_keep_alive=75))
    try:
        server.run()
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

