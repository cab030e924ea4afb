"""The SGLang sinks' payloads, read by SGLang's own code (sglang 0.5.23: tests/sglang_ref.py).

Every body our SGLangTensorSink posts is parsed with sglang's request class and decoded on every
engine TP rank with sglang's serializer and flattened-bucket loader, and must give back the
trainer's tensors bit for bit (TP=1 and TP=2 engines, a TP=2 trainer on 2 gloo ranks). The NCCL
sink's buckets are received by sglang's own FlattenedTensorBucket receive on a gloo group. Route
names, methods and fields are checked against sglang's HTTP server, and the launch command
against sglang's own argument parser.
"""

from __future__ import annotations

import datetime
import io
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow  # file total > 30 s on a 2-core CPU: scheduled first (conftest)

sglang_ref = pytest.importorskip("sglang_ref")
try:  # before sglang is imported: children spawned by these tests inherit sglang_ref's sys.path
    sglang_ref.prepare()
except ImportError as e:
    pytest.skip(str(e), allow_module_level=True)
pytest.importorskip("sglang")

from ckpt_fixtures import TINY, free_port, materialize, megatron_like_layout, random_hf_state  # noqa: E402
from k2sys.ckpt import Layout, TensorSpec, TrainerShards, UpdateConfig, UpdateError, update_weights  # noqa: E402
from k2sys.ckpt.engine_sinks import SGLangDistributedSink, SGLangTensorSink  # noqa: E402
from k2sys.engine.api.protocol import GenerateRequest, SamplingParams, abort_payload, memory_payload, \
    pause_payload  # noqa: E402
from k2sys.engine.api.sglang_adapter import (InitWeightsUpdateGroupPayload, SGLangEngine,  # noqa: E402
                                        UpdateWeightsFromDistributedPayload)


class RecordingSGLang(SGLangEngine):
    """Test double of the HTTP hop to an SGLang server: records (route, body) of every call and
    answers as sglang does (success, and the weight_version of the last update in /model_info)."""

    def __init__(self, tp: int, fail_on: int | None = None, lie_version: bool = False):
        super().__init__("http://127.0.0.1:1", tp_size=tp)
        self.calls: list[tuple[str, str, dict | None]] = []
        self.served: str | None = None
        self.fail_on, self.lie_version = fail_on, lie_version

    def _post(self, key, payload=None, **kw):
        self.calls.append(("POST", self._url(key), payload))
        if key == "update_tensor":
            if self.fail_on is not None and sum(r == "/update_weights_from_tensor" for _, r, _ in self.calls) == \
                    self.fail_on:
                from k2sys.engine.api.client import EngineHTTPError

                raise EngineHTTPError("/update_weights_from_tensor", 400, "injected failure")
            self.served = payload["weight_version"]
        return {"success": True, "message": "ok"}

    def _call(self, method, key, payload=None, **kw):
        self.calls.append((method, self._url(key), payload))
        if key == "model_info":
            return {"weight_version": "bogus" if self.lie_version else self.served}
        return {"success": True}


def mixed_dtype_source(tp: int, rank: int):
    """A Megatron-like trainer layout (fused fc1, TP shards) whose routers are float32, the rest bf16:
    buckets then mix dtypes, as a real push does."""
    lay = megatron_like_layout(TINY, tp, rank)
    tensors = {n: TensorSpec(n, s.shape, torch.float32 if n.endswith("mlp.gate.weight") else s.dtype)
               for n, s in lay.tensors.items()}
    return Layout(tensors, lay.pieces, lay.name + " mixed")


def global_state(seed: int) -> dict[str, torch.Tensor]:
    g = random_hf_state(TINY, seed=seed)
    return {n: t.float() if n.endswith("mlp.gate.weight") else t for n, t in g.items()}


def decoded(calls, tp: int) -> tuple[list[dict], dict[int, dict[str, torch.Tensor]]]:
    """The update bodies and, per engine TP rank, every tensor sglang loaded from them."""
    bodies = [b for m, r, b in calls if r == "/update_weights_from_tensor"]
    per_rank: dict[int, dict[str, torch.Tensor]] = {r: {} for r in range(tp)}
    for body in bodies:
        for r in range(tp):
            for n, t in sglang_ref.load_tensor_update(body, r):
                assert n not in per_rank[r], f"{n} sent twice"
                per_rank[r][n] = t
    return bodies, per_rank


def bitwise(got: dict, want: dict) -> bool:
    return set(got) == set(want) and all(
        got[n].dtype == want[n].dtype and got[n].shape == want[n].shape and
        torch.equal(got[n].reshape(-1).view(torch.uint8), want[n].reshape(-1).view(torch.uint8)) for n in want)


@pytest.mark.parametrize("tp", [1, 2])
def test_tensor_sink_payloads_decode_with_sglang_bitwise(tp):
    g = global_state(3)
    src = mixed_dtype_source(1, 0)
    client = RecordingSGLang(tp)
    sink = SGLangTensorSink(client, bucket_bytes=4096)
    sink.next_version = "7"
    rep = update_weights(TrainerShards(src, materialize(src, g)), sink, config=UpdateConfig(bucket_bytes=4096))
    routes = [r for _, r, _ in client.calls]
    n = len(sink.out_buckets)
    assert n > 3 and routes == ["/begin_weight_update"] + ["/update_weights_from_tensor"] * n + \
        ["/end_weight_update", "/model_info"]
    assert rep.version == sink.version_checked == client.weight_version == "7"
    cls = sglang_ref.io_struct().UpdateWeightsFromTensorReqInput
    bodies, per_rank = decoded(client.calls, tp)
    dtypes_in_buckets = set()
    for body in bodies:
        assert not sglang_ref.unknown_fields(cls, body)
        req = sglang_ref.parse(cls, body)
        assert len(req.serialized_named_tensors) == tp and req.load_format == "flattened_bucket"
        assert req.weight_version == "7" and req.flush_cache is False and req.abort_all_requests is False
    for n, t in per_rank[0].items():
        dtypes_in_buckets.add(t.dtype)
    assert dtypes_in_buckets == {torch.bfloat16, torch.float32}
    for r in range(tp):  # every engine TP rank loads every whole HF tensor, bit for bit
        assert bitwise(per_rank[r], g), f"tp rank {r}"


def test_version_mismatch_and_abort():
    g = global_state(4)
    src = mixed_dtype_source(1, 0)
    shards = TrainerShards(src, materialize(src, g))
    liar = RecordingSGLang(1, lie_version=True)
    with pytest.raises(UpdateError, match="reports weight version 'bogus'"):
        update_weights(shards, SGLangTensorSink(liar, bucket_bytes=4096), config=UpdateConfig(bucket_bytes=4096))
    flaky = RecordingSGLang(1, fail_on=2)
    with pytest.raises(Exception, match="injected failure"):
        update_weights(shards, SGLangTensorSink(flaky, bucket_bytes=4096), config=UpdateConfig(bucket_bytes=4096))
    # sglang has no abort: the session is closed and the client knows the weights are mixed
    assert [r for _, r, _ in flaky.calls][-1] == "/end_weight_update" and flaky.weights_stale
    assert flaky.weight_version is None


def _tp2_trainer(rank: int, port: int, out_dir: str) -> None:
    res = {}
    try:
        sglang_ref.prepare()  # spawned with the parent's sys.path (it holds sglang_ref's torchvision)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=60))
        g = global_state(5)
        src = mixed_dtype_source(2, rank)
        client = RecordingSGLang(2) if rank == 0 else None
        sink = SGLangTensorSink(client, bucket_bytes=3000) if rank == 0 else None
        rep = update_weights(TrainerShards(src, materialize(src, g)), sink, config=UpdateConfig(bucket_bytes=4096))
        if rank == 0:
            res["calls"] = [(m, r, b) for m, r, b in client.calls]
            res["version"] = rep.version
        dist.destroy_process_group()
    except Exception:
        res["error"] = traceback.format_exc()
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


def test_tp2_trainer_on_two_ranks_feeds_a_tp2_engine(tmp_path):
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_tp2_trainer, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    out = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, res in enumerate(out):
        assert "error" not in res, f"rank {r}: {res['error']}"
    _, per_rank = decoded(out[0]["calls"], 2)
    g = global_state(5)
    assert out[0]["version"] == "1" and bitwise(per_rank[0], g) and bitwise(per_rank[1], g)


class DistributedRecorder(SGLangEngine):
    """Test double of the HTTP hop of the NCCL path: hands each body to the engine-rank processes
    (which run sglang's own receive) through queues, like sglang's scheduler would get it."""

    def __init__(self, queues):
        super().__init__("http://127.0.0.1:1", tp_size=2)
        self.queues, self.calls, self.served = queues, [], None

    def _post(self, key, payload=None, **kw):
        self.calls.append((self._url(key), payload))
        if key in ("init_group", "update_dist"):
            for q in self.queues:
                q.put((key, payload))
        if key == "update_dist":
            self.served = payload["weight_version"]
        return {"success": True, "message": "ok"}

    def _call(self, method, key, payload=None, **kw):
        return {"weight_version": self.served}


def _engine_rank(tp_rank: int, q, done) -> None:
    """One SGLang TP rank: joins the update group as sglang does and receives every bucket with
    sglang's own receive; reports the tensors it got."""
    try:
        import sglang_ref as ref
        from sglang.srt.utils.common import init_custom_process_group

        ref.prepare()
        key, init = q.get(timeout=120)
        assert key == "init_group"
        cls = ref.io_struct().InitWeightsUpdateGroupReqInput
        assert not ref.unknown_fields(cls, init)
        req = ref.parse(cls, init)
        group = init_custom_process_group(backend=req.backend, init_method=f"tcp://{req.master_address}:"
                                          f"{req.master_port}", world_size=req.world_size,
                                          rank=req.rank_offset + tp_rank, group_name=req.group_name,
                                          timeout=datetime.timedelta(seconds=120))
        got, bodies = {}, 0
        while True:
            key, body = q.get(timeout=120)
            if key == "stop":
                break
            cls = ref.io_struct().UpdateWeightsFromDistributedReqInput
            assert not ref.unknown_fields(cls, body)
            got.update(ref.receive_distributed(body, group))
            bodies += 1
        buf = io.BytesIO()
        torch.save(got, buf)  # bytes: tensors through a queue would hand over shared memory the child frees
        done.put((tp_rank, buf.getvalue(), bodies))
    except Exception:
        done.put((tp_rank, traceback.format_exc(), 0))


def test_distributed_sink_buckets_received_by_sglang(tmp_path):
    ctx = mp.get_context("spawn")
    queues, done = [ctx.Queue() for _ in range(2)], ctx.Queue()
    procs = [ctx.Process(target=_engine_rank, args=(r, queues[r], done)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        g = global_state(6)
        src = mixed_dtype_source(1, 0)
        client = DistributedRecorder(queues)
        sink = SGLangDistributedSink(client, master_address="127.0.0.1", master_port=free_port(), world_size=3,
                                     backend="gloo", bucket_bytes=5000, timeout_s=120)
        rep = update_weights(TrainerShards(src, materialize(src, g)), sink, config=UpdateConfig(bucket_bytes=4096))
        for q in queues:
            q.put(("stop", None))
        results = sorted(done.get(timeout=180) for _ in range(2))
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    routes = [r for r, _ in client.calls]
    n = len(sink.out_buckets)
    assert routes == ["/init_weights_update_group", "/begin_weight_update"] + \
        ["/update_weights_from_distributed"] * n + ["/end_weight_update"]
    assert rep.version == "1" and n > 3
    for tp_rank, got, bodies in results:
        assert isinstance(got, bytes), got
        got = torch.load(io.BytesIO(got))
        assert bodies == n and bitwise(got, g), f"engine tp rank {tp_rank}"


def test_routes_and_fields_match_sglang_http_server():
    routes = sglang_ref.routes()
    io = sglang_ref.io_struct()
    eng = SGLangEngine("http://127.0.0.1:1")
    gets = {"health", "server_info", "model_info"}
    for key, path in eng.ROUTES.items():
        assert path in routes, f"{key}: sglang has no route {path}"
        methods, _ = routes[path]
        assert ("GET" if key in gets else "POST") in methods, (path, methods)
    req = GenerateRequest(rid="r1", input_ids=[1, 2], return_logprob=True,
                          sampling=SamplingParams(temperature=0.7, max_new_tokens=3, stop_token_ids=(5,), sampling_seed=3))
    bodies = {
        "/generate": req.to_sglang(), "/pause_generation": pause_payload("retract"), "/continue_generation": {},
        "/release_memory_occupation": memory_payload(None), "/resume_memory_occupation": memory_payload(["weights"]),
        "/abort_request": abort_payload("r1"), "/begin_weight_update": {}, "/end_weight_update": {},
        "/get_weights_by_name": {"name": "model.norm.weight", "truncate_size": 4},
        "/init_weights_update_group": InitWeightsUpdateGroupPayload(
            master_address="10.0.0.1", master_port=29600, rank_offset=1, world_size=9).to_sglang(),
        "/update_weights_from_distributed": UpdateWeightsFromDistributedPayload(
            names=["a"], dtypes=["bfloat16"], shapes=[[2, 3]], weight_version="2",
            load_format="flattened_bucket").to_sglang(),
    }
    for path, body in bodies.items():
        _, cls = routes[path]
        assert cls is not None and not sglang_ref.unknown_fields(cls, body), (path, sglang_ref.unknown_fields(cls, body))
        obj = sglang_ref.parse(cls, body)
        for k, v in body.items():
            if k == "sampling_params":
                assert obj.sampling_params == v
            elif k != "tags":
                assert getattr(obj, k) == v, (path, k)
    assert sglang_ref.parse(io.ReleaseMemoryOccupationReqInput, memory_payload(None)).tags == \
        ["kv_cache", "weights", "cuda_graph"]
    assert routes["/flush_cache"][0] >= {"POST"}


def test_launch_command_parsed_by_sglang(tmp_path):
    import argparse

    from k2sys.coordinator.engine_handle import EngineHandle
    from k2sys.coordinator.sections import EngineSection

    sglang_ref.prepare()
    from sglang.srt.server_args import ServerArgs

    sec = EngineSection(kind="sglang", tp=4, ep=2, dp=2, mem_fraction_static=0.55, port=31234)
    sec.validate()
    cmd = EngineHandle(sec, tmp_path).launch_config(tmp_path / "ckpt", torch.bfloat16).command()
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(cmd[3:])
    assert (ns.model_path, ns.tp_size, ns.ep_size, ns.dp_size) == (str(tmp_path / "ckpt"), 4, 2, 2)
    assert (ns.mem_fraction_static, ns.enable_memory_saver, ns.dtype, ns.port) == (0.55, True, "bfloat16", 31234)
    assert ns.max_running_requests == sec.max_running_requests


def _ipc_engine_rank(tp: int, inbox, outbox) -> None:
    """A process standing in for sglang's TP ranks: decodes each body (CUDA IPC handles) with
    sglang's own code while the sender waits, as sglang answers only after loading."""
    import sglang_ref as ref

    ref.prepare()
    while (body := inbox.get()) is not None:
        try:
            got = {r: {n: t.cpu() for n, t in ref.load_tensor_update(body, r)} for r in range(tp)}
            buf = io.BytesIO()
            torch.save(got, buf)
            outbox.put(buf.getvalue())
        except Exception:
            outbox.put(traceback.format_exc())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC payloads need a GPU")
def test_cuda_ipc_payloads_decode_in_another_process():  # pragma: no cover - GPU only
    tp = 2
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_ipc_engine_rank, args=(tp, inbox, outbox))
    proc.start()
    per_rank: dict[int, dict] = {r: {} for r in range(tp)}

    class IPCRecorder(RecordingSGLang):
        def _post(self, key, payload=None, **kw):
            out = super()._post(key, payload, **kw)
            if key == "update_tensor":
                inbox.put(payload)
                got = outbox.get(timeout=300)
                assert isinstance(got, bytes), got
                for r, named in torch.load(io.BytesIO(got)).items():
                    per_rank[r].update(named)
            return out
    try:
        g = global_state(7)
        src = mixed_dtype_source(1, 0)
        sink = SGLangTensorSink(IPCRecorder(tp), bucket_bytes=1 << 16, device="cuda")
        rep = update_weights(TrainerShards(src, materialize(src, g)), sink, config=UpdateConfig(bucket_bytes=1 << 16))
    finally:
        inbox.put(None)
        proc.join(60)
    assert rep.version == "1" and all(bitwise(per_rank[r], g) for r in range(tp))
