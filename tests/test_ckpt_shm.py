"""Cross-process weight updates through shared memory: a real `k2sys serve` subprocess receives a
tiny model's new weights bitwise via /dev/shm (and via HTTP bodies for comparison); aborted
updates and killed writers leave no segment behind; the checkpoint engine's one call drives it."""

from __future__ import annotations

import dataclasses
import datetime
import os
import subprocess
import sys
import time

import httpx
import pytest
import torch
import torch.distributed as dist

from ckpt_fixtures import free_port
from k2sys.ckpt import TrainerShards, UpdateConfig, hf_layout, update_weights
from k2sys.engine.api.client import EngineHTTPError, HTTPEngine
from k2sys.engine.api.protocol import ProtocolError
from k2sys.engine.transport.shm import NAME_RE, SHM_DIR, ShmSegment, ShmUpdatePayload, reap_stale_segments
from k2sys.models import build_model, k2_tiny, param_shapes, save_hf


def my_segments(pid: int | None = None) -> list[str]:
    pid = os.getpid() if pid is None else pid
    return sorted(n for n in os.listdir(SHM_DIR) if (m := NAME_RE.match(n)) and int(m.group(1)) == pid)


@pytest.fixture(scope="module")
def cfg():
    return dataclasses.replace(k2_tiny(vocab_size=256), eos_token_id=None)


@pytest.fixture(scope="module")
def served(cfg, tmp_path_factory):
    root = tmp_path_factory.mktemp("shm")
    path = save_hf(build_model(cfg, seed=1), root / "model")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "k2sys.engine.api.server", "--model", str(path), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stdout.read().decode()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def new_weights(cfg, seed: int) -> dict[str, torch.Tensor]:
    names = param_shapes(cfg)
    return {n: t for n, t in build_model(cfg, seed=seed).state_dict().items() if n in names}


def server_weights(client: HTTPEngine, names) -> dict[str, list[float]]:
    return {n: client.get_weights_by_name(n, truncate_size=1 << 30) for n in names}


def assert_served_equal(client: HTTPEngine, expect: dict[str, torch.Tensor]) -> None:
    got = server_weights(client, expect)
    for n, t in expect.items():  # float32 -> JSON double -> float32 is exact
        assert torch.equal(torch.tensor(got[n], dtype=t.dtype).view(t.shape), t), n


def test_capability_and_auto_transport(served):
    with HTTPEngine(served) as c, HTTPEngine(served.replace("127.0.0.1", "127.0.0.2")) as remote:
        assert "shm" in c.server_transports()
        assert c.resolve_transport(None, [("x", torch.zeros(1))]) == "shm"
        assert c.resolve_transport("http") == "http"
        assert remote.resolve_transport(None) == "http"  # not localhost: never shared memory


def test_shm_update_bitwise_and_segment_reused(served, cfg):
    w = new_weights(cfg, seed=7)
    with HTTPEngine(served, shm_bucket_bytes=1 << 20) as c:  # 1 MiB buckets: several requests
        c.begin_weight_update()
        c.update_weights(list(w.items()), transport="shm")
        assert c.end_weight_update() == "1"
        name = c._shm.name
        assert my_segments() == [name]
        assert_served_equal(c, w)
        # Second update, over HTTP bodies: the same server, the other transport, also exact.
        w2 = new_weights(cfg, seed=8)
        c.begin_weight_update()
        c.update_weights(list(w2.items()), transport="http")
        c.end_weight_update()
        assert_served_equal(c, w2)
        # Third over shm again: the segment is reused, not recreated.
        c.begin_weight_update()
        c.update_weights(list(w.items()))  # auto -> shm
        c.end_weight_update()
        assert c._shm.name == name and my_segments() == [name]
        assert_served_equal(c, {k: w[k] for k in list(w)[:5]})
    assert my_segments() == []  # close() unlinks


def test_aborted_update_keeps_weights_and_leaves_no_segment(served, cfg):
    with HTTPEngine(served, shm_bucket_bytes=1 << 20) as c:
        before = server_weights(c, ["model.embed_tokens.weight", "lm_head.weight"])
        w = new_weights(cfg, seed=11)
        bad = list(w.items())
        bad[-1] = (bad[-1][0], bad[-1][1][:-1].clone())  # the last bucket has a wrong shape
        c.begin_weight_update()
        with pytest.raises(EngineHTTPError, match="shape") as err:
            c.update_weights(bad, transport="shm")
        assert err.value.status == 400 and err.value.route == "/update_weights_from_shm"
        assert my_segments() == []  # the client unlinked it on the failure
        with pytest.raises(EngineHTTPError, match="weights unchanged"):
            c.end_weight_update()
        assert server_weights(c, before) == before
        # The server still works: the next session over shm succeeds with a fresh segment.
        c.begin_weight_update()
        c.update_weights(list(w.items()), transport="shm")
        c.end_weight_update()
        assert_served_equal(c, {k: w[k] for k in ("model.embed_tokens.weight", "lm_head.weight")})


def test_killed_writer_segment_is_reaped():
    code = ("import os; from k2sys.engine.transport.shm import ShmSegment; s = ShmSegment(4096); "
            "s.tensor[:4].fill_(7); print(s.name, flush=True); os.kill(os.getpid(), 9)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    name = p.stdout.strip()
    assert p.returncode == -9 and NAME_RE.match(name), p.stderr
    assert os.path.exists(os.path.join(SHM_DIR, name))  # SIGKILL: no cleanup ran
    assert name in reap_stale_segments()
    assert not os.path.exists(os.path.join(SHM_DIR, name))
    with ShmSegment(4096) as live:  # a live writer's segment is never reaped
        assert live.name not in reap_stale_segments() and os.path.exists(live.path)
    assert not os.path.exists(live.path)


@pytest.mark.parametrize("body,match", [
    ({"entries": [], "shm_name": "k2sys-w-1-0123456789abcdef", "shm_size": 64}, "entries: empty"),
    ({"entries": [{}], "shm_name": "../../etc/passwd", "shm_size": 64}, "shm_name: .* not a k2sys segment"),
    ({"entries": [{}], "shm_name": "k2sys-w-1-0123456789abcdef", "shm_size": 0}, "shm_size"),
    ({"entries": [{}], "transport": "rdma"}, "transport: 'rdma'"),
    ({"entries": [{}], "transport": "cuda_ipc"}, "cuda_ipc: required"),
    ({"entries": [{}], "shm_name": "k2sys-w-1-0123456789abcdef", "shm_size": 64, "bogus": 1}, "unknown fields"),
])
def test_payload_validation_names_the_field(body, match):
    with pytest.raises(ProtocolError, match=match):
        ShmUpdatePayload.from_json(body)


def test_route_rejects_missing_segment(served):
    body = {"entries": [{"name": "lm_head.weight", "dtype": "float32", "shape": [1], "offset": 0}],
            "shm_name": "k2sys-w-1-0123456789abcdef", "shm_size": 64}
    r = httpx.post(served + "/update_weights_from_shm", json=body, timeout=30)
    assert r.status_code == 400 and "does not exist" in r.text


def test_one_call_update_through_shm(served, cfg):
    """update_weights(shards, NativeServerSink) into `k2sys serve` (1-rank gloo group): buckets are
    written straight into shared memory and the server copies each into its weights. Weights in
    use: the engine stages them (3 copies in all); after release + resume (the colocated cycle)
    it writes in place: exactly 2 copies per byte, the across-process bound of issue 12."""
    from k2sys.ckpt.engine_sinks import NativeServerSink

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        w = new_weights(cfg, seed=21)
        layout = hf_layout({n: tuple(t.shape) for n, t in w.items()}, {n: t.dtype for n, t in w.items()})
        nbytes = sum(t.numel() * t.element_size() for t in w.values())
        with HTTPEngine(served, shm_bucket_bytes=1 << 20) as c:
            sink = NativeServerSink(c, bucket_bytes=1 << 18)
            assert sink.mode == "shm"
            rep = update_weights(TrainerShards(layout, w), sink, config=UpdateConfig(bucket_bytes=1 << 18))
            assert rep.version == c.weight_version == sink.version_checked
            assert sink.buckets_sent == len(sink.out_buckets) > 2
            assert rep.model_bytes == nbytes and rep.bytes_copied == 3 * nbytes  # shm + staging + publish
            assert_served_equal(c, w)
            assert len(my_segments()) <= 3 < sink.buckets_sent  # a window of segments (filling, sending), reused
            c.release_memory(["kv_cache", "weights"])
            c.resume_memory(["weights"])
            w2 = new_weights(cfg, seed=22)
            rep = update_weights(TrainerShards(layout, w2), sink, config=UpdateConfig(bucket_bytes=1 << 18))
            assert rep.bytes_copied == 2 * nbytes and rep.copy_ratio == 2.0  # shm, then in place
            c.resume_memory(["kv_cache"])
            assert_served_equal(c, w2)
            sink.close()
        assert my_segments() == []
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU")
def test_cuda_ipc_update(cfg, tmp_path):  # pragma: no cover - GPU only
    path = save_hf(build_model(cfg, seed=1), tmp_path / "model")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "k2sys.engine.api.server", "--model", str(path), "--port", str(port),
                             "--device", "cuda"])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        w = {n: t.cuda() for n, t in new_weights(cfg, seed=5).items()}
        with HTTPEngine(url) as c:
            assert c.resolve_transport(None, list(w.items())) == "cuda_ipc"
            c.begin_weight_update()
            c.update_weights(list(w.items()))
            c.end_weight_update()
            assert_served_equal(c, {n: t.cpu() for n, t in w.items()})
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU")
def test_cuda_ipc_sink_two_copies(cfg, tmp_path):  # pragma: no cover - GPU only
    """NativeServerSink on a GPU: buckets filled on the device (one H2D from the host copy), sent by
    IPC handle, copied by the engine into its released-and-resumed weights: 2 copies per byte."""
    from k2sys.ckpt.engine_sinks import NativeServerSink

    path = save_hf(build_model(cfg, seed=1), tmp_path / "model")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "k2sys.engine.api.server", "--model", str(path), "--port", str(port),
                             "--device", "cuda"])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        w = new_weights(cfg, seed=6)
        layout = hf_layout({n: tuple(t.shape) for n, t in w.items()}, {n: t.dtype for n, t in w.items()})
        with HTTPEngine(url) as c:
            sink = NativeServerSink(c, bucket_bytes=1 << 18, device="cuda")
            assert sink.mode == "cuda_ipc"
            c.release_memory(["kv_cache", "weights"])
            c.resume_memory(["weights"])
            rep = update_weights(TrainerShards(layout, w), sink, config=UpdateConfig(bucket_bytes=1 << 18))
            c.resume_memory(["kv_cache"])
            assert rep.copy_ratio == 2.0 and rep.version == c.weight_version
            assert_served_equal(c, w)
            sink.close()
    finally:
        proc.terminate()
        proc.wait(30)
