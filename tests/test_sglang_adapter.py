"""HTTPEngine / SGLangEngine against an in-test FakeSGLangServer, launch.py, and (where they exist)
a real SGLang (gpu) and `k2sys serve` (contract test).

The fake is only for ordering and fault drills: every weight body it receives is parsed with
SGLang's own request class and decoded with SGLang's serializer and flattened-bucket loader, for
every TP rank (tests/sglang_ref.py); the payloads themselves are tested in test_sglang_payloads.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import textwrap
import threading
import time

import pytest
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from k2sys.engine.api.client import EngineHTTPError, FlattenedBucket, HTTPEngine, tensors_from_update
from k2sys.engine.launch import (LaunchError, NativeLaunchConfig, ServerProcess, SGLangLaunchConfig, free_port,
                                 launch_server)
from k2sys.engine.api.protocol import (GenerateRequest, ProtocolError, SamplingParams, UpdateWeightsFromTensorPayload,
                                   colocated_update)
from k2sys.engine.api.sglang_adapter import (InitWeightsUpdateGroupPayload, SGLangEngine,
                                        UpdateWeightsFromDistributedPayload, sglang_available)

sglang_ref = pytest.importorskip("sglang_ref")  # SGLang's own decoding (needs sglang, scripts/install.sh)
try:
    sglang_ref.prepare()
except ImportError as e:
    pytest.skip(str(e), allow_module_level=True)
pytest.importorskip("sglang")

# Field names of sglang 0.5.23's io_struct / SamplingParams (see protocol.py's docstring).
GENERATE_FIELDS = {"rid", "text", "input_ids", "sampling_params", "return_logprob", "stream"}
SAMPLING_FIELDS = {"max_new_tokens", "temperature", "top_p", "top_k", "n", "stop", "stop_token_ids", "sampling_seed"}
UPDATE_TENSOR_FIELDS = {"serialized_named_tensors", "load_format", "flush_cache", "abort_all_requests",
                        "weight_version"}


def expected_tokens(prompt: list[int], n: int) -> list[int]:
    return [(prompt[-1] + 1 + i) % 1000 for i in range(n)]


class FakeSGLangServer:
    """A stand-in for `sglang.launch_server`, for these tests only: SGLang's routes, payload field
    names and session rules (0.5.23: weight updates only inside begin/end; release needs an idle
    engine), with a toy "model" whose i-th output token is prompt[-1] + 1 + i."""

    def __init__(self, decode_delay: float = 0.0, weight_format: str = "sglang", list_paused: bool = False):
        self.decode_delay, self.weight_format = decode_delay, weight_format
        self.list_paused = list_paused  # answer like k2sys serve: paused requests in the pause reply
        self.log: list[tuple[str, object]] = []
        self.session_open = self.abort_all = False
        self.released: set[str] = set()
        self.aborted: set[str] = set()
        self.active = self.max_active = 0
        self.progress: dict[str, int] = {}
        self.fail: dict[str, list[int]] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.version = "default"
        self.app = self._build()

    def _failure(self, route: str):
        codes = self.fail.get(route)
        if codes:
            return JSONResponse({"error": {"message": f"injected {codes[0]}"}}, status_code=codes.pop(0))
        return None

    @staticmethod
    def _bad(msg: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"object": "error", "message": msg, "code": status}, status_code=status)

    def _item(self, rid, prompt, ids, finish, lp):
        meta = {"id": rid, "finish_reason": finish, "prompt_tokens": len(prompt), "completion_tokens": len(ids),
                "cached_tokens": 0, "weight_version": self.version}
        if lp:
            meta["output_token_logprobs"] = [[-0.1 * (i + 1), t, None] for i, t in enumerate(ids)]
        return {"text": " ".join(map(str, ids)), "output_ids": ids, "meta_info": meta}

    async def _decode(self, rid, prompt, sp, lp):
        ids: list[int] = []
        want = expected_tokens(prompt, sp.get("max_new_tokens", 128))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            for tok in want:
                if self.abort_all or rid in self.aborted:
                    yield self._item(rid, prompt, list(ids), {"type": "abort", "message": "aborted"}, lp)
                    return
                await asyncio.sleep(self.decode_delay)
                ids.append(tok)
                self.progress[rid] = len(ids)
                if len(ids) < len(want):
                    yield self._item(rid, prompt, list(ids), None, lp)
            yield self._item(rid, prompt, ids, {"type": "length", "length": len(ids)}, lp)
        finally:
            self.active -= 1

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.post("/generate")
        async def generate(request: Request):
            body = await request.json()
            self.log.append(("/generate", body))
            if (f := self._failure("/generate")) is not None:
                return f
            if not set(body) <= GENERATE_FIELDS or not set(body.get("sampling_params", {})) <= SAMPLING_FIELDS:
                return self._bad(f"unexpected fields in {sorted(body)}")
            if "input_ids" not in body:
                return self._bad("this fake only takes input_ids")
            if self.released:
                return self._bad(f"memory released: {sorted(self.released)}", 503)
            sp, lp, rid, prompt = body["sampling_params"], body["return_logprob"], body["rid"], body["input_ids"]
            if body["stream"]:
                async def sse():
                    async for item in self._decode(rid, prompt, sp, lp):
                        yield f"data: {json.dumps(item)}\n\n"
                    yield "data: [DONE]\n\n"
                return StreamingResponse(sse(), media_type="text/event-stream")
            n = sp.get("n", 1)
            outs = []
            for k in range(n):
                last = None
                async for last in self._decode(rid if n == 1 else f"{rid}-{k}", prompt, sp, lp):
                    pass
                outs.append(last)
            return outs[0] if n == 1 else outs

        @app.get("/health")
        async def health():
            return Response(status_code=200)

        @app.get("/server_info")
        async def server_info():
            return {"version": "0.5.23"}

        @app.get("/model_info")
        async def model_info():
            return {"weight_version": self.version}

        @app.post("/abort_request")
        async def abort(request: Request):
            body = await request.json()
            self.log.append(("/abort_request", body))
            if set(body) != {"rid", "abort_all"}:
                return self._bad("AbortReq fields")
            self.aborted.add(body["rid"])
            return Response(status_code=200)

        @app.post("/pause_generation")
        async def pause(request: Request):
            body = await request.json()
            self.log.append(("/pause_generation", body))
            if body.get("mode") not in ("abort", "retract", "in_place") or set(body) != {"mode"}:
                return self._bad("mode")
            self.abort_all = body["mode"] == "abort"
            while self.abort_all and self.active:  # sglang returns once the aborts are sent back
                await asyncio.sleep(0.005)
            reply = {"message": "Generation paused successfully.", "status": "ok"}
            if self.list_paused:
                reply["paused_requests"] = [{"rid": "q", "input_ids": [5], "output_ids": [6], "output_logprobs": None,
                                             "sampling_params": {"max_new_tokens": 3}, "return_logprob": False,
                                             "weight_version": "2", "finish_reason": "abort"}]
            return reply

        @app.post("/continue_generation")
        async def cont(request: Request):
            self.log.append(("/continue_generation", await request.json()))
            self.abort_all = False
            return {"message": "Generation continued successfully.", "status": "ok"}

        @app.api_route("/release_memory_occupation", methods=["GET", "POST"])
        async def release(request: Request):
            body = await request.json()
            self.log.append(("/release_memory_occupation", body))
            if self.active:
                return self._bad("release_memory_occupation needs an idle engine")
            self.released |= set(body["tags"])
            return None

        @app.api_route("/resume_memory_occupation", methods=["GET", "POST"])
        async def resume(request: Request):
            body = await request.json()
            self.log.append(("/resume_memory_occupation", body))
            if not set(body["tags"]) <= self.released:
                return self._bad(f"resume of {body['tags']} that were not released")
            self.released -= set(body["tags"])
            return None

        @app.post("/begin_weight_update")
        async def begin(request: Request):
            self.log.append(("/begin_weight_update", await request.json()))
            if self.session_open:
                return JSONResponse({"success": False, "message": "session already open"}, status_code=400)
            self.session_open = True
            return {"success": True, "message": "ok"}

        @app.post("/update_weights_from_tensor")
        async def update(request: Request):
            body = await request.json()
            self.log.append(("/update_weights_from_tensor", body))
            if set(body) != UPDATE_TENSOR_FIELDS:
                return self._bad(f"fields {sorted(body)}")
            if not self.session_open:  # sglang 0.5.23 refuses updates outside a session
                return JSONResponse({"success": False, "message": "no open weight update session"},
                                    status_code=400)
            if "weights" in self.released:
                return self._bad("weights are released; resume them first")
            if self.weight_format == "sglang":  # what every TP rank of sglang loads, by sglang's code
                cls = sglang_ref.io_struct().UpdateWeightsFromTensorReqInput
                assert not sglang_ref.unknown_fields(cls, body), sglang_ref.unknown_fields(cls, body)
                per_rank = [sglang_ref.load_tensor_update(body, r) for r in range(len(body["serialized_named_tensors"]))]
                named = per_rank[0]
                for other in per_rank[1:]:
                    assert [n for n, _ in other] == [n for n, _ in named]
                    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                               for (_, a), (_, b) in zip(other, named))
            else:
                named = tensors_from_update(UpdateWeightsFromTensorPayload.from_sglang(body))
            self.weights.update({n: t.clone() for n, t in named})
            if body["weight_version"] is not None:
                self.version = body["weight_version"]
            return {"success": True, "message": "Succeeded to update model weights."}

        @app.post("/end_weight_update")
        async def end(request: Request):
            self.log.append(("/end_weight_update", await request.json()))
            if not self.session_open:
                return JSONResponse({"success": False, "message": "no session"}, status_code=400)
            self.session_open = False
            return {"success": True, "message": "ok"}

        @app.api_route("/flush_cache", methods=["GET", "POST"])
        async def flush(request: Request):
            self.log.append(("/flush_cache", None))
            if (f := self._failure("/flush_cache")) is not None:
                return f
            if self.active:
                return PlainTextResponse("Cache not flushed: requests running", status_code=400)
            return PlainTextResponse("Cache flushed.\n")

        return app

    def routes(self) -> list[str]:
        return [r for r, _ in self.log]


@contextlib.contextmanager
def serve(app: FastAPI):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def fake():
    srv = FakeSGLangServer()
    with serve(srv.app) as url:
        yield srv, url


def greedy(max_new: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=max_new, **kw)


# ------------------------------------------------------------------ generation

def test_generate_payload_and_outputs(fake):
    srv, url = fake
    with HTTPEngine(url) as eng:
        req = GenerateRequest(rid="a", input_ids=[3, 4], sampling=greedy(5, sampling_seed=1), return_logprob=True)
        (out,) = eng.generate([req])
    assert srv.log[0] == ("/generate", {"rid": "a", "input_ids": [3, 4], "return_logprob": True, "stream": False,
                                        "sampling_params": {"max_new_tokens": 5, "temperature": 0, "top_p": 1.0,
                                                            "top_k": -1, "n": 1, "sampling_seed": 1}})
    assert out.rid == "a" and list(out.output_ids) == expected_tokens([3, 4], 5)
    assert out.finish_reason == "length" and out.prompt_tokens == 2 and out.completion_tokens == 5
    assert out.output_logprobs == pytest.approx([-0.1, -0.2, -0.3, -0.4, -0.5]) and out.weight_version == "default"


def test_generate_n_samples_flattened(fake):
    _, url = fake
    with HTTPEngine(url) as eng:
        outs = eng.generate([GenerateRequest(rid="m", input_ids=[1], sampling=greedy(2, n=3))])
    assert [o.rid for o in outs] == ["m-0", "m-1", "m-2"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_concurrency_is_bounded_and_order_kept(mode):
    srv = FakeSGLangServer(decode_delay=0.01)
    with serve(srv.app) as url, HTTPEngine(url, max_concurrency=3) as eng:
        reqs = [GenerateRequest(rid=f"r{i}", input_ids=[i * 10], sampling=greedy(4)) for i in range(10)]
        outs = eng.generate(reqs) if mode == "sync" else asyncio.run(eng.async_generate(reqs))
    assert [o.rid for o in outs] == [r.rid for r in reqs]
    assert all(list(o.output_ids) == expected_tokens([i * 10], 4) for i, o in enumerate(outs))
    assert 2 <= srv.max_active <= 3  # concurrent, but never more than the bound


def test_stream_generate_cumulative(fake):
    _, url = fake
    with HTTPEngine(url) as eng:
        req = GenerateRequest(rid="s", input_ids=[7], sampling=greedy(4), return_logprob=True)
        chunks = list(eng.stream_generate(req))

        async def collect():
            return [c async for c in eng.astream_generate(GenerateRequest(rid="s2", input_ids=[7],
                                                                          sampling=greedy(4)))]
        achunks = asyncio.run(collect())
        with pytest.raises(ProtocolError, match="n"):
            list(eng.stream_generate(GenerateRequest(input_ids=[1], sampling=greedy(2, n=2))))
    assert [len(c.output_ids) for c in chunks] == [1, 2, 3, 4]
    assert [c.finish_reason for c in chunks] == [None, None, None, "length"]
    assert list(chunks[-1].output_ids) == expected_tokens([7], 4) and len(chunks[-1].output_logprobs) == 4
    assert list(achunks[-1].output_ids) == expected_tokens([7], 4)


# ------------------------------------------------------------------ errors and retries

def test_errors_name_route_and_status(fake):
    srv, url = fake
    with HTTPEngine(url, retries=2, backoff_s=0.01) as eng:
        srv.fail["/generate"] = [503]
        with pytest.raises(EngineHTTPError, match=r"/generate: status 503: injected 503") as ei:
            eng.generate([GenerateRequest(input_ids=[1], sampling=greedy(1))])
        assert ei.value.route == "/generate" and ei.value.status == 503
        assert srv.routes().count("/generate") == 1  # not idempotent: never retried

        srv.fail["/flush_cache"] = [503, 502]
        eng.flush_cache()  # idempotent: retried through two failures
        assert srv.routes().count("/flush_cache") == 3

        with pytest.raises(EngineHTTPError, match="/update_weights_from_tensor: status 400: no open weight update"):
            eng.update_weights([("w", torch.ones(2))])  # outside a begin/end session
        with pytest.raises(EngineHTTPError, match="/resume_memory_occupation: status 400"):
            eng.resume_memory(["weights"])
    dead = HTTPEngine(f"http://127.0.0.1:{free_port()}", retries=1, backoff_s=0.01)
    assert not dead.health()
    with pytest.raises(EngineHTTPError, match="cannot connect") as ei:
        dead.flush_cache()
    assert ei.value.status is None
    with pytest.raises(ProtocolError, match="base_url"):
        HTTPEngine("127.0.0.1:30000")


# ------------------------------------------------------------------ partial rollout

def test_pause_abort_returns_resumable_trajectories():
    srv = FakeSGLangServer(decode_delay=0.01)
    with serve(srv.app) as url, HTTPEngine(url) as eng:
        reqs = [GenerateRequest(rid=f"p{i}", input_ids=[100 * (i + 1)], sampling=greedy(500), return_logprob=True)
                for i in range(2)]
        results: list = []
        worker = threading.Thread(target=lambda: results.extend(eng.generate(reqs)))
        worker.start()
        deadline = time.monotonic() + 20
        while not (len(srv.progress) == 2 and min(srv.progress.values()) >= 3):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        paused = eng.pause("abort")
        worker.join(timeout=20)
        eng.continue_generation()
        assert eng.pause("retract") == []  # retracted requests stay queued on the server
    assert srv.log[-2] == ("/continue_generation", {}) and srv.log[-1] == ("/pause_generation", {"mode": "retract"})
    assert sorted(p.rid for p in paused) == ["p0", "p1"]
    assert [o.finish_reason for o in results] == ["abort", "abort"]
    for p in paused:
        prompt = list(p.input_ids)
        k = len(p.output_ids)
        assert 3 <= k < 500 and list(p.output_ids) == expected_tokens(prompt, k)
        assert len(p.output_logprobs) == k
        nxt = p.resume_request()
        assert list(nxt.input_ids) == prompt + list(p.output_ids) and nxt.sampling.max_new_tokens == 500 - k


def test_pause_takes_server_listed_requests():
    srv = FakeSGLangServer(list_paused=True)
    with serve(srv.app) as url, HTTPEngine(url) as eng:
        (p,) = eng.pause("abort")
        assert eng.pause("retract") == []  # only abort mode hands trajectories back
    assert p.rid == "q" and p.weight_version == "2" and list(p.resume_request().input_ids) == [5, 6]
    assert p.resume_request().sampling.max_new_tokens == 2


def test_abort_payload(fake):
    srv, url = fake
    with HTTPEngine(url) as eng:
        eng.abort("r7")
        eng.abort()
    assert srv.log == [("/abort_request", {"rid": "r7", "abort_all": False}),
                       ("/abort_request", {"rid": "", "abort_all": True})]


# ------------------------------------------------------------------ weights: colocated order and payloads

def test_colocated_update_route_order_and_payloads(fake):
    srv, url = fake
    w = {"model.layers.0.mlp.gate_proj.weight": torch.randn(4, 3).to(torch.bfloat16),
         "model.norm.weight": torch.randn(3), "lm_head.weight": torch.randn(5, 3)}
    trained = []
    with SGLangEngine(url, tp_size=2) as eng:
        assert eng.check_version() == "0.5.23"
        buckets = [FlattenedBucket.pack(list(w.items())[:2]), [("lm_head.weight", w["lm_head.weight"])]]
        paused, version = eng.colocated_update(lambda: buckets, train_step=lambda: trained.append(srv.routes()[-1]))
        assert version == "1" and eng.weight_version == "1" and paused == []
        _, version2 = eng.colocated_update([[("lm_head.weight", w["lm_head.weight"] * 2)]])
        (out,) = eng.generate([GenerateRequest(input_ids=[1], sampling=greedy(1))])
    assert version2 == "2" and out.weight_version == "2"
    assert trained == ["/release_memory_occupation"]  # training ran with the engine's memory released
    one_cycle = srv.log[:10]
    assert [r for r, _ in one_cycle] == [
        "/pause_generation", "/release_memory_occupation", "/resume_memory_occupation", "/begin_weight_update",
        "/update_weights_from_tensor", "/update_weights_from_tensor", "/end_weight_update",
        "/resume_memory_occupation", "/flush_cache", "/continue_generation"]
    bodies = [b for _, b in one_cycle]
    assert bodies[0] == {"mode": "abort"}
    assert bodies[1] == {"tags": ["kv_cache", "weights", "cuda_graph"]}
    assert bodies[2] == {"tags": ["weights"]} and bodies[3] == {} and bodies[6] == {}
    assert bodies[7] == {"tags": ["kv_cache", "cuda_graph"]} and bodies[9] == {}
    for upd in (bodies[4], bodies[5]):
        assert upd["weight_version"] == "1" and upd["flush_cache"] is False and upd["abort_all_requests"] is False
        assert len(upd["serialized_named_tensors"]) == 2  # one per TP rank
    for name, t in w.items():
        want = t * 2 if name == "lm_head.weight" else t
        assert srv.weights[name].dtype == want.dtype and torch.equal(srv.weights[name], want)


def test_native_format_buckets_bitwise():
    srv = FakeSGLangServer(weight_format="k2sys")
    w = [("a", torch.randn(3, 5).to(torch.bfloat16)), ("b", torch.randint(0, 9, (4,))), ("c", torch.randn(2).half())]
    with serve(srv.app) as url, HTTPEngine(url) as eng:
        eng.begin_weight_update()
        eng.update_weights([FlattenedBucket.pack(w[:2]), FlattenedBucket.pack(w[2:])], weight_version="v9")
        eng.update_weights([("d", torch.ones(1))])
        assert eng.end_weight_update() == "v9"
    fmts = [b["load_format"] for r, b in srv.log if r == "/update_weights_from_tensor"]
    assert fmts == ["flattened_bucket", "flattened_bucket", None]
    for name, t in w:
        assert srv.weights[name].dtype == t.dtype and torch.equal(srv.weights[name].view(torch.uint8),
                                                                   t.view(torch.uint8))


def test_sglang_serializer_payload_decodes_with_sglang():
    from sglang.srt.utils import MultiprocessingSerializer

    eng = SGLangEngine("http://127.0.0.1:1")
    named = [("x", torch.arange(6, dtype=torch.float32).view(2, 3)), ("y", torch.ones(3, dtype=torch.bfloat16))]
    back = MultiprocessingSerializer.deserialize(eng.encode_named_tensors(named))  # sglang's SafeUnpickler
    assert [n for n, _ in back] == ["x", "y"] and all(torch.equal(b, t) for (_, b), (_, t) in zip(back, named))
    (fmt, data), = eng.encode_bucket(FlattenedBucket.pack(named))
    body = {"serialized_named_tensors": [data], "load_format": fmt, "flush_cache": False,
            "abort_all_requests": False, "weight_version": None}
    got = sglang_ref.load_tensor_update(body, 0)
    assert fmt == "flattened_bucket" and [n for n, _ in got] == ["x", "y"]
    assert all(b.dtype == t.dtype and torch.equal(b, t) for (_, b), (_, t) in zip(got, named))


def test_distributed_update_payloads():
    p = UpdateWeightsFromDistributedPayload(names=["a", "b"], dtypes=["bfloat16", "float32"], shapes=[[2, 3], [4]],
                                            flush_cache=False, weight_version="5")
    assert p.to_sglang() == {"names": ["a", "b"], "dtypes": ["bfloat16", "float32"], "shapes": [[2, 3], [4]],
                             "group_name": "weight_update_group", "flush_cache": False, "abort_all_requests": False,
                             "weight_version": "5", "load_format": None}
    with pytest.raises(ProtocolError, match="dtypes/shapes"):
        UpdateWeightsFromDistributedPayload(names=["a"], dtypes=[], shapes=[[1]])
    g = InitWeightsUpdateGroupPayload(master_address="10.0.0.1", master_port=29600, rank_offset=1, world_size=9)
    assert g.to_sglang() == {"master_address": "10.0.0.1", "master_port": 29600, "rank_offset": 1, "world_size": 9,
                             "group_name": "weight_update_group", "backend": "nccl"}
    with pytest.raises(ProtocolError, match="rank_offset"):
        InitWeightsUpdateGroupPayload(master_address="h", master_port=1, rank_offset=0, world_size=2)


# ------------------------------------------------------------------ launch.py

def test_launch_commands():
    cfg = SGLangLaunchConfig(model_path="/ckpt/k2", tp_size=8, port=31000, mem_fraction_static=0.6,
                             extra_args=("--log-level", "warning"), python="python")
    assert cfg.command() == ["python", "-m", "sglang.launch_server", "--model-path", "/ckpt/k2", "--tp-size", "8",
                             "--host", "127.0.0.1", "--port", "31000", "--mem-fraction-static", "0.6",
                             "--enable-memory-saver", "--log-level", "warning"]
    assert cfg.base_url == "http://127.0.0.1:31000"
    native = NativeLaunchConfig(model_path="/ckpt/tiny", port=30001, python="python")
    assert native.command() == ["python", "-m", "k2sys.cli", "serve", "--model", "/ckpt/tiny", "--host",
                                "127.0.0.1", "--port", "30001"]
    for kw, field in (({"mem_fraction_static": 1.5}, "mem_fraction_static"), ({"tp_size": 0}, "tp_size"),
                      ({"port": 70000}, "port"), ({"model_path": ""}, "model_path")):
        with pytest.raises(LaunchError, match=field):
            SGLangLaunchConfig(**{"model_path": "/m", **kw})


_HEALTH_SCRIPT = textwrap.dedent("""
    import http.server, os, signal, subprocess, sys, time
    if "ignore-term" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    open(sys.argv[2], "w").write(str(child.pid))
    time.sleep(0.3)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404); self.end_headers()
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("ignore_term", [False, True])
def test_server_process_health_and_clean_stop(tmp_path, ignore_term):
    script = tmp_path / "srv.py"
    script.write_text(_HEALTH_SCRIPT)
    port, pidfile = free_port(), tmp_path / "child.pid"
    cmd = [sys.executable, str(script), str(port), str(pidfile)] + (["ignore-term"] if ignore_term else [])
    srv = ServerProcess(command=cmd, base_url=f"http://127.0.0.1:{port}", log_path=tmp_path / "log.txt")
    with srv.start().wait_healthy(timeout=30):
        assert srv.running and HTTPEngine(srv.base_url).health()
        child = int(pidfile.read_text())
        t0 = time.monotonic()
        code = srv.stop(grace_s=1.0)
    assert code == (-9 if ignore_term else -15) and time.monotonic() - t0 < 10
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)  # the server's worker went down with it (no orphan)


def test_launch_failures_report_log(tmp_path):
    crash = tmp_path / "crash.py"
    crash.write_text("import sys; print('boom: no checkpoint at /nope', flush=True); sys.exit(3)")
    srv = ServerProcess(command=[sys.executable, str(crash)], base_url=f"http://127.0.0.1:{free_port()}",
                        log_path=tmp_path / "crash.log")
    with pytest.raises(LaunchError, match=r"(?s)code 3.*boom: no checkpoint"):
        srv.start().wait_healthy(timeout=30)
    silent = ServerProcess(command=[sys.executable, "-c", "import time; time.sleep(60)"],
                           base_url=f"http://127.0.0.1:{free_port()}", log_path=tmp_path / "silent.log")
    with pytest.raises(LaunchError, match="not 200 within"):
        silent.start().wait_healthy(timeout=1.0, poll_s=0.1)
    assert not silent.running


# ------------------------------------------------------------------ real servers

def test_contract_native_engine_in_process():
    """The same protocol calls in-process: a colocated update with another checkpoint's HF state
    dict must make the engine generate exactly what an engine built from that checkpoint does."""
    native = pytest.importorskip("k2sys.engine.core.engine")
    from k2sys.engine.api.protocol import InferenceEngine
    from k2sys.models import build_model, k2_tiny

    m0, m1 = build_model(k2_tiny(vocab_size=512), seed=0), build_model(k2_tiny(vocab_size=512), seed=1)
    req = GenerateRequest(rid="n", input_ids=[1, 2, 3], sampling=greedy(6), return_logprob=True)
    with native.NativeEngine.from_model(m0) as eng, native.NativeEngine.from_model(m1) as ref:
        assert isinstance(eng, InferenceEngine)
        before = eng.generate([req])[0]
        _, version = colocated_update(eng, [FlattenedBucket.pack(list(m1.state_dict().items()))])
        got, want = eng.generate([req])[0], ref.generate([req])[0]
    assert got.finish_reason == "length", f"engine did not generate after the update: {got}"
    assert got.output_ids == want.output_ids != before.output_ids and got.weight_version == version
    assert got.output_logprobs == pytest.approx(want.output_logprobs, abs=1e-5)


def test_contract_against_k2sys_serve(tmp_path):
    from k2sys.models import build_model, k2_tiny, save_hf

    model_dir = save_hf(build_model(k2_tiny(vocab_size=512), seed=0), tmp_path / "tiny")
    cfg = NativeLaunchConfig(model_path=str(model_dir), port=free_port(), module=("k2sys.cli", "serve"))
    with launch_server(cfg, log_path=tmp_path / "serve.log", timeout=180) as srv, HTTPEngine(srv.base_url) as eng:
        assert eng.health()
        reqs = [GenerateRequest(rid=f"c{i}", input_ids=[1, 2, 3 + i], sampling=greedy(6), return_logprob=True)
                for i in range(3)]
        outs = eng.generate(reqs)
        assert [o.rid for o in outs] == ["c0", "c1", "c2"]
        for o in outs:  # a random model may emit EOS early: then it stops on it
            assert (o.finish_reason, len(o.output_ids)) == ("length", 6) or (
                o.finish_reason == "stop" and 1 <= len(o.output_ids) <= 6 and o.output_ids[-1] == o.matched_stop)
            assert len(o.output_logprobs) == len(o.output_ids) and all(lp <= 0 for lp in o.output_logprobs)
        assert eng.generate(reqs[:1])[0].output_ids == outs[0].output_ids  # greedy is deterministic
        streamed = list(eng.stream_generate(GenerateRequest(input_ids=[1, 2, 3], sampling=greedy(6))))
        assert streamed[-1].output_ids == outs[0].output_ids
        with pytest.raises(EngineHTTPError, match="/update_weights_from_(tensor|shm): status 4"):
            eng.update_weights([("model.norm.weight", torch.ones(1))])  # outside a session
        # load a differently seeded model through the colocated path: outputs must follow the new weights
        other = build_model(k2_tiny(vocab_size=512), seed=1)
        _, version = colocated_update(eng, [FlattenedBucket.pack(list(other.state_dict().items()))])
        after = eng.generate(reqs[:1])[0]
        assert after.weight_version == version == eng.weight_version
        ref_dir = save_hf(other, tmp_path / "tiny1")
        cfg1 = NativeLaunchConfig(model_path=str(ref_dir), port=free_port(), module=cfg.module)
        with launch_server(cfg1, log_path=tmp_path / "serve1.log", timeout=180) as srv1, \
                HTTPEngine(srv1.base_url) as eng1:
            assert eng1.generate(reqs[:1])[0].output_ids == after.output_ids


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and sglang_available() and os.environ.get("K2SYS_SGLANG_MODEL")),
                    reason="needs a GPU, sglang>=0.5.23 and K2SYS_SGLANG_MODEL (a small HF checkpoint)")
def test_real_sglang_colocated_update(tmp_path):
    from safetensors.torch import load_file

    model = os.environ["K2SYS_SGLANG_MODEL"]
    cfg = SGLangLaunchConfig(model_path=model, port=free_port(), mem_fraction_static=0.5)
    with launch_server(cfg, log_path=tmp_path / "sglang.log", timeout=900) as srv, SGLangEngine(srv.base_url) as eng:
        eng.check_version()
        req = GenerateRequest(input_ids=[1, 2, 3], sampling=greedy(8), return_logprob=True)
        (before,) = eng.generate([req])
        shard = sorted(p for p in os.listdir(model) if p.endswith(".safetensors"))[0]
        state = load_file(os.path.join(model, shard), device="cuda")
        name = next(n for n in state if n.endswith("norm.weight"))
        new = torch.zeros_like(state[name])
        _, version = eng.colocated_update([FlattenedBucket.pack([(name, new)])])
        got = eng.get_weights_by_name(name, truncate_size=4)
        assert torch.allclose(torch.tensor(got, dtype=torch.float32).flatten()[:4], torch.zeros(4))
        (after,) = eng.generate([req])
        assert after.weight_version == version and before.output_ids != after.output_ids
