"""2-rank gloo tests of the checkpoint engine: trainer TP=2 shards into engines at TP=1 and TP=2,
bitwise, pipelined and serial, checksums on; failures abort on every rank and keep old weights."""

import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from ckpt_fixtures import TINY, free_port, materialize, megatron_like_layout, random_hf_state
from k2sys.ckpt import (BucketSink, FaultInjection, TensorSink, TrainerShards, UpdateConfig, UpdateError,
                        engine_tp_layout, load_checkpoint, update_weights)
from k2sys.ckpt.engine_sinks import NativeEngineSink

WORLD = 2


def bitwise_equal(got: dict, expect: dict) -> bool:
    return set(got) == set(expect) and all(
        got[n].dtype == expect[n].dtype and torch.equal(got[n].view(-1).view(torch.uint8),
                                                         expect[n].view(-1).view(torch.uint8)) for n in expect)


class RecordingBucketSink(BucketSink):
    """Test double of a forwarding sink (the engine in another process): records each out-bucket
    it would send, as sent, and the session calls."""

    def __init__(self, bucket_bytes):
        super().__init__(bucket_bytes)
        self.calls, self.weights, self.sent = [], {}, []

    def _open(self):
        self.calls.append("begin")

    def _send(self, bucket):
        self.calls.append("send")
        self.sent.append(bucket.names)
        self.weights.update({n: t.clone() for n, t in bucket.unpack()})

    def _finish(self):
        self.calls.append("end")
        return "v1"

    def _discard(self):
        self.calls.append("abort")


def native_engine(g):
    from k2sys.engine.core.config import EngineConfig
    from k2sys.engine.core.engine import NativeEngine
    from k2sys.models.config import K2Config

    return NativeEngine(g, K2Config.from_hf_dict({**TINY, "torch_dtype": "bfloat16"}),
                        EngineConfig(max_total_tokens=256, dtype="bfloat16"))


def _init(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))


def worker_main(rank: int, port: int, out_dir: str) -> None:
    res = {}
    try:
        _init(rank, port)
        g = random_hf_state(TINY, seed=1)
        src = megatron_like_layout(TINY, 2, rank)
        shards = TrainerShards(src, materialize(src, g))
        for dst_tp in (1, 2):
            dst = engine_tp_layout(TINY, dst_tp, rank % dst_tp)
            for pipeline in (True, False):
                r = TensorSink(dst)
                rep = update_weights(shards, r, config=UpdateConfig(bucket_bytes=4096, pipeline=pipeline))
                res[f"tp{dst_tp}_pipe{pipeline}"] = (bitwise_equal(r.weights, materialize(dst, g)), rep.mode,
                                                     rep.n_buckets, r.version)
        # A second update into the same receiver lands the new weights in the same storage.
        dst = engine_tp_layout(TINY, 2, rank)
        r = TensorSink(dst)
        update_weights(shards, r, config=UpdateConfig(bucket_bytes=4096))
        ptrs = {n: t.data_ptr() for n, t in r.weights.items()}
        g2 = {n: (t.float() + 1).to(t.dtype) for n, t in g.items()}
        shards2 = TrainerShards(src, materialize(src, g2))
        update_weights(shards2, r, config=UpdateConfig(bucket_bytes=4096))
        res["second_update"] = (bitwise_equal(r.weights, materialize(dst, g2)), r.version,
                                all(r.weights[n].data_ptr() == p for n, p in ptrs.items()))
        # Short staging memory: 2 buffers -> 2-stage pipeline, still exact.
        slot = 4096 + 8
        rep = update_weights(shards, r, config=UpdateConfig(bucket_bytes=4096, max_staging_bytes=2 * slot + 100))
        res["two_stage"] = (rep.mode, rep.depth, bitwise_equal(r.weights, materialize(dst, g)))
        # Tensors larger than the bucket cap travel as row pieces: a 512-byte cap keeps every slot at
        # 512 bytes (+ trailer), so the pipeline's 4 slots fit where the largest tensor (4 KiB) alone would not.
        rep = update_weights(shards, r, config=UpdateConfig(bucket_bytes=512, max_staging_bytes=4 * (512 + 8)))
        res["row_pieces"] = (rep.mode, rep.depth, rep.n_buckets, rep.bytes_sent,
                             bitwise_equal(r.weights, materialize(dst, g)))
        # A bit flipped in transit on rank 1, bucket 3: every rank aborts, weights and version kept.
        before = {n: t.clone() for n, t in r.weights.items()}
        v = r.version
        try:
            update_weights(shards2, r, config=UpdateConfig(bucket_bytes=4096, fault=FaultInjection("corrupt", 3, 1)))
            res["corrupt"] = ("no error",)
        except UpdateError as e:
            res["corrupt"] = (str(e), e.bucket, bitwise_equal(r.weights, before), r.version == v)
        # A forwarding sink: every out-bucket sent once, when complete, whole HF tensors, bitwise.
        fwd = RecordingBucketSink(bucket_bytes=3000)
        rep = update_weights(shards, fwd, config=UpdateConfig(bucket_bytes=4096))
        res["forward"] = (fwd.calls[0], fwd.calls[-1], fwd.calls.count("send"), len(fwd.out_buckets),
                          sorted(n for b in fwd.sent for n in b) == sorted(g), bitwise_equal(fwd.weights, g),
                          rep.version)
        # The native engine in this process (one per rank): its live weights after a release/resume
        # are written in place, the router (float32 in the engine) widened exactly from bf16.
        with native_engine({n: torch.zeros_like(t) for n, t in g.items()}) as eng:
            eng.release_memory(["weights"])
            eng.resume_memory(["weights"])
            rep = update_weights(shards, NativeEngineSink(eng), config=UpdateConfig(bucket_bytes=4096))
            p = eng.runner.params
            res["engine"] = (rep.version, eng.weight_version, eng.stats()["stale_tensors"],
                             all(torch.equal(p[n], t.to(p[n].dtype)) for n, t in g.items()),
                             eng.last_update["direct_tensors"], eng.last_update["staged_tensors"])
        # As the coordinator pushes: rank 0 into its (kept) engine sink, rank 1 into none (a fresh one
        # each time); the second push reuses the plan on rank 0 and must not desynchronise the ranks.
        keep = TensorSink(engine_tp_layout(TINY, 1, 0)) if rank == 0 else None
        for _ in range(2):
            rep = update_weights(shards, keep, config=UpdateConfig(bucket_bytes=4096, timeout_s=20))
        res["coordinator"] = (rep.version, bitwise_equal(keep.weights, materialize(keep.layout, g))) \
            if rank == 0 else (rep.version, rep.model_bytes)
        # Startup: rank 0 writes a 2-file checkpoint; each rank reads half, the broadcast assembles it.
        ckpt = os.path.join(out_dir, "ckpt")
        if rank == 0:
            os.makedirs(ckpt, exist_ok=True)
            names = sorted(g)
            save_file({n: g[n] for n in names[: len(names) // 2]}, os.path.join(ckpt, "a.safetensors"))
            save_file({n: g[n] for n in names[len(names) // 2:]}, os.path.join(ckpt, "b.safetensors"))
        dist.barrier()
        r3 = TensorSink(engine_tp_layout(TINY, 2, rank))
        rep = load_checkpoint(ckpt, r3, config=UpdateConfig(bucket_bytes=8192))
        res["startup"] = (bitwise_equal(r3.weights, materialize(r3.layout, g)), rep.n_buckets)
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        res["error"] = traceback.format_exc()
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


def worker_killed(rank: int, port: int, out_dir: str, transport: str = "collective") -> None:
    res = {}
    try:
        _init(rank, port)
        g = random_hf_state(TINY, seed=2)
        src = megatron_like_layout(TINY, 2, rank)
        shards = TrainerShards(src, materialize(src, g))
        r = TensorSink(engine_tp_layout(TINY, 1, 0))
        rep = update_weights(shards, r, config=UpdateConfig(bucket_bytes=4096, timeout_s=20, transport=transport))
        res["transport"] = rep.transport
        before = {n: t.clone() for n, t in r.weights.items()}
        g2 = {n: (t.float() * 2).to(t.dtype) for n, t in g.items()}
        t0 = time.monotonic()
        try:  # rank 1 dies (os._exit) when it reaches bucket 4
            update_weights(TrainerShards(src, materialize(src, g2)), r,
                           config=UpdateConfig(bucket_bytes=4096, timeout_s=20, fault=FaultInjection("die", 4, 1),
                                               transport=transport))
            res["killed"] = ("no error",)
        except UpdateError as e:
            res["killed"] = (str(e), e.bucket, bitwise_equal(r.weights, before), r.version)
        res["seconds"] = time.monotonic() - t0
    except Exception:
        res["error"] = traceback.format_exc()
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    os._exit(0)  # do not wait in the process group's teardown for the dead peer


def worker_killed_shm(rank: int, port: int, out_dir: str) -> None:
    worker_killed(rank, port, out_dir, transport="shm")


def spawn(fn, tmp_path, timeout=240):
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=fn, args=(r, port, str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            pytest.fail(f"{fn.__name__}: a rank hung for {timeout} s")
    out = {}
    for r in range(WORLD):
        path = os.path.join(tmp_path, f"rank{r}.pt")
        out[r] = torch.load(path) if os.path.exists(path) else None
    return out, [p.exitcode for p in procs]


@pytest.fixture(scope="module")
def main_results(tmp_path_factory):
    out, codes = spawn(worker_main, tmp_path_factory.mktemp("ckpt"))
    for r, res in out.items():
        assert res is not None and "error" not in res, f"rank {r}: {res and res.get('error')}"
    assert codes == [0, 0]
    return out


@pytest.mark.parametrize("key", ["tp1_pipeTrue", "tp1_pipeFalse", "tp2_pipeTrue", "tp2_pipeFalse"])
def test_tp2_shards_land_bitwise(main_results, key):
    for r in range(WORLD):
        exact, mode, n_buckets, version = main_results[r][key]
        assert exact, f"rank {r} {key}: weights differ"
        assert mode == ("coop" if key.endswith("True") else "serial")  # shm rings: ranks on one host
        assert n_buckets > 4 and version == 1


def test_second_update_in_place(main_results):
    for r in range(WORLD):
        assert main_results[r]["second_update"] == (True, 2, True)


def test_short_memory_falls_back_to_two_stages(main_results):
    for r in range(WORLD):
        assert main_results[r]["two_stage"] == ("coop", 2, True)


def test_tensors_over_the_cap_travel_as_row_pieces(main_results):
    biggest = max(t.numel() * t.element_size() for t in random_hf_state(TINY, seed=1).values())
    assert biggest > 4 * (512 + 8)  # whole, it would not fit the staging memory at all
    for r in range(WORLD):
        mode, depth, n_buckets, sent, exact = main_results[r]["row_pieces"]
        assert exact and mode == "coop" and depth == 4
        assert n_buckets >= sent / 512


def test_checksum_failure_aborts_every_rank(main_results):
    for r in range(WORLD):
        msg, bucket, kept, same_version = main_results[r]["corrupt"]
        assert "bucket 3" in msg and "rank 1" in msg and "checksum mismatch" in msg, msg
        assert bucket == 3 and kept and same_version


def test_forwarding_sink_sends_each_bucket_once_complete(main_results):
    for r in range(WORLD):
        first, last, sends, planned, covered, exact, version = main_results[r]["forward"]
        assert (first, last, version) == ("begin", "end", "v1")
        assert sends == planned > 2 and covered and exact


def test_native_engine_sink_writes_stale_weights_in_place(main_results):
    for r in range(WORLD):
        version, served, stale, exact, direct, staged = main_results[r]["engine"]
        assert version == served == "1" and stale == 0 and exact
        assert direct > 0 and staged == 0  # released + resumed: every tensor written in place


def test_repeated_pushes_with_one_engine_rank(main_results):
    assert main_results[0]["coordinator"] == (2, True)
    assert main_results[1]["coordinator"] == (None, 0)  # no engine on rank 1: it only sent its shards


def test_startup_load_from_peers(main_results):
    for r in range(WORLD):
        exact, n_buckets = main_results[r]["startup"]
        assert exact and n_buckets >= 2


def test_killed_rank_aborts_survivor_with_old_weights(tmp_path):
    out, codes = spawn(worker_killed, tmp_path, timeout=120)
    assert codes[1] == 17  # the drill's exit code
    res = out[0]
    assert res is not None and "error" not in res, res and res.get("error")
    msg, bucket, kept, version = res["killed"]
    # rank 1 dies before the broadcast of bucket 4; with broadcasts in flight (pipelined) the survivor
    # may see it on the completion of bucket 3, which rank 1 issued and never finished
    assert ("bucket 4" in msg or "bucket 3" in msg) and "died or timed out" in msg, msg
    assert bucket in (3, 4) and kept and version == 1
    assert res["transport"] == "collective"


def test_killed_rank_over_shared_memory_is_seen_at_once(tmp_path):
    """Over the shared-memory rings the survivor notices the peer's process exit (same host), not
    the 20 s timeout; the update aborts with the previous weights kept."""
    out, codes = spawn(worker_killed_shm, tmp_path, timeout=120)
    assert codes[1] == 17
    res = out[0]
    assert res is not None and "error" not in res, res and res.get("error")
    assert res["transport"] == "shm"
    msg, bucket, kept, version = res["killed"]
    assert "rank 1" in msg and "has exited" in msg and bucket >= 3, msg
    assert kept and version == 1
    assert res["seconds"] < 10, res["seconds"]
