"""A restarted inference replica loads the current weights from one healthy peer, without any
global barrier: 3 gloo processes, rank 2 dies and a fresh process replaces it; rank 1 keeps
serving and never joins a collective. Plus in-process checks of the pair protocol's refusals."""

import datetime
import os
import threading
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ckpt_fixtures import TINY, free_port, materialize, random_hf_state
from k2sys.ckpt import (TensorSink, TrainerShards, UpdateConfig, UpdateError, engine_tp_layout, hf_layout,
                        hf_param_shapes, update_weights)
from k2sys.ckpt.peer import PeerLink, load_from_peer, serve_peer

CFG = UpdateConfig(bucket_bytes=8192, timeout_s=60)


def equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[n].view(-1).view(torch.uint8), b[n].view(-1).view(torch.uint8))
                                    for n in b)


def serve_in_thread(*args, **kw):
    out = {}

    def run():
        try:
            out["report"] = serve_peer(*args, **kw)
        except Exception as e:  # reported to the test through `out`
            out["error"] = e
    th = threading.Thread(target=run)
    th.start()
    return th, out


def test_pair_load_refusals_keep_previous_weights():
    lay = engine_tp_layout(TINY, 1, 0)
    live = materialize(lay, random_hf_state(TINY, seed=4))
    r = TensorSink(lay)
    link = PeerLink("127.0.0.1", free_port())
    th, out = serve_in_thread(lay, live, link, version=lambda: 7, config=CFG)
    rep = load_from_peer(r, link, config=CFG)
    th.join(30)
    assert equal(r.weights, live) and r.version == 7 == rep.version and rep.n_buckets > 2
    assert out["report"].bytes == rep.bytes
    before = {n: t.clone() for n, t in r.weights.items()}
    # The peer's weights change while they are being sent: the snapshot may be torn, refuse it.
    versions = iter([8, 9])
    link = PeerLink("127.0.0.1", free_port())
    th, out = serve_in_thread(lay, {n: t + 1 for n, t in live.items()}, link, version=lambda: next(versions), config=CFG)
    with pytest.raises(UpdateError, match=r"changed during the transfer \(version 8 -> 9\)"):
        load_from_peer(r, link, config=CFG)
    th.join(30)
    assert equal(r.weights, before) and r.version == 7
    # A peer with another parallel config: both sides refuse, naming the layouts.
    link = PeerLink("127.0.0.1", free_port())
    other = engine_tp_layout(TINY, 2, 0)
    th, out = serve_in_thread(other, materialize(other, random_hf_state(TINY)), link, config=CFG)
    with pytest.raises(UpdateError, match="layouts or bucket sizes differ: peer 'engine tp2 rank0'"):
        load_from_peer(r, link, config=CFG)
    th.join(30)
    assert isinstance(out.get("error"), UpdateError) and equal(r.weights, before)
    with pytest.raises(ValueError, match="PeerLink.port"):
        PeerLink("127.0.0.1", 0)


def flag(out_dir, name):
    return os.path.join(out_dir, name)


def serve_until(weights, out_dir, deadline_s=150.0):
    """Stand-in for decoding: a matmul per 'step' over the live weights, until the restart is done."""
    steps, t0 = 0, time.monotonic()
    w = weights["model.layers.0.mlp.gate_up_proj.weight"].float()
    x = torch.ones(4, w.shape[1])
    while not os.path.exists(flag(out_dir, "restarted.done")) and time.monotonic() - t0 < deadline_s:
        x = torch.tanh(x @ w.T @ w * 1e-3)
        steps += 1
        time.sleep(0.005)
    return steps, os.path.exists(flag(out_dir, "restarted.done"))


def replica(rank: int, port: int, peer_port: int, out_dir: str) -> None:
    res = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3,
                                timeout=datetime.timedelta(seconds=60))
        lay = engine_tp_layout(TINY, 1, 0)  # three TP1 replicas; the trainer's HF tensors are split over ranks
        shapes = hf_param_shapes(TINY)
        src = hf_layout(shapes).restrict(list(shapes)[rank::3], name=f"trainer part {rank}")
        r = TensorSink(lay)
        for seed in (1, 2):  # two global updates: version 2 holds seed 2's weights
            g = random_hf_state(TINY, seed=seed)
            update_weights(TrainerShards(src, {n: g[n] for n in src.tensors}), r, config=CFG)
        res["version"] = r.version
        if rank == 2:
            os._exit(3)  # crash: no cleanup, no goodbye to anyone
        if rank == 0:  # healthy peer: serves the restarted replica from a thread, keeps decoding
            th, out = serve_in_thread(lay, r.weights, PeerLink("127.0.0.1", peer_port), version=lambda: r.version,
                                      config=CFG)
            res["steps"], res["saw_done"] = serve_until(r.weights, out_dir)
            th.join(60)
            res["served"] = repr(out.get("report") or out.get("error"))
        else:  # rank 1: keeps serving; it makes no distributed call at all from here on
            res["steps"], res["saw_done"] = serve_until(r.weights, out_dir)
        res["weights"] = r.weights
    except Exception:
        res["error"] = traceback.format_exc()
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    os._exit(0)  # the group has a dead member: skip its teardown


def restarted(peer_port: int, out_dir: str) -> None:
    res = {}
    try:  # a fresh process: no default process group, nothing but the link to one peer
        r = TensorSink(engine_tp_layout(TINY, 1, 0))
        rep = load_from_peer(r, PeerLink("127.0.0.1", peer_port), config=CFG)
        res.update(weights=r.weights, version=r.version, report=rep, initialized=dist.is_initialized())
    except Exception:
        res["error"] = traceback.format_exc()
    torch.save(res, os.path.join(out_dir, "restarted.pt"))
    open(flag(out_dir, "restarted.done"), "w").close()


def test_restarted_replica_loads_from_one_peer_without_barrier(tmp_path):
    ctx = mp.get_context("spawn")
    port, peer_port, out = free_port(), free_port(), str(tmp_path)
    procs = [ctx.Process(target=replica, args=(r, port, peer_port, out)) for r in range(3)]
    for p in procs:
        p.start()
    procs[2].join(180)
    assert procs[2].exitcode == 3, "rank 2 should have crashed on purpose"
    new = ctx.Process(target=restarted, args=(peer_port, out))
    new.start()
    for p in (new, procs[0], procs[1]):
        p.join(180)
        if p.is_alive():
            p.kill()
            pytest.fail("a process hung: the restart waited on someone")
    res = {r: torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in (0, 1)}
    back = torch.load(os.path.join(out, "restarted.pt"), weights_only=False)
    for r, x in [*res.items(), ("restarted", back)]:
        assert "error" not in x, f"{r}: {x.get('error')}"
    expect = materialize(engine_tp_layout(TINY, 1, 0), random_hf_state(TINY, seed=2))
    assert equal(back["weights"], res[0]["weights"]) and equal(back["weights"], expect)
    assert back["version"] == res[0]["version"] == 2 and not back["initialized"]
    # Rank 1 kept serving through the restart and only stopped when told it was over.
    assert res[1]["saw_done"] and res[1]["steps"] > 0 and res[0]["steps"] > 0
    assert "PeerReport" in res[0]["served"]
