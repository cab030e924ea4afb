"""`k2sys serve`: the native engine behind SGLang's HTTP routes and OpenAI's /v1 routes.

    HTTP (uvicorn event loop) --submit/control (worker threads)--> NativeEngine scheduler thread
    scheduler thread --loop.call_soon_threadsafe--> per-request asyncio queues --> JSON / SSE

Payloads follow sglang 0.5.23 (`GenerateReqInput`, `SamplingParams`, `ReleaseMemoryOccupationReqInput`,
`UpdateWeightsFromTensorReqInput`, `PauseGenerationReqInput`, `AbortReq`), so the same client code
talks to this server and to SGLang; the OpenAI routes live in k2sys.engine.api.openai_api. Every field
SGLang and OpenAI define is honoured or refused with a 400 naming it (k2sys.engine.api.api_fields,
docs/engine_api.md); malformed JSON, unknown fields and bad values get a 400 with a message and
the server keeps serving others. SIGTERM aborts in-flight requests (their callers get
finish_reason "abort"), drains the HTTP connections and stops the engine thread.

Hostile input (ServerOptions, docs/engine_api.md "Limits"): everything is checked before any work
starts and nothing a client sends is a 500. Bodies have a size limit (413), a JSON depth and number
size limit, must be UTF-8 without lone surrogates; every field has its type and range checked,
token ids against the vocabulary, lengths against the context and the KV cache (400 naming the
field). Big bodies are parsed, and text tokenized, on worker threads that release the GIL, so the
event loop keeps answering (/health). Admission bounds the sequences and prompt tokens in flight
(429 when full). A call whose client disconnects has its requests aborted (`Call.close`), streamed
or not. An open weight update session without a call for weight_update_timeout_s is discarded; an
update is checked before `abort_all_requests` aborts anything. Optional API key (Bearer).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import sys
import signal
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Mapping

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect

from k2sys.engine.api.api_fields import ApiError, JsonLimits, check_token_ids, read_json
from k2sys.engine.api.bodies import (AbortBody, ContinueBody, DetokenizeBody, EmptyBody, GetWeightsBody, MemoryBody,
                                     PauseBody, TokenizeBody, UpdateWeightsFromShmBody, UpdateWeightsFromTensorPayload,
                                     WeightSessionBody)
from k2sys.engine.transport.wire import tensors_from_update
from k2sys.engine.core.config import EngineConfig, EngineError, RequestError
from k2sys.engine.core.engine import NativeEngine
from k2sys.engine.api.openai_api import JSON, OpenAIRoutes, sse
from k2sys.engine.api.protocol import GenerateRequest
from k2sys.engine.transport.shm import ShmReader, ShmUpdatePayload, server_transports

__all__ = ["ServerOptions", "build_app", "main", "parse_generate"]

log = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/health_generate")
"""Routes that answer without the API key (liveness probes)."""


@dataclass(frozen=True)
class ServerOptions:
    """Limits and access of `k2sys serve` (its flags; docs/engine_api.md "Limits")."""
    max_body_bytes: int = 64 << 20
    """Largest request body (413 above); /update_weights_from_tensor has its own limit."""
    max_weight_body_bytes: int = 4 << 30
    """Largest /update_weights_from_tensor body (base64 tensors: send big updates in buckets or via shm)."""
    max_json_depth: int = 64
    """Deepest nesting of JSON objects/arrays in a body (400 deeper)."""
    max_queued_requests: int | None = None
    """Sequences (prompts x n) in flight over HTTP, running or waiting; more is a 429. None: 32 x
    max_running_requests; 0: no limit."""
    max_queued_tokens: int | None = None
    """Prompt tokens held by in-flight requests (host memory of the queue); more is a 429. None: 64 x
    max_total_tokens; 0: no limit."""
    weight_update_timeout_s: float | None = 600.0
    """An open weight update session without a call for this long is discarded (None: never)."""
    api_key: str | None = None
    """If set, every route but /health and /health_generate needs `Authorization: Bearer <key>`."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_weight_body_bytes", "max_json_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerOptions.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_queued_requests", "max_queued_tokens"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"ServerOptions.{name}: must be >= 0 (0 = no limit) or None, got {v}")
        if self.weight_update_timeout_s is not None and self.weight_update_timeout_s <= 0:
            raise ValueError("ServerOptions.weight_update_timeout_s: must be > 0 or None")


def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSON:
    """SGLang/OpenAI error body: both clients read error.message or message."""
    kind = {401: "Unauthorized", 413: "PayloadTooLarge", 429: "TooManyRequests", 503: "Unavailable"}.get(
        status, "BadRequest" if status < 500 else "Error")
    return JSON({"object": "error", "message": message, "type": kind, "param": None, "code": status,
                 "error": {"message": message, "type": kind, "code": status}}, status_code=status,
                headers=dict(headers or {}))


def parse_generate(body: dict, engine: NativeEngine | None = None) -> tuple[list[dict], bool, bool]:
    """A /generate body -> (one submit kwargs dict per prompt, batched, stream), parsed by
    GenerateRequest.parse_body (the one parser of GenerateReqInput); given the engine, token ids are
    checked against its vocabulary and prompts against its context length."""
    reqs, batched, stream = GenerateRequest.parse_body(
        body, vocab_size=None if engine is None else engine.model_config.vocab_size,
        max_model_len=None if engine is None else engine.max_model_len)
    return [r.submit_kwargs() for r in reqs], batched, stream


class ClientGone(Exception):
    """The HTTP client disconnected while its requests ran (they were aborted)."""


_GONE = object()


class Admission:
    """Bounds what HTTP clients can have in flight: sequences (prompts x n) and prompt tokens (the
    queue's host memory). A call that does not fit now is a 429 (retry later); one that could never
    fit is a 400 naming the field. Reservations end as each request finishes (or is aborted)."""

    def __init__(self, max_seqs: int, max_tokens: int):
        self.max_seqs, self.max_tokens = max_seqs, max_tokens
        self.seqs = self.tokens = 0
        self._lock = threading.Lock()

    def reserve(self, seqs: int, tokens: int, field: str) -> None:
        if self.max_seqs and seqs > self.max_seqs:
            raise RequestError(f"{field}: this call asks for {seqs} sequences (prompts x n) but the server holds at "
                               f"most {self.max_seqs} in flight; send fewer prompts or a smaller n (or raise "
                               "k2sys serve --max-queued-requests)")
        if self.max_tokens and tokens > self.max_tokens:
            raise RequestError(f"{field}: this call's prompts hold {tokens} tokens but the server queues at most "
                               f"{self.max_tokens}; send fewer or shorter prompts (or raise --max-queued-tokens)")
        with self._lock:
            if (self.max_seqs and self.seqs + seqs > self.max_seqs) or \
                    (self.max_tokens and self.tokens + tokens > self.max_tokens):
                raise ApiError(429, f"server busy: {self.seqs} sequences and {self.tokens} prompt tokens are in "
                                    f"flight (limits {self.max_seqs or 'none'} / {self.max_tokens or 'none'}); "
                                    "retry later", headers={"Retry-After": "1"})
            self.seqs += seqs
            self.tokens += tokens

    def release(self, seqs: int, tokens: int) -> None:
        with self._lock:
            self.seqs -= seqs
            self.tokens -= tokens

    def stats(self) -> dict[str, int]:
        return {"queued_sequences": self.seqs, "queued_prompt_tokens": self.tokens,
                "max_queued_requests": self.max_seqs, "max_queued_tokens": self.max_tokens}


class Call:
    """The requests one HTTP call submitted, and the queue their updates arrive on. When the call
    ends in any way (finished, client disconnected, handler cancelled) `close` aborts what is still
    running, without blocking or awaiting, so an abandoned call costs no more compute."""

    def __init__(self, engine: NativeEngine, handles: list, q: asyncio.Queue, total: int):
        self.engine, self.handles, self.q, self.total = engine, handles, q, total
        self.watcher: asyncio.Task | None = None

    def watch(self, request: Request) -> None:
        """Put _GONE on the queue when the client disconnects (the body is already read)."""
        async def run() -> None:
            with contextlib.suppress(Exception):
                while True:
                    msg = await request.receive()
                    if msg.get("type") == "http.disconnect":
                        self.q.put_nowait(_GONE)
                        return
        self.watcher = asyncio.get_running_loop().create_task(run())

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
            self.watcher = None
        rids = [h.request.rid for h in self.handles if not h.done.is_set()]
        if rids:
            self.engine.abort_nowait(rids, "client disconnected")

    def sse(self, chunks: AsyncIterator[bytes]) -> StreamingResponse:
        """A streamed response of `chunks` that closes the call however the stream ends (also when it
        is cancelled before the first event arrived)."""
        async def guarded() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                self.close()
        return StreamingResponse(guarded(), media_type="text/event-stream")

    async def results(self, with_index: bool = False) -> list:
        """Final outputs ordered (prompt, sample); with_index: ((prompt, sample), output) pairs."""
        done: dict[tuple[int, int], dict] = {}
        try:
            while len(done) < self.total:
                item = await self.q.get()
                if item is _GONE:
                    raise ClientGone()
                idx, sample, out, finished = item
                if finished:
                    done[(idx, sample)] = out
        finally:
            self.close()
        return [(key, done[key]) if with_index else done[key] for key in sorted(done)]

    async def events(self) -> AsyncIterator[tuple[int, int, dict, bool]]:
        finished = 0
        try:
            while finished < self.total:
                item = await self.q.get()
                if item is _GONE:
                    return
                idx, sample, out, fin = item
                finished += fin
                yield idx, sample, out, fin
        finally:
            self.close()  # client went away (or the stream was cancelled): stop spending compute on it


class Streams:
    """Bridges engine listener callbacks (scheduler thread) into one asyncio queue per HTTP call,
    after tokenizing text prompts off the event loop and admitting the call (Admission)."""

    def __init__(self, engine: NativeEngine, admission: Admission | None = None):
        self.engine = engine
        self.admission = admission or Admission(0, 0)

    def _tokenize(self, items: list[dict]) -> list[dict]:
        """Text prompts -> input_ids (on a worker thread): a text certainly longer than the context
        (more characters than max_model_len x the longest token's bytes) is refused untokenized."""
        eng, out = self.engine, []
        for i, kw in enumerate(items):
            text = kw.get("text")
            if text is None:
                out.append(kw)
                continue
            where = "text" if len(items) == 1 else f"text[{i}]"
            if len(text) >= eng.max_model_len and len(text) > eng.max_model_len * eng.max_token_bytes():
                raise RequestError(f"{where}: {len(text)} characters cannot fit max_model_len={eng.max_model_len} "
                                   "tokens; shorten the prompt")
            ids = eng.encode(text)
            if len(ids) >= eng.max_model_len:
                raise RequestError(f"{where}: the prompt is {len(ids)} tokens, which does not fit max_model_len="
                                   f"{eng.max_model_len}; shorten it")
            out.append({**{k: v for k, v in kw.items() if k != "text"}, "input_ids": ids})
        return out

    def _submit(self, items: list[dict], field: str) -> list:
        items = self._tokenize(items)
        parts = [(kw["params"].n, len(kw["input_ids"])) for kw in items]
        seqs, tokens = sum(n for n, _ in parts), sum(t for _, t in parts)
        most = max(n for n, _ in parts)
        too_many = self.admission.max_seqs and most > 1 and seqs > self.admission.max_seqs
        self.admission.reserve(seqs, tokens, "n" if too_many else field)
        try:
            handles = self.engine.submit_many(items)
        except BaseException:
            self.admission.release(seqs, tokens)
            raise
        for h, (n, t) in zip(handles, parts):
            h.add_done_callback(lambda n=n, t=t: self.admission.release(n, t))
        return handles

    async def submit(self, items: list[dict], request: Request | None = None, field: str = "input_ids") -> Call:
        released = self.engine.released
        if released and self.engine.paused is None:  # it would wait for a resume that may never come
            raise ApiError(503, f"memory is released ({', '.join(sorted(released))}) and generation is not paused: "
                                "requests cannot run until /resume_memory_occupation brings it back")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        subs = []
        for idx, kw in enumerate(items):
            def on_update(sample: int, out: dict, finished: bool, idx: int = idx) -> None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: the server is stopping
                    loop.call_soon_threadsafe(q.put_nowait, (idx, sample, out, finished))
            subs.append({**kw, "on_update": on_update})
        try:
            handles = await asyncio.to_thread(self._submit, subs, field)
        except EngineError as e:  # the engine cannot take requests now (shutting down, memory released)
            raise ApiError(503, str(e)) from None
        call = Call(self.engine, handles, q, sum(h.request.params.n for h in handles))
        if request is not None:
            call.watch(request)
        return call


class ApiKeyGuard:
    """ASGI middleware: `Authorization: Bearer <key>` on every route but OPEN_PATHS (401 otherwise)."""

    def __init__(self, app: Any, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope.get("path") not in OPEN_PATHS:
            got = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                msg = ("Authorization: missing or wrong API key; send the header 'Authorization: Bearer <key>' "
                       "with the key `k2sys serve --api-key` was given")
                await error(401, msg, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(engine: NativeEngine, model_path: str | None = None, options: ServerOptions | None = None) -> FastAPI:
    opts = options or ServerOptions()
    app = FastAPI(title="k2sys native engine", openapi_url=None)
    app.state.engine = engine
    app.state.options = opts
    app.state.json_limits = JsonLimits(max_body_bytes=opts.max_body_bytes,
                                       max_weight_body_bytes=opts.max_weight_body_bytes, max_depth=opts.max_json_depth)
    cfg = engine.config
    admission = app.state.admission = Admission(
        cfg.max_running_requests * 32 if opts.max_queued_requests is None else opts.max_queued_requests,
        cfg.max_total_tokens * 64 if opts.max_queued_tokens is None else opts.max_queued_tokens)
    streams = Streams(engine, admission)
    engine.weight_update_timeout_s = opts.weight_update_timeout_s
    shm_reader = app.state.shm_reader = ShmReader()
    if opts.api_key:
        app.add_middleware(ApiKeyGuard, key=opts.api_key)

    @app.exception_handler(RequestError)  # ProtocolError is the same type
    async def _bad_request(_: Request, exc: Exception) -> Response:
        return error(getattr(exc, "status", 400), str(exc), getattr(exc, "headers", None))

    @app.exception_handler(EngineError)
    async def _engine_state(_: Request, exc: Exception) -> Response:
        return error(400, str(exc))

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)  # left while still sending its body
    async def _gone(_: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nobody reads it: the client is gone

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        return error(500, f"internal error: {type(exc).__name__}: {str(exc)[:300]}")

    @app.api_route("/health", methods=["GET", "POST"])
    @app.api_route("/health_generate", methods=["GET", "POST"])
    async def health() -> Response:
        return Response(status_code=200 if engine.health() else 503)

    def _model_info() -> dict:
        """SGLang's /model_info fields."""
        mc = engine.model_config
        path = model_path or engine.model_path
        return {"model_path": path, "served_model_name": engine.config.served_model_name, "tokenizer_path": path,
                "is_generation": True, "preferred_sampling_params": None, "weight_version": engine.weight_version,
                "load_format": "auto", "reasoning_parser": None, "tool_call_parser": _tool_parser(engine),
                "disaggregation_mode": "null", "has_image_understanding": False, "has_audio_understanding": False,
                "model_type": getattr(mc, "model_type", "deepseek_v3"),
                "architectures": list(getattr(mc, "architectures", None) or ["DeepseekV3ForCausalLM"])}

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info() -> dict:
        return _model_info()

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info() -> Response:
        stats = engine.stats()
        return JSON({"engine": "k2sys-native", "version": _version(), **stats, **_model_info(),
                     "max_total_num_tokens": engine.config.max_total_tokens, "max_model_len": engine.max_model_len,
                     "context_length": engine.max_model_len, "max_running_requests": engine.config.max_running_requests,
                     "chunked_prefill_size": engine.config.max_num_batched_tokens, "page_size": engine.config.block_size,
                     "disable_radix_cache": not engine.config.enable_prefix_caching, "dtype": str(engine.runner.dtype),
                     "device": engine.config.device, "memory_bytes": engine.memory_bytes(),
                     "quantization": engine.config.quantization, "weight_transports": server_transports(),
                     "admission": admission.stats(), "max_body_bytes": opts.max_body_bytes,
                     "weight_update_timeout_s": opts.weight_update_timeout_s,
                     "internal_states": [{"running": stats["running"], "waiting": stats["waiting"]}]})

    @app.get("/get_weight_version")
    async def weight_version() -> dict:
        return {"weight_version": engine.weight_version}

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request) -> Response:
        body = await read_json(request, allow_empty=False)
        if len(getattr(request, "_body", b"")) > app.state.json_limits.thread_bytes:  # long prompts: check off the loop
            items, batched, stream = await asyncio.to_thread(parse_generate, body, engine)
        else:
            items, batched, stream = parse_generate(body, engine)
        want_prompt = body.get("return_prompt_token_ids") is True  # its type was checked by GenerateBody
        call = await streams.submit(items, request, "text" if "text" in items[0] else "input_ids")
        handles = call.handles
        multi = batched or call.total > 1

        def finish(idx: int, out: dict) -> dict:
            return {**out, "prompt_token_ids": list(handles[idx].request.input_ids)} if want_prompt else out

        if not stream:
            done = await call.results(with_index=True)
            outs = [finish(idx, out) for (idx, _), out in done]
            return JSON(outs if multi else outs[0])

        async def body_chunks() -> AsyncIterator[bytes]:
            async for idx, sample, out, _ in call.events():
                out = finish(idx, out)
                if multi:
                    out = {**out, "index": idx * items[idx]["params"].n + sample}
                yield sse(out)
            yield b"data: [DONE]\n\n"
        return call.sse(body_chunks())

    def _text_ok(text: str, where: str) -> None:
        if len(text) >= engine.max_model_len and len(text) > engine.max_model_len * engine.max_token_bytes():
            raise RequestError(f"{where}: {len(text)} characters cannot fit max_model_len={engine.max_model_len} "
                               "tokens; shorten it")

    @app.post("/tokenize")
    @app.post("/v1/tokenize")
    async def tokenize(request: Request) -> Response:
        """SGLang's /tokenize: {prompt: str | [str]} or {messages, tools}; -> {tokens, count, max_model_len}."""
        req = TokenizeBody.parse(await read_json(request, allow_empty=False))
        prompt, special = req.prompt, req.add_special_tokens
        if req.messages is not None:
            from k2sys.engine.api.openai_api import check_tools, normalize_messages, render_prompt

            gen = req.add_generation_prompt
            msgs, _, _ = normalize_messages(req.messages, engine.chat_format())
            tools = check_tools(req.tools)
            tokens = await render_prompt(engine, msgs, tools, add_generation_prompt=True if gen is None else gen,
                                         add_special_tokens=bool(special) if gen is not None else False)
            return JSON({"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len})
        special = True if special is None else special
        batched = isinstance(prompt, list)

        def encode_all() -> list[list[int]]:  # on a worker thread: long texts are checked, then tokenized
            texts = prompt if batched else [prompt]
            for i, p in enumerate(texts):
                _text_ok(p, f"prompt[{i}]" if batched else "prompt")
            return [engine.encode(p, add_special_tokens=special) for p in texts]
        tokens = await asyncio.to_thread(encode_all)
        if not batched:
            return JSON({"tokens": tokens[0], "count": len(tokens[0]), "max_model_len": engine.max_model_len})
        return JSON({"tokens": tokens, "count": [len(t) for t in tokens], "max_model_len": engine.max_model_len})

    @app.post("/detokenize")
    @app.post("/v1/detokenize")
    async def detokenize(request: Request) -> Response:
        """SGLang's /detokenize: {tokens: [int] | [[int]], skip_special_tokens} -> {text}."""
        req = DetokenizeBody.parse(await read_json(request, allow_empty=False))
        tokens, skip, batched = req.tokens, req.skip_special_tokens is not False, req.batched
        vocab = engine.model_config.vocab_size
        for i, ids in enumerate(tokens if batched else [tokens]):
            check_token_ids(ids, f"tokens[{i}]" if batched else "tokens", vocab)
        if batched:
            return JSON({"text": await asyncio.to_thread(lambda: [engine.detokenize(t, skip) for t in tokens])})
        return JSON({"text": await asyncio.to_thread(engine.detokenize, tokens, skip)})

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        try:
            await asyncio.to_thread(engine.flush_cache)
        except EngineError as e:
            return Response(content=f"Cache not flushed: {e}\n", status_code=400)
        return Response(content="Cache flushed.\n", status_code=200)

    async def _memory(request: Request, fn: Callable) -> Response:
        req = MemoryBody.parse(await read_json(request))
        await asyncio.to_thread(fn, req.tags)
        return JSON({"success": True, "message": f"{fn.__name__} done", **engine.memory_bytes()})

    @app.api_route("/release_memory_occupation", methods=["GET", "POST"])
    async def release(request: Request) -> Response:
        return await _memory(request, engine.release_memory)

    @app.api_route("/resume_memory_occupation", methods=["GET", "POST"])
    async def resume(request: Request) -> Response:
        return await _memory(request, engine.resume_memory)

    @app.post("/begin_weight_update")
    async def begin(request: Request) -> Response:
        WeightSessionBody.parse(await read_json(request))
        await asyncio.to_thread(engine.begin_weight_update)
        return JSON({"success": True, "message": "weight update session open"})

    def _decode(payload: UpdateWeightsFromTensorPayload) -> list:
        try:
            return tensors_from_update(payload)
        except Exception as e:  # noqa: BLE001 - whatever the client's bytes do to the decoder, it is their error
            raise RequestError(f"serialized_named_tensors: cannot decode ({type(e).__name__}: {str(e)[:300]}); "
                               "serialize with serialize_named_tensors() or FlattenedBucket.serialize()") from None

    @app.post("/update_weights_from_tensor")
    async def update_tensor(request: Request) -> Response:
        payload = UpdateWeightsFromTensorPayload.parse(await read_json(request, allow_empty=False, weights=True))
        named = await asyncio.to_thread(_decode, payload)
        # everything is checked before requests are aborted: a refused update aborts nothing
        await asyncio.to_thread(engine.check_update, named)
        if payload.abort_all_requests:
            await asyncio.to_thread(engine.abort, None)
        await asyncio.to_thread(engine.update_weights, named, weight_version=payload.weight_version)
        return JSON({"success": True, "message": f"staged {len(named)} tensors"})

    @app.post("/update_weights_from_shm")
    async def update_shm(request: Request) -> Response:
        req = UpdateWeightsFromShmBody.parse(await read_json(request, allow_empty=False))
        payload = ShmUpdatePayload.from_json(req.payload_json())
        try:
            n = await asyncio.to_thread(shm_reader.apply, payload, engine.update_weights)
        except (RequestError, EngineError):
            raise
        except Exception as e:  # noqa: BLE001 - the client's segment or IPC handle could not be read
            log.warning("update_weights_from_shm: reading the bucket failed", exc_info=e)
            raise RequestError(f"update_weights_from_shm: the bucket could not be read from {payload.transport} "
                               f"({type(e).__name__}: {str(e)[:200]}); check the segment / handle and entries") from None
        return JSON({"success": True, "message": f"staged {n} tensors from {payload.transport}"})

    @app.post("/end_weight_update")
    async def end(request: Request) -> Response:
        EmptyBody.parse(await read_json(request), "end_weight_update")
        version = await asyncio.to_thread(engine.end_weight_update)
        return JSON({"success": True, "message": f"weights updated to version {version}", "weight_version": version})

    @app.post("/abort_weight_update")
    async def abort_update(request: Request) -> Response:
        EmptyBody.parse(await read_json(request), "abort_weight_update")
        await asyncio.to_thread(engine.abort_weight_update)
        return JSON({"success": True, "message": "weight update session discarded",
                     "weight_version": engine.weight_version})

    @app.api_route("/get_weights_by_name", methods=["GET", "POST"])
    async def get_weights(request: Request) -> Response:
        req = GetWeightsBody.parse(await read_json(request, allow_empty=False))
        return JSON(await asyncio.to_thread(engine.get_weights_by_name, req.name, req.size))

    @app.post("/pause_generation")
    async def pause(request: Request) -> Response:
        mode = PauseBody.parse(await read_json(request)).mode
        detail = await asyncio.to_thread(engine.pause_detail, mode)
        keep = ("rid", "input_ids", "output_ids", "output_logprobs", "sampling_params", "return_logprob",
                "weight_version")
        paused = [{k: d[k] for k in keep} for d in detail] if mode == "abort" else []
        return JSON({"message": "Generation paused successfully.", "status": "ok", "mode": mode,
                     "paused_requests": paused, "requests": detail})

    @app.post("/continue_generation")
    async def cont(request: Request) -> Response:
        ContinueBody.parse(await read_json(request))
        # HTTP callers get an answer: what was queued while paused and still cannot run is aborted
        await asyncio.to_thread(engine.continue_generation, True)
        return JSON({"message": "Generation continued successfully.", "status": "ok"})

    @app.post("/abort_request")
    async def abort(request: Request) -> Response:
        req = AbortBody.parse(await read_json(request))
        await asyncio.to_thread(engine.abort, None if req.abort_all else req.rid)
        return Response(status_code=200)

    OpenAIRoutes(engine, streams).register(app)
    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("k2sys")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "0.1.0"


def _tool_parser(engine: NativeEngine) -> str | None:
    try:
        fmt = engine.chat_format()
    except RequestError:
        return None
    from k2sys.tokenizer.formats import K2ChatFormat

    return "kimi_k2" if isinstance(fmt, K2ChatFormat) else getattr(fmt, "tool_format", None)


# ---- the `serve` command -------------------------------------------------------------------------
def _int_in(lo: int, hi: int | None = None):
    """argparse type: an int in [lo, hi], refused by argparse (one usage line) before the model loads."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range: use {lo}..{hi if hi is not None else 'inf'}")
        return v
    return parse


def _model_dir(text: str) -> str:
    p = os.path.expanduser(text)
    if not os.path.isdir(p) or not os.path.isfile(os.path.join(p, "config.json")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a checkpoint directory (a directory with config.json)")
    return p


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="k2sys serve", description="Serve a K2 checkpoint with the native engine "
                                 "(SGLang-compatible HTTP + OpenAI /v1).")
    ap.add_argument("--model", "--model-path", dest="model", required=True, type=_model_dir,
                    help="HF checkpoint directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=_int_in(0, 65535), default=30000)
    ap.add_argument("--config", default=None, metavar="JSON",
                    help='a JSON file, or inline JSON, {"engine": {EngineConfig fields}, "server": {ServerOptions '
                         'fields}}; the flags below override single fields of it')
    # Engine and server flags default to None ("not given") so that a given flag overrides --config and
    # an absent one leaves the file's value (else EngineConfig's / ServerOptions' default, shown in help).
    e = EngineConfig()
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="compute dtype (default: the checkpoint's)")
    ap.add_argument("--device", default=None, help=f"cpu, cuda, cuda:N or auto (default {e.device})")
    ap.add_argument("--max-total-tokens", type=_int_in(1), default=None, help=f"default {e.max_total_tokens}")
    ap.add_argument("--max-num-batched-tokens", type=_int_in(1), default=None,
                    help=f"default {e.max_num_batched_tokens}")
    ap.add_argument("--max-running-requests", type=_int_in(1), default=None, help=f"default {e.max_running_requests}")
    ap.add_argument("--block-size", type=_int_in(1), default=None, help=f"default {e.block_size}")
    ap.add_argument("--max-model-len", type=_int_in(1), default=None)
    ap.add_argument("--served-model-name", default=None, help=f"default {e.served_model_name}")
    ap.add_argument("--disable-radix-cache", action="store_true", default=None,
                    help="turn off prefix caching (SGLang's flag name; the native engine caches whole KV blocks)")
    ap.add_argument("--moe-kernels", default=None, choices=["auto", "triton", "torch"],
                    help=f"MoE layers: Triton kernels on CUDA (auto), always (triton) or never (torch) "
                         f"(default {e.moe_kernels})")
    ap.add_argument("--quantization", default=None, choices=["none", "fp8"],
                    help="weights served: none (the compute dtype) or fp8 (e4m3 with 128x128 block scales, the "
                         "Kimi-K2/DeepSeek-V3 release format; a bf16 checkpoint or trainer update is quantized) "
                         f"(default {e.quantization})")
    ap.add_argument("--max-body-bytes", type=int, default=None,
                    help="largest request body in bytes (413 above; default 64 MiB)")
    ap.add_argument("--max-weight-body-bytes", type=int, default=None,
                    help="largest /update_weights_from_tensor body in bytes (default 4 GiB)")
    ap.add_argument("--max-json-depth", type=int, default=None,
                    help="deepest JSON nesting accepted in a body (default 64)")
    ap.add_argument("--max-queued-requests", type=int, default=None,
                    help="sequences (prompts x n) in flight over HTTP before new calls get 429 "
                         "(default 32 x --max-running-requests; 0 = no limit)")
    ap.add_argument("--max-queued-tokens", type=int, default=None,
                    help="prompt tokens held by in-flight requests before new calls get 429 "
                         "(default 64 x --max-total-tokens; 0 = no limit)")
    ap.add_argument("--weight-update-timeout", type=float, default=None,
                    help="seconds an open weight update session may go without a call before it is discarded "
                         "(default 600; 0 = never)")
    ap.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on every route but /health and /health_generate "
                         "(default: the K2SYS_API_KEY environment variable, else no key)")
    ap.add_argument("--log-level", default="warning", type=str.lower,
                    choices=["critical", "error", "warning", "info", "debug", "trace"])
    return ap


# flag dest -> (section of --config, field); --disable-radix-cache and --weight-update-timeout map values too
_ENGINE_FLAGS = ("dtype", "device", "max_total_tokens", "max_num_batched_tokens", "max_running_requests", "block_size",
                 "max_model_len", "served_model_name", "moe_kernels", "quantization")
_SERVER_FLAGS = ("max_body_bytes", "max_weight_body_bytes", "max_json_depth", "max_queued_requests",
                 "max_queued_tokens", "api_key")


def _read_config_arg(text: str) -> dict:
    """--config: inline JSON (starts with '{' or '[') or the path of a JSON file."""
    import json

    if text.lstrip()[:1] in ("{", "["):
        where, raw = "--config", text
    else:
        where = f"--config {text}"
        try:
            with open(os.path.expanduser(text), encoding="utf-8") as f:
                raw = f.read()
        except OSError as e:
            raise ValueError(f"{where}: cannot read it ({e.strerror}); give a JSON file or inline JSON") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or set(data) - {"engine", "server"}:
        extra = sorted(set(data) - {"engine", "server"}) if isinstance(data, dict) else data
        raise ValueError(f"{where}: expected {{\"engine\": {{...}}, \"server\": {{...}}}}; unknown keys {extra}")
    return data


def server_config(args: argparse.Namespace) -> tuple[EngineConfig, ServerOptions]:
    """EngineConfig and ServerOptions from --config (if given) with the given flags on top; device=auto
    is decided here. ValueError names the field (`engine.<field>`, `server.<field>`) and the fix."""
    from k2sys.config import build_checked

    data = _read_config_arg(args.config) if args.config else {}
    engine = dict(data.get("engine") or {})
    server = dict(data.get("server") or {})
    engine.update({k: getattr(args, k) for k in _ENGINE_FLAGS if getattr(args, k) is not None})
    if args.disable_radix_cache:
        engine["enable_prefix_caching"] = False
    server.update({k: getattr(args, k) for k in _SERVER_FLAGS if getattr(args, k) is not None})
    if args.weight_update_timeout is not None:
        server["weight_update_timeout_s"] = args.weight_update_timeout or None  # 0 = never
    server["api_key"] = server.get("api_key") or os.environ.get("K2SYS_API_KEY") or None
    cfg = build_checked(EngineConfig, engine, "engine").resolved()
    return cfg, build_checked(ServerOptions, server, "server")


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = _parser().parse_args(argv)
    logging.basicConfig(level="DEBUG" if args.log_level == "trace" else args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg, options = server_config(args)
    except ValueError as e:
        _parser().error(str(e))
    engine = NativeEngine.from_pretrained(args.model, cfg)
    app = build_app(engine, args.model, options)

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
    if not server.started:  # e.g. the port is taken: uvicorn logged why
        print(f"k2sys serve: error: the server did not start on {args.host}:{args.port} (see the log above)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

