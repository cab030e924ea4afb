"""`k2sys serve`: the native engine behind SGLang's HTTP routes and OpenAI's /v1 routes.

    HTTP (uvicorn event loop) --submit/control (worker threads)--> NativeEngine scheduler thread
    scheduler thread --loop.call_soon_threadsafe--> per-request asyncio queues --> JSON / SSE

Payloads follow sglang 0.5.23 (`GenerateReqInput`, `SamplingParams`, `ReleaseMemoryOccupationReqInput`,
`UpdateWeightsFromTensorReqInput`, `PauseGenerationReqInput`, `AbortReq`), so the same client code
talks to this server and to SGLang; the OpenAI routes live in k2sys.engine.openai_api. Every field
SGLang and OpenAI define is honoured or refused with a 400 naming it (k2sys.engine.api_fields,
docs/engine_api.md); malformed JSON, unknown fields and bad values get a 400 with a message and
the server keeps serving others. SIGTERM aborts in-flight requests (their callers get
finish_reason "abort"), drains the HTTP connections and stops the engine thread.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import threading
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from k2sys.engine.api_fields import GENERATE, read_json
from k2sys.engine.api_fields import check_fields as check_api_fields
from k2sys.engine.wire import tensors_from_update
from k2sys.engine.config import EngineConfig, EngineError, LogprobOptions, RequestError, SamplingParams
from k2sys.engine.engine import NativeEngine
from k2sys.engine.openai_api import OpenAIRoutes, sse
from k2sys.engine.protocol import ProtocolError, UpdateWeightsFromTensorPayload
from k2sys.engine.shm import ShmReader, ShmUpdatePayload, server_transports

__all__ = ["build_app", "main", "parse_generate"]

log = logging.getLogger(__name__)

def error(status: int, message: str) -> JSONResponse:
    """SGLang/OpenAI error body: both clients read error.message or message."""
    return JSONResponse({"object": "error", "message": message, "type": "BadRequest" if status < 500 else "Error",
                         "param": None, "code": status, "error": {"message": message, "code": status}},
                        status_code=status)


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
    """A /generate body -> (one submit kwargs dict per prompt, batched, stream).

    Fields follow SGLang's GenerateReqInput (k2sys.engine.api_fields.GENERATE): per-prompt fields
    take one value for all prompts or a list with one per prompt."""
    check_api_fields("generate", body, GENERATE, per_item=True)
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
    if batched and not prompts:
        raise RequestError(f"{key}: empty batch; send at least one prompt")
    k = len(prompts)

    def per_prompt(name: str, default: Any, nested: bool = False) -> list:
        """One value per prompt: a list of k values in a batch (for `nested` fields, whose single
        value is itself a list, a list of k lists), else the single value for every prompt."""
        v = body.get(name)
        if v is None:
            return [default] * k
        if isinstance(v, list) and (name == "sampling_params" or (batched and (not nested or (v and isinstance(v[0], list))))):
            if len(v) != k:
                raise RequestError(f"{name}: {len(v)} entries for {k} prompts; send one per prompt or a single value")
            return v
        return [v] * k

    rids = body.get("rid")
    if isinstance(rids, str) and batched:
        rid_list = [f"{rids}-{i}" for i in range(k)]
    else:
        rid_list = per_prompt("rid", None)
    sps = per_prompt("sampling_params", None)
    stream = False if body.get("stream") is None else body["stream"]
    if not isinstance(stream, bool):
        raise RequestError(f"stream: must be true or false, got {stream!r}")
    text_in_lp = False if body.get("return_text_in_logprobs") is None else body["return_text_in_logprobs"]
    lps, starts, tops = per_prompt("return_logprob", False), per_prompt("logprob_start_len", -1), \
        per_prompt("top_logprobs_num", 0)
    token_ids = per_prompt("token_ids_logprob", None, nested=True)
    keys, salts = per_prompt("extra_key", None), per_prompt("cache_salt", None)
    items = []
    for i in range(k):
        if not isinstance(sps[i], (dict, type(None))):
            raise RequestError("sampling_params: must be an object (or a list of objects, one per prompt)")
        if lps[i] is not None and not isinstance(lps[i], bool):
            raise RequestError(f"return_logprob: must be true or false, got {lps[i]!r}")
        opts = LogprobOptions(return_logprob=bool(lps[i]), logprob_start_len=-1 if starts[i] is None else starts[i],
                              top_logprobs_num=0 if tops[i] is None else tops[i], token_ids_logprob=token_ids[i],
                              return_text_in_logprobs=text_in_lp)
        for name, v in (("extra_key", keys[i]), ("cache_salt", salts[i])):
            if v is not None and not isinstance(v, str):
                raise RequestError(f"{name}: must be a string (or one per prompt)")
        salt = None if not (keys[i] or salts[i]) else f"{keys[i] or ''}\x00{salts[i] or ''}"
        items.append({key: prompts[i], "params": SamplingParams.from_dict(sps[i]), "rid": rid_list[i],
                      "logprobs": opts, "cache_salt": salt})
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

    async def results(self, handles: list, q: asyncio.Queue, total: int, with_index: bool = False) -> list:
        """Final outputs ordered (prompt, sample); with_index: ((prompt, sample), output) pairs."""
        done: dict[tuple[int, int], dict] = {}
        while len(done) < total:
            idx, sample, out, finished = await q.get()
            if finished:
                done[(idx, sample)] = out
        return [(key, done[key]) if with_index else done[key] for key in sorted(done)]

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
    async def server_info() -> dict:
        stats = engine.stats()
        return {"engine": "k2sys-native", "version": _version(), **stats, **_model_info(),
                "max_total_num_tokens": engine.config.max_total_tokens, "max_model_len": engine.max_model_len,
                "context_length": engine.max_model_len, "max_running_requests": engine.config.max_running_requests,
                "chunked_prefill_size": engine.config.max_num_batched_tokens, "page_size": engine.config.block_size,
                "disable_radix_cache": not engine.config.enable_prefix_caching, "dtype": str(engine.runner.dtype),
                "device": engine.config.device, "memory_bytes": engine.memory_bytes(),
                "quantization": engine.config.quantization, "weight_transports": server_transports(),
                "internal_states": [{"running": stats["running"], "waiting": stats["waiting"]}]}

    @app.get("/get_weight_version")
    async def weight_version() -> dict:
        return {"weight_version": engine.weight_version}

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request) -> Response:
        body = await read_json(request, allow_empty=False)
        items, batched, stream = parse_generate(body)
        want_prompt = False if body.get("return_prompt_token_ids") is None else body["return_prompt_token_ids"]
        if not isinstance(want_prompt, bool):
            raise RequestError(f"return_prompt_token_ids: must be true or false, got {want_prompt!r}")
        handles, q, total = await streams.submit(items)
        multi = batched or total > 1

        def finish(idx: int, out: dict) -> dict:
            return {**out, "prompt_token_ids": list(handles[idx].request.input_ids)} if want_prompt else out

        if not stream:
            done = await streams.results(handles, q, total, with_index=True)
            outs = [finish(idx, out) for (idx, _), out in done]
            return JSONResponse(outs if multi else outs[0])

        async def body_chunks() -> AsyncIterator[bytes]:
            async for idx, sample, out, _ in streams.events(handles, q, total):
                out = finish(idx, out)
                if multi:
                    out = {**out, "index": idx * items[idx]["params"].n + sample}
                yield sse(out)
            yield b"data: [DONE]\n\n"
        return StreamingResponse(body_chunks(), media_type="text/event-stream")

    @app.post("/tokenize")
    @app.post("/v1/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        """SGLang's /tokenize: {prompt: str | [str]} or {messages, tools}; -> {tokens, count, max_model_len}."""
        body = await read_json(request, allow_empty=False)
        check_fields("tokenize", body, {"model", "prompt", "messages", "tools", "add_special_tokens",
                                        "add_generation_prompt"},
                     {"tool_choice": (None, "auto", "none"), "reasoning_effort": (None,),
                      "continue_final_message": (None, False), "chat_template_kwargs": (None, {})})
        prompt, messages = body.get("prompt"), body.get("messages")
        if (prompt is None) == (messages is None):
            raise RequestError("tokenize: give exactly one of prompt or messages")
        special = body.get("add_special_tokens")
        if messages is not None:
            from k2sys.engine.openai_api import normalize_messages

            gen = body.get("add_generation_prompt")
            msgs, _, _ = normalize_messages(messages, engine.chat_format())
            tokens = engine.render_chat(msgs, body.get("tools"), add_generation_prompt=True if gen is None else bool(gen),
                                        add_special_tokens=bool(special) if gen is not None else False)
            return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len})
        special = True if special is None else special
        if not isinstance(special, bool):
            raise RequestError(f"add_special_tokens: must be true or false, got {special!r}")
        if isinstance(prompt, str):
            tokens = engine.encode(prompt, add_special_tokens=special)
            return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len})
        if not isinstance(prompt, list) or not all(isinstance(p, str) for p in prompt):
            raise RequestError("prompt: a string or a list of strings")
        tokens = [engine.encode(p, add_special_tokens=special) for p in prompt]
        return JSONResponse({"tokens": tokens, "count": [len(t) for t in tokens], "max_model_len": engine.max_model_len})

    @app.post("/detokenize")
    @app.post("/v1/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        """SGLang's /detokenize: {tokens: [int] | [[int]], skip_special_tokens} -> {text}."""
        body = await read_json(request, allow_empty=False)
        check_fields("detokenize", body, {"model", "tokens", "skip_special_tokens"})
        tokens, skip = body.get("tokens"), body.get("skip_special_tokens", True)
        if not isinstance(skip, bool):
            raise RequestError(f"skip_special_tokens: must be true or false, got {skip!r}")
        vocab = engine.model_config.vocab_size

        def one(ids: Any) -> str:
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                    for t in ids):
                raise RequestError(f"tokens: token ids must be ints in [0, {vocab})")
            return engine.detokenize(ids, skip)

        if isinstance(tokens, list) and tokens and isinstance(tokens[0], list):
            return JSONResponse({"text": [one(t) for t in tokens]})
        return JSONResponse({"text": one(tokens)})

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

