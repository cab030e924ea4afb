"""A stand-in for `python -m sglang.launch_server`, for tests only (CPU machines cannot run SGLang).

    python -m fake_sglang_server <sglang's launch arguments>     (PYTHONPATH=tests)

It takes the arguments our launcher gives sglang and parses them with sglang's own ServerArgs
parser (an argument sglang does not know fails here too), generates with the native engine on the
checkpoint, and answers SGLang's routes the way sglang 0.5.23 does for the parts the recipe uses.
Every control and weight body is parsed with sglang's request class (tests/sglang_ref.py); weight
payloads are decoded on every TP rank with sglang's serializer and flattened-bucket loader (the
ranks must agree) or received over the NCCL-path group with sglang's own receive (gloo), then
loaded into the native engine. Sessions follow sglang's rules: updates only between begin and end,
release/resume only when idle. Each request is appended to $K2SYS_FAKE_SGLANG_LOG (JSON lines:
route, the fields that matter for ordering) so tests can check the cycle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response

import sglang_ref


def parse_args(argv: list[str]) -> argparse.Namespace:
    sglang_ref.prepare()
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="fake_sglang_server")
    ServerArgs.add_cli_args(parser)
    return parser.parse_args(argv)


def build(args: argparse.Namespace):
    from k2sys.engine.core.config import EngineConfig
    from k2sys.engine.core.engine import NativeEngine
    from k2sys.engine.api.server import build_app

    io = sglang_ref.io_struct()
    engine = NativeEngine.from_pretrained(args.model_path, EngineConfig(
        dtype=None if args.dtype in (None, "auto") else args.dtype, max_running_requests=args.max_running_requests or 256,
        max_total_tokens=16384))
    app = build_app(engine, args.model_path)  # generation, abort, flush_cache, continue: the native engine
    log_path = os.environ.get("K2SYS_FAKE_SGLANG_LOG")
    state: dict[str, Any] = {"session": False, "group": None, "version": None}
    lock = threading.Lock()

    def record(route: str, **info: Any) -> None:
        if log_path:
            with lock, open(log_path, "a") as f:
                f.write(json.dumps({"route": route, **info}) + "\n")

    async def body_of(request: Request, cls: Any) -> tuple[dict, Any]:
        raw = await request.body()
        body = json.loads(raw) if raw else {}
        unknown = sglang_ref.unknown_fields(cls, body)
        if unknown:  # sglang drops them silently: a field we send that it ignores is a bug of ours
            raise ValueError(f"{cls.__name__}: fields sglang does not have: {sorted(unknown)}")
        return body, sglang_ref.parse(cls, body)

    def fail(msg: str) -> JSONResponse:
        return JSONResponse({"success": False, "message": msg}, status_code=400)

    routes = []

    def route(path: str, methods: tuple[str, ...] = ("POST",)):
        def deco(fn):
            routes.append((path, methods, fn))
            return fn
        return deco

    @route("/server_info", ("GET",))
    async def server_info():
        mem = engine.memory_bytes()
        return {"version": "0.5.23", "tp_size": args.tp_size, "internal_states": [{"memory_usage": {
            "weight": mem["weights"] / 2**30, "kvcache": mem["kv_cache"] / 2**30}}]}

    @route("/model_info", ("GET",))
    async def model_info():
        return {"model_path": args.model_path, "weight_version": state["version"]}

    @route("/pause_generation")
    async def pause(request: Request):
        _, obj = await body_of(request, io.PauseGenerationReqInput)
        record("/pause_generation", mode=obj.mode)
        await asyncio.to_thread(engine.pause, obj.mode)
        return {"message": "Generation paused successfully.", "status": "ok"}

    @route("/continue_generation")
    async def cont(request: Request):
        await body_of(request, io.ContinueGenerationReqInput)
        record("/continue_generation")
        await asyncio.to_thread(engine.continue_generation)
        return {"message": "Generation continued successfully.", "status": "ok"}

    @route("/release_memory_occupation", ("GET", "POST"))
    async def release(request: Request):
        _, obj = await body_of(request, io.ReleaseMemoryOccupationReqInput)
        record("/release_memory_occupation", tags=obj.tags)
        await asyncio.to_thread(engine.release_memory, obj.tags)
        return Response(status_code=200)

    @route("/resume_memory_occupation", ("GET", "POST"))
    async def resume(request: Request):
        _, obj = await body_of(request, io.ResumeMemoryOccupationReqInput)
        record("/resume_memory_occupation", tags=obj.tags)
        await asyncio.to_thread(engine.resume_memory, obj.tags)
        return Response(status_code=200)

    @route("/begin_weight_update")
    async def begin(request: Request):
        await body_of(request, io.BeginWeightUpdateReqInput)
        record("/begin_weight_update")
        if state["session"]:
            return fail("a weight-update session is already open; call end_weight_update() first")
        await asyncio.to_thread(engine.begin_weight_update)
        state["session"] = True
        return {"success": True, "message": "Success"}

    @route("/update_weights_from_tensor")
    async def update_tensor(request: Request):
        body, obj = await body_of(request, io.UpdateWeightsFromTensorReqInput)
        record("/update_weights_from_tensor", entries=len(obj.serialized_named_tensors), version=obj.weight_version,
               load_format=obj.load_format, flush_cache=obj.flush_cache)
        if not state["session"]:
            return fail("update_weights_from_tensor must run between begin_weight_update() and end_weight_update()")
        if len(obj.serialized_named_tensors) != args.tp_size:
            return fail(f"{len(obj.serialized_named_tensors)} serialized entries for tp_size {args.tp_size}")
        ranks = [await asyncio.to_thread(sglang_ref.load_tensor_update, body, r) for r in range(args.tp_size)]
        for other in ranks[1:]:
            if [n for n, _ in other] != [n for n, _ in ranks[0]] or not all(
                    a.dtype == b.dtype and bool((a.view(-1).view(torch.uint8) == b.view(-1).view(torch.uint8)).all())
                    for (_, a), (_, b) in zip(other, ranks[0])):
                return fail("TP ranks decoded different tensors")
        await asyncio.to_thread(engine.update_weights, ranks[0])
        state["version"] = obj.weight_version or state["version"]
        return {"success": True, "message": "Success"}

    @route("/init_weights_update_group")
    async def init_group(request: Request):
        _, obj = await body_of(request, io.InitWeightsUpdateGroupReqInput)
        record("/init_weights_update_group", world_size=obj.world_size, backend=obj.backend)
        if args.tp_size * args.dp_size != obj.world_size - obj.rank_offset:
            return fail(f"world_size {obj.world_size} != rank_offset + engine GPUs")
        import datetime

        from sglang.srt.utils.common import init_custom_process_group

        def join():
            return init_custom_process_group(backend=obj.backend, init_method=f"tcp://{obj.master_address}:"
                                             f"{obj.master_port}", world_size=obj.world_size, rank=obj.rank_offset,
                                             group_name=obj.group_name, timeout=datetime.timedelta(seconds=300))
        state["group"] = await asyncio.to_thread(join)
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    @route("/update_weights_from_distributed")
    async def update_dist(request: Request):
        body, obj = await body_of(request, io.UpdateWeightsFromDistributedReqInput)
        record("/update_weights_from_distributed", version=obj.weight_version, n=len(obj.names))
        if not state["session"]:
            return fail("update_weights_from_distributed must run between begin_weight_update() and "
                        "end_weight_update()")
        got = await asyncio.to_thread(sglang_ref.receive_distributed, body, state["group"])
        await asyncio.to_thread(engine.update_weights, got)
        state["version"] = obj.weight_version or state["version"]
        return {"success": True, "message": "Succeeded to update parameter online."}

    @route("/end_weight_update")
    async def end(request: Request):
        await body_of(request, io.EndWeightUpdateReqInput)
        record("/end_weight_update")
        if not state["session"]:
            return fail("no weight-update session is open; call begin_weight_update() first")
        state["session"] = False
        try:
            await asyncio.to_thread(engine.end_weight_update)
        except Exception as e:  # noqa: BLE001 - reported as sglang does
            return fail(str(e))
        return {"success": True, "message": "Success"}

    @route("/flush_cache", ("GET", "POST"))
    async def flush():
        record("/flush_cache")
        try:
            await asyncio.to_thread(engine.flush_cache)
        except Exception as e:  # noqa: BLE001
            return Response(content=f"Cache not flushed: {e}\n", status_code=400)
        return Response(content="Cache flushed.\n", status_code=200)

    from fastapi.routing import APIRoute

    ours = [APIRoute(path, fn, methods=list(m)) for path, m, fn in routes]
    app.router.routes[:0] = ours  # before the native app's routes of the same paths
    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = parse_args(sys.argv[1:] if argv is None else argv)
    uvicorn.run(build(args), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
