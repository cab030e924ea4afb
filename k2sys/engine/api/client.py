"""`HTTPEngine`: the InferenceEngine protocol over SGLang's HTTP dialect, plus weight payloads.

One client for both servers (`k2sys serve` and `sglang.launch_server`):

    requests -> [bounded thread pool | asyncio semaphore] -> POST /generate (one request per
    call, so abort/pause act per request) -> GenerateOutput

Weights cross the process edge as one bucket type (k2sys.ckpt.bucket.FlattenedBucket) per
request: base64 text inside JSON (SGLang's `serialized_named_tensors`; for `k2sys serve`
safetensors bytes, pickle-free and bit-exact, k2sys.engine.transport.wire), or through shared memory /
CUDA IPC handles (send_shm / send_cuda_ipc, which the checkpoint engine's NativeServerSink
feeds with buckets it wrote into the transport memory directly).

A real SGLang server cannot read our encoding: it unpickles `MultiprocessingSerializer` output.
`SGLangEngine` (sglang_adapter.py) overrides the encode hooks below to produce SGLang's own
format (its FlattenedTensorBucket metadata over our bucket buffer, pickled as sglang does).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterable, Iterator, Sequence

import httpx
import torch

from k2sys.engine.transport.shm import ShmUpdatePayload, ShmWriter, cuda_ipc_handle, split_buckets
from k2sys.engine.transport.wire import (BucketEntry, FlattenedBucket, deserialize_named_tensors, serialize_named_tensors,
                               tensors_from_update)

KEEPALIVE_EXPIRY_S = 4.0
"""Seconds an idle pooled connection is kept (below every server's keep-alive timeout)."""

__all__ = ["EngineHTTPError", "HTTPEngine", "BucketEntry", "FlattenedBucket", "serialize_named_tensors",
           "deserialize_named_tensors", "tensors_from_update"]
from k2sys.engine.api.protocol import (GenerateOutput, GenerateRequest, PausedRequest, ProtocolError,
                                   UpdateWeightsFromTensorPayload, abort_payload, memory_payload, pause_payload)

class EngineHTTPError(RuntimeError):
    """An engine route answered with an error (or could not be reached)."""

    def __init__(self, route: str, status: int | None, message: str):
        self.route, self.status, self.message = route, status, message
        where = f"status {status}" if status is not None else "no response"
        super().__init__(f"{route}: {where}: {message}")


# ---------------------------------------------------------------- tensors <-> text

def _next_version(current: str | None) -> str:
    return str(int(current) + 1) if current is not None and current.isdigit() else "1"


# ---------------------------------------------------------------- the client

@dataclass
class _InFlight:
    request: GenerateRequest
    done: threading.Event
    outputs: list[GenerateOutput]


class HTTPEngine:
    """InferenceEngine over HTTP. Retries only idempotent calls (and connect failures, which
    never reached the server); every error names the route and the status."""

    ROUTES = {
        "generate": "/generate", "health": "/health", "flush_cache": "/flush_cache",
        "abort": "/abort_request", "pause": "/pause_generation", "continue": "/continue_generation",
        "release": "/release_memory_occupation", "resume": "/resume_memory_occupation",
        "begin": "/begin_weight_update", "update_tensor": "/update_weights_from_tensor",
        "end": "/end_weight_update", "abort_update": "/abort_weight_update", "get_weights": "/get_weights_by_name", "model_info": "/get_model_info",
        "update_shm": "/update_weights_from_shm", "server_info": "/get_server_info",
    }
    WEIGHT_TRANSPORTS = ("auto", "http", "shm", "cuda_ipc")

    def __init__(self, base_url: str, *, timeout: float = 600.0, connect_timeout: float = 10.0,
                 max_concurrency: int = 64, retries: int = 3, backoff_s: float = 0.25, tp_size: int = 1,
                 incremental_stream: bool = False, api_key: str | None = None, weight_transport: str = "auto",
                 shm_bucket_bytes: int = 512 << 20):
        if not base_url.startswith(("http://", "https://")):
            raise ProtocolError(f"base_url: {base_url!r} needs a scheme; use e.g. http://127.0.0.1:30000")
        if max_concurrency < 1 or retries < 0 or tp_size < 1:
            raise ProtocolError("max_concurrency/tp_size must be >= 1 and retries >= 0")
        if weight_transport not in self.WEIGHT_TRANSPORTS:
            raise ProtocolError(f"weight_transport: {weight_transport!r} must be one of {self.WEIGHT_TRANSPORTS}")
        if shm_bucket_bytes < 1 << 20:
            raise ProtocolError(f"shm_bucket_bytes: {shm_bucket_bytes} is below 1 MiB; use e.g. 512 << 20")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_concurrency, self.retries, self.backoff_s, self.tp_size = max_concurrency, retries, backoff_s, tp_size
        self.incremental_stream = incremental_stream
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.base_url, timeout=self._timeout, headers=self._headers,
                                    limits=self._limits())
        self._lock = threading.Lock()
        self._inflight: dict[str, _InFlight] = {}
        self._weight_version: str | None = None
        self._pending_version: str | None = None
        self.weight_transport, self.shm_bucket_bytes = weight_transport, shm_bucket_bytes
        self._server_transports: list[str] | None = None
        self._max_model_len: int | None = None
        self._shm = ShmWriter()

    # -- plumbing
    def close(self) -> None:
        self._shm.close()
        self._client.close()

    def __enter__(self) -> HTTPEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _url(self, key: str) -> str:
        return self.ROUTES[key]

    @staticmethod
    def _message(resp: httpx.Response) -> str:
        try:
            body = resp.json()
        except ValueError:
            return resp.text[:500] or resp.reason_phrase
        if isinstance(body, dict):
            err = body.get("error")
            if isinstance(err, dict) and "message" in err:
                return str(err["message"])
            for k in ("message", "detail", "error"):
                if body.get(k):
                    return str(body[k])
        return json.dumps(body)[:500]

    def _parse(self, route: str, resp: httpx.Response) -> Any:
        if resp.status_code >= 400:
            raise EngineHTTPError(route, resp.status_code, self._message(resp))
        try:
            body = resp.json() if resp.content else None
        except ValueError:
            return resp.text
        if isinstance(body, dict) and body.get("success") is False:  # SGLang reports some failures with 200
            raise EngineHTTPError(route, resp.status_code, str(body.get("message", body)))
        return body

    def _call(self, method: str, key: str, payload: Any = None, *, idempotent: bool,
              timeout: float | None = None) -> Any:
        route = self._url(key)
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                resp = self._client.request(method, route, json=payload,
                                            timeout=timeout if timeout is not None else self._timeout)
            except httpx.ConnectError as exc:  # never reached the server: safe to retry anything
                if last:
                    raise EngineHTTPError(route, None, f"cannot connect to {self.base_url} ({exc})") from exc
            except httpx.TransportError as exc:
                if last or not idempotent:
                    raise EngineHTTPError(route, None, f"{type(exc).__name__}: {exc}") from exc
            else:
                if resp.status_code in (502, 503, 504) and idempotent and not last:
                    pass
                else:
                    return self._parse(route, resp)
            time.sleep(self.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")

    def _post(self, key: str, payload: Any = None, *, idempotent: bool = False, timeout: float | None = None) -> Any:
        return self._call("POST", key, {} if payload is None else payload, idempotent=idempotent, timeout=timeout)

    # -- generation
    def _track(self, req: GenerateRequest) -> _InFlight:
        entry = _InFlight(req, threading.Event(), [])
        with self._lock:
            if req.rid in self._inflight:
                raise ProtocolError(f"rid: {req.rid!r} is already in flight on this client; use a unique rid")
            self._inflight[req.rid] = entry
        return entry

    def _untrack(self, entry: _InFlight, outputs: list[GenerateOutput]) -> list[GenerateOutput]:
        entry.outputs.extend(outputs)
        with self._lock:
            self._inflight.pop(entry.request.rid, None)
        entry.done.set()
        return outputs

    @staticmethod
    def _outputs(body: Any) -> list[GenerateOutput]:
        items = body if isinstance(body, list) else [body]
        return [GenerateOutput.from_sglang(it) for it in items]

    def _generate_one(self, req: GenerateRequest) -> list[GenerateOutput]:
        entry = self._track(req)
        outputs: list[GenerateOutput] = []
        try:
            outputs = self._outputs(self._post("generate", req.to_sglang()))
        finally:
            self._untrack(entry, outputs)
        return outputs

    @staticmethod
    def _check_requests(requests: Sequence[GenerateRequest]) -> list[GenerateRequest]:
        reqs = list(requests)
        for i, r in enumerate(reqs):
            if not isinstance(r, GenerateRequest):
                raise ProtocolError(f"requests[{i}]: expected GenerateRequest, got {type(r).__name__}")
        return reqs

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateOutput]:
        """Outputs in request order (n per request), at most max_concurrency requests in flight.

        Many requests go through one event loop and one async connection pool (async_generate):
        threads sharing httpx's sync pool can race when it expires idle connections (a request
        then reads a closed or reused socket: EBADF, or a reply that never comes)."""
        reqs = self._check_requests(requests)
        if len(reqs) <= 1:
            return [o for r in reqs for o in self._generate_one(r)]
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # the usual case: no event loop in this thread
            return asyncio.run(self.async_generate(reqs))
        with ThreadPoolExecutor(min(self.max_concurrency, len(reqs)), thread_name_prefix="k2sys-gen") as pool:
            groups = list(pool.map(self._generate_one, reqs))  # inside a running loop: threads
        return [o for g in groups for o in g]

    def _limits(self) -> httpx.Limits:
        # Idle connections expire on our side before servers close them (uvicorn: 5 s by default,
        # `k2sys serve`: 75 s), so a request is not sent on a connection being closed under it.
        return httpx.Limits(max_connections=self.max_concurrency + 8, keepalive_expiry=KEEPALIVE_EXPIRY_S)

    def _async_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, timeout=self._timeout, headers=self._headers,
                                 limits=self._limits())

    async def async_generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateOutput]:
        reqs = self._check_requests(requests)
        sem = asyncio.Semaphore(self.max_concurrency)
        route = self._url("generate")
        async with self._async_client() as client:
            async def one(req: GenerateRequest) -> list[GenerateOutput]:
                async with sem:
                    entry = self._track(req)
                    outputs: list[GenerateOutput] = []
                    try:
                        try:
                            resp = await client.post(route, json=req.to_sglang())
                        except httpx.TransportError as exc:
                            raise EngineHTTPError(route, None, f"{type(exc).__name__}: {exc}") from exc
                        outputs = self._outputs(self._parse(route, resp))
                    finally:
                        self._untrack(entry, outputs)
                    return outputs
            groups = await asyncio.gather(*(one(r) for r in reqs))
        return [o for g in groups for o in g]

    def _stream_chunk(self, route: str, line: str, prev: GenerateOutput | None) -> GenerateOutput | None:
        if not line.startswith("data:"):
            return None
        data = line[5:].strip()
        if data == "[DONE]":
            return None
        body = json.loads(data)
        if isinstance(body, dict) and "error" in body:
            err = body["error"]
            raise EngineHTTPError(route, 200, str(err.get("message", err) if isinstance(err, dict) else err))
        out = GenerateOutput.from_sglang(body)
        if self.incremental_stream and prev is not None:  # server sends deltas: accumulate them
            lps = None if out.output_logprobs is None else (prev.output_logprobs or ()) + out.output_logprobs
            out = GenerateOutput(rid=out.rid, output_ids=prev.output_ids + out.output_ids, text=prev.text + out.text,
                                 output_logprobs=lps, finish_reason=out.finish_reason, prompt_tokens=out.prompt_tokens,
                                 completion_tokens=out.completion_tokens, weight_version=out.weight_version,
                                 matched_stop=out.matched_stop)
        return out

    @staticmethod
    def _stream_request(req: GenerateRequest) -> dict[str, Any]:
        if req.sampling.n != 1:
            raise ProtocolError("n: streaming supports one sample per request; send n requests with n=1")
        return req.to_sglang(stream=True)

    def stream_generate(self, req: GenerateRequest) -> Iterator[GenerateOutput]:
        """Cumulative snapshots of one request as it decodes; the last one has finish_reason set."""
        route, payload = self._url("generate"), self._stream_request(req)
        entry, prev = self._track(req), None
        try:
            with self._client.stream("POST", route, json=payload) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise EngineHTTPError(route, resp.status_code, self._message(resp))
                for line in resp.iter_lines():
                    out = self._stream_chunk(route, line, prev)
                    if out is not None:
                        prev = out
                        yield out
        finally:
            self._untrack(entry, [prev] if prev is not None else [])

    async def astream_generate(self, req: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        route, payload = self._url("generate"), self._stream_request(req)
        entry, prev = self._track(req), None
        try:
            async with self._async_client() as client, client.stream("POST", route, json=payload) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise EngineHTTPError(route, resp.status_code, self._message(resp))
                async for line in resp.aiter_lines():
                    out = self._stream_chunk(route, line, prev)
                    if out is not None:
                        prev = out
                        yield out
        finally:
            self._untrack(entry, [prev] if prev is not None else [])

    # -- partial rollout
    def abort(self, rid: str | None = None) -> None:
        """Abort one request, or every request when rid is None."""
        self._post("abort", abort_payload(rid), idempotent=True)

    def pause(self, mode: str = "abort") -> list[PausedRequest]:
        """Pause the server. In "abort" mode the in-flight requests of this client come back with
        finish_reason "abort" and their tokens so far; they are returned as PausedRequests (only
        requests sent as token ids can be resumed from a prefix). A server that lists paused
        requests in its answer ("paused_requests", k2sys serve) is taken at its word. In
        "retract"/"in_place" modes the requests stay queued on the server and resume on continue.
        """
        payload = pause_payload(mode)
        with self._lock:
            waiting = list(self._inflight.values())
        body = self._post("pause", payload)
        if mode != "abort":
            return []
        if isinstance(body, dict) and body.get("paused_requests") is not None:
            return [PausedRequest.from_json(d) for d in body["paused_requests"]]
        deadline = time.monotonic() + self.timeout
        paused = []
        for entry in waiting:
            if not entry.done.wait(max(0.0, deadline - time.monotonic())):
                raise EngineHTTPError(self._url("pause"), None, f"request {entry.request.rid!r} did not return "
                                      f"within {self.timeout:.0f} s of the pause; is the server stuck?")
            for out in entry.outputs:
                if out.finish_reason == "abort" and entry.request.input_ids is not None:
                    paused.append(PausedRequest.from_output(entry.request, out))
        return paused

    def continue_generation(self) -> None:
        self._post("continue", {})

    # -- memory
    def release_memory(self, tags: Iterable[str] | None = None) -> None:
        self._post("release", memory_payload(tags))

    def resume_memory(self, tags: Iterable[str] | None = None) -> None:
        self._post("resume", memory_payload(tags))

    def flush_cache(self) -> None:
        self._post("flush_cache", None, idempotent=True)

    # -- weights
    def begin_weight_update(self) -> None:
        self._post("begin", {})
        self._pending_version = _next_version(self._weight_version)

    def encode_named_tensors(self, named: list[tuple[str, torch.Tensor]]) -> str:
        """Hook: one payload string for plain named tensors (load_format None)."""
        return serialize_named_tensors(named)

    def encode_bucket(self, bucket: FlattenedBucket) -> list[tuple[str | None, str]]:
        """Hook: (load_format, payload) pairs that carry one bucket."""
        return [("flattened_bucket", bucket.serialize())]

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]] | Iterable[FlattenedBucket], *,
                       weight_version: str | None = None, flush_cache: bool = False,
                       transport: str | None = None) -> None:
        """Send named tensors or flattened buckets inside the open update session.

        transport: "http" (base64 bodies, works with any server; one request for named tensors,
        one per bucket), "shm" (same host: bytes through a reused /dev/shm segment, buckets of at
        most shm_bucket_bytes, small JSON requests), "cuda_ipc" (same host, CUDA tensors: IPC
        handles of device buckets), or None = this client's weight_transport ("auto": "shm" or,
        for CUDA tensors, "cuda_ipc" when the server is on localhost and lists it in
        /get_server_info's weight_transports; else "http"). flush_cache is forwarded on http only.

        This copies the tensors into transport buckets first; the checkpoint engine's
        NativeServerSink (k2sys.ckpt.engine_sinks) writes them there directly instead.
        """
        items = list(weights)
        if not items:
            raise ProtocolError("weights: empty; send at least one tensor or bucket")
        version = weight_version if weight_version is not None else self._pending_version
        if weight_version is not None:
            self._pending_version = weight_version
        if all(isinstance(b, FlattenedBucket) for b in items):
            buckets = True
        elif all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in items):
            buckets = False
        else:
            raise ProtocolError("weights: pass either (name, tensor) pairs or FlattenedBuckets, not a mix")
        mode = self.resolve_transport(transport, items)
        if mode == "http":
            calls = ([pair for b in items for pair in self.encode_bucket(b)] if buckets
                     else [(None, self.encode_named_tensors(items))])
            for fmt, data in calls:
                payload = UpdateWeightsFromTensorPayload(serialized_named_tensors=[data] * self.tp_size,
                                                         load_format=fmt, flush_cache=flush_cache,
                                                         weight_version=version)
                self._post("update_tensor", payload.to_sglang())
            return
        groups = [b.unpack() for b in items] if buckets else split_buckets(items, self.shm_bucket_bytes)
        if mode == "shm":
            with self._shm.lock:
                try:
                    seg = self._shm.segment(max(FlattenedBucket.pack_size(g) for g in groups))
                    for i, g in enumerate(groups):
                        entries = [BucketEntry.from_json(e) for e in seg.write(g)]
                        self.send_shm(FlattenedBucket(seg.tensor, entries), seg, version,
                                      release=i == len(groups) - 1)
                except BaseException:
                    self._shm.close()  # an aborted update leaves no segment behind
                    raise
            return
        for g in groups:
            bucket = FlattenedBucket.pack(g, device=torch.device("cuda", torch.cuda.current_device()))
            self.send_cuda_ipc(bucket, version)
            del bucket
        torch.cuda.ipc_collect()

    def send_shm(self, bucket: FlattenedBucket, segment: Any, version: str | None, release: bool = True) -> None:
        """POST one bucket whose buffer lies in shared-memory `segment` (k2sys.engine.transport.shm.ShmSegment);
        the server copies it into its weights before answering."""
        base = bucket.buffer.data_ptr() - segment.tensor.data_ptr()
        if not 0 <= base <= segment.nbytes - bucket.nbytes:
            raise ProtocolError(f"bucket: its buffer is not inside shared-memory segment {segment.name}")
        entries = tuple({**e.to_json(), "offset": e.offset + base} for e in bucket.entries)
        payload = ShmUpdatePayload(entries=entries, shm_name=segment.name, shm_size=segment.nbytes,
                                   weight_version=version, release=release)
        self._post("update_shm", payload.to_json())

    def send_cuda_ipc(self, bucket: FlattenedBucket, version: str | None) -> None:
        """POST one CUDA bucket by its IPC handle; the server copies it before answering (the
        caller keeps the buffer alive until then and may reuse it after)."""
        torch.cuda.current_stream(bucket.buffer.device).synchronize()  # the server reads on its own stream
        payload = ShmUpdatePayload(entries=tuple(e.to_json() for e in bucket.entries), transport="cuda_ipc",
                                   cuda_ipc=cuda_ipc_handle(bucket.buffer), weight_version=version)
        self._post("update_shm", payload.to_json())

    def send_http(self, bucket: FlattenedBucket, version: str | None) -> None:
        """POST one bucket as base64 bytes in /update_weights_from_tensor (any host)."""
        for fmt, data in self.encode_bucket(bucket):
            payload = UpdateWeightsFromTensorPayload(serialized_named_tensors=[data] * self.tp_size, load_format=fmt,
                                                     flush_cache=False, weight_version=version)
            self._post("update_tensor", payload.to_sglang())

    def server_info(self) -> dict[str, Any]:
        info = self._call("GET", "server_info", idempotent=True)
        if not isinstance(info, dict):
            raise EngineHTTPError(self._url("server_info"), 200, f"expected a JSON object, got {str(info)[:200]}")
        return info

    @property
    def max_model_len(self) -> int | None:
        """The server's context length (prompt + new tokens), from /get_server_info: k2sys serve's
        max_model_len or SGLang's context_length; None when the server does not say (SGLang derives it
        from the model and may list null). Cached: it does not change while a server runs."""
        if self._max_model_len is None:
            try:
                info = self.server_info()
            except EngineHTTPError:
                return None
            got = info.get("max_model_len", info.get("context_length"))
            self._max_model_len = got if isinstance(got, int) and not isinstance(got, bool) and got > 1 else None
        return self._max_model_len

    def server_transports(self) -> list[str]:
        """Weight transports the server lists in /get_server_info (["http"] if it lists none)."""
        if self._server_transports is None:
            try:
                info = self._call("GET", "server_info", idempotent=True)
            except EngineHTTPError:
                info = None
            got = info.get("weight_transports") if isinstance(info, dict) else None
            self._server_transports = list(got) if isinstance(got, list) else ["http"]
        return self._server_transports

    def resolve_transport(self, transport: str | None, items: Sequence[Any] = (), on_cuda: bool | None = None) -> str:
        """The transport an update would use (see update_weights)."""
        mode = transport or self.weight_transport
        if mode not in self.WEIGHT_TRANSPORTS:
            raise ProtocolError(f"transport: {mode!r} must be one of {self.WEIGHT_TRANSPORTS}")
        if mode != "auto":
            return mode
        host = httpx.URL(self.base_url).host
        if host not in ("127.0.0.1", "localhost", "::1"):
            return "http"
        if on_cuda is None:
            on_cuda = any((b.buffer if isinstance(b, FlattenedBucket) else b[1]).device.type == "cuda" for b in items)
        want = "cuda_ipc" if on_cuda else "shm"
        return want if want in self.server_transports() else "http"

    def end_weight_update(self) -> str | None:
        self._post("end", {})
        if self._pending_version is not None:
            self._weight_version, self._pending_version = self._pending_version, None
        return self._weight_version

    def abort_weight_update(self) -> None:
        """Discard the open session on the server (k2sys serve); the previous weights stay in use."""
        self._post("abort_update", {}, idempotent=True)
        self._pending_version = None

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> Any:
        return self._post("get_weights", {"name": name, "truncate_size": truncate_size}, idempotent=True)

    def get_model_info(self) -> dict[str, Any]:
        return self._call("GET", "model_info", idempotent=True)

    @property
    def weight_version(self) -> str | None:
        """The version set by the last completed update session from this client (None before)."""
        return self._weight_version

    def health(self, timeout: float = 5.0) -> bool:
        try:
            return self._client.get(self._url("health"), timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False
