"""Parameter-update benchmark of the checkpoint engine (CPU figures here, GPU on a GPU node).

Every ratio is against a bound or a peer measured in this run, interleaved round by round, with
the bound's threads and rounds in the row (the rule: benchmarks/common.py, docs/benchmarks.md):
  onload      k2sys Onloader (all cores) host->host GB/s vs a plain copy of the same buffers with
              1 thread and with all cores (N threads on one work queue of pieces; target 0.85 at all cores)
  apply       reshard apply (batched strided copy of a real TP2->TP1 plan, all cores) vs a plain copy of
              the same bytes from the same bucket buffers into the same destination tensors
  update      2-rank update of a TP=2 trainer into a TP=1 engine, pipelined vs serial over the default
              transport between ranks on one host (shared-memory rings: peer, target 1.25) and over gloo
              broadcasts (peer); shm vs gloo; gloo pipelined vs a gloo broadcast of the same bytes (bound)
  shm         cross-process update of a `k2sys serve` subprocess: shm vs base64 HTTP bodies (peer), and
              vs two plain copies of the same bytes (pack into the segment + server copy: the bound)
  copies      bytes copied per update: value = bytes copied / model bytes, ratio = model bytes / bytes
              copied (higher = better); targets (issue 12) 1.0 in-process colocated (one copy), 0.5
              across processes colocated (<= 2 copies); the live (staged) paths have no target
  projection  Kimi-K2 update on H20 and H200 at TP16: a priced cost table (k2_projection.py), no ratio

    python benchmarks/bench_update.py --json OUT [--sizes 0.25,1] [--repeats 5] [--skip-update] [--skip-shm]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import k2sys  # noqa: E402,F401  (before torch: its host-allocation settings, k2sys/__init__.py)
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from k2sys import ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import k2_projection  # noqa: E402
from common import (MIN_REPS, CopyBound, add_common_args, all_cores, copy_bound_rows, diagnostic,  # noqa: E402
                    env_info, interleaved, paired_row, print_results, projection_row, result, summarize,
                    thread_counts, write_results)
from k2sys.ckpt import (TensorSink, TrainerShards, UpdateConfig, WeightUpdater, engine_tp_layout,  # noqa: E402
                        plan_reshard, update_weights)
from k2sys.ckpt.apply import compile_buckets  # noqa: E402
from k2sys.ckpt.bucket import interleave_owners  # noqa: E402

GiB, MiB = 1 << 30, 1 << 20

# Kimi K2 (docs/FACTS.md): the shapes the projection is computed from.
KIMI_K2 = dict(hidden_size=7168, num_attention_heads=64, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
               qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=384, n_shared_experts=1, num_experts_per_tok=8,
               moe_intermediate_size=2048, intermediate_size=18432, vocab_size=163840, first_k_dense_replace=1,
               num_hidden_layers=61)
# A small DeepseekV3 for the 2-rank update (~0.75 GiB bf16 at 8 layers): real fused/split tensors.
BENCH_MODEL = dict(hidden_size=1024, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64,
                   qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16, n_shared_experts=1,
                   moe_intermediate_size=1024, intermediate_size=2048, vocab_size=16384, first_k_dense_replace=1,
                   num_hidden_layers=8)


# ------------------------------------------------------------------ onload
def bench_onload(sizes_gib: list[float], repeats: int) -> list[dict]:
    out = []
    threads = all_cores()
    biggest = int(max(sizes_gib) * GiB)
    pool = ext.StagingPool()
    src_buf = pool.acquire(biggest)  # the trainer's offloaded params live in pooled (pinned) memory
    src_buf.tensor[: 1 << 20].copy_(torch.randint(0, 256, (1 << 20,), dtype=torch.uint8))
    src_buf.tensor[1 << 20:].fill_(3)  # contents do not matter to a copy; the tail check below does
    dst = torch.empty(biggest, dtype=torch.uint8)
    dst.fill_(1)  # touch pages: the "device" copy is pre-allocated
    ol = ext.Onloader("cpu", chunk_bytes=16 * MiB, ring=4, threads=threads)
    for gib in sizes_gib:
        n = int(gib * GiB)
        s, d = src_buf.tensor[:n], dst[:n]
        with CopyBound(d, s, threads=thread_counts(threads)) as cb:
            tm = interleaved({"pipelined": lambda: ol.copy_(d, s, src_pinned=True),
                              "bounce": lambda: ol.copy_(d, s, src_pinned=False), **cb.fns()}, repeats)
        assert torch.equal(d[-4096:], s[-4096:])
        out += copy_bound_rows(f"onload_pipelined_{gib:g}GiB", tm["pipelined"], cb, tm, system_threads=threads,
                               target=0.85, what="system: k2sys Onloader, direct (16 MiB chunks)")
        out += copy_bound_rows(f"onload_bounce_ring_{gib:g}GiB", tm["bounce"], cb, tm, system_threads=threads,
                               what="system: k2sys Onloader through its 4-slot bounce ring (two copies)")
    src_buf.release()
    return out


# ------------------------------------------------------------------ 2-rank update
HEADROOM_BYTES = 256 << 20


def _update_worker(rank: int, port: int, repeats: int, bucket_mib: int, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=300))
    torch.set_num_threads(1)
    src = engine_tp_layout(BENCH_MODEL, 2, rank)  # a TP=2 trainer layout with fused tensors
    g = torch.Generator().manual_seed(rank)
    tensors = {n: torch.randint(-30000, 30000, s.shape, dtype=torch.int16, generator=g).view(s.dtype)
               for n, s in src.tensors.items()}
    shards = TrainerShards(src, tensors)
    # Commit by swapping staged and live buffers: the figure is the transport pipeline, not a
    # final memcpy that both modes would pay alike.
    recv = TensorSink(engine_tp_layout(BENCH_MODEL, 1, 0), in_place=False)
    cfg = dict(bucket_bytes=bucket_mib * MiB, checksum=True)
    # the default transport between ranks on one host (shared-memory rings) and gloo broadcasts
    runners = {"pipelined": WeightUpdater(None, UpdateConfig(pipeline=True, transport="shm", **cfg)),
               "serial": WeightUpdater(None, UpdateConfig(pipeline=False, transport="shm", **cfg)),
               "gloo_pipelined": WeightUpdater(None, UpdateConfig(pipeline=True, transport="collective", **cfg)),
               "gloo_serial": WeightUpdater(None, UpdateConfig(pipeline=False, transport="collective", **cfg))}
    reports = {k: upd.update(shards, recv) for k, upd in runners.items()}  # warm: plans, staging, pages
    # the transport bound: each rank broadcasts its share of the same bytes in one message
    sent = reports["pipelined"].bytes_sent
    flats = [torch.zeros(sent // 2 + r * (sent % 2), dtype=torch.uint8) for r in range(2)]

    def broadcast():
        for r in range(2):
            dist.broadcast(flats[r], src=r)

    # memory headroom: one rank copying alone (the other waits) vs both at once, the same bytes
    # each, 1 thread each, onto touched buffers (what a second core adds to this host's copy bandwidth)
    csrc = torch.randint(0, 256, (HEADROOM_BYTES,), dtype=torch.uint8, generator=g)
    cdst = torch.zeros(HEADROOM_BYTES, dtype=torch.uint8)

    names = ["pipelined", "serial", "gloo_pipelined", "gloo_serial", "broadcast", "copy_alone", "copy_both"]
    times = {k: [] for k in names}
    for i in range(repeats):
        for k in names[i % len(names):] + names[:i % len(names)]:  # rotated, as common.interleaved does
            dist.barrier()
            t0 = time.perf_counter()
            if k == "broadcast":
                broadcast()
            elif k.startswith("copy_"):
                if rank == 0 or k == "copy_both":
                    ext.host_copy_(cdst, csrc, threads=1)
                dist.barrier()  # rank 1 copies (or idles) before the next round starts
            else:
                reports[k] = runners[k].update(shards, recv)
            times[k].append(time.perf_counter() - t0)
    barrier = []
    for _ in range(50):
        t0 = time.perf_counter()
        dist.barrier()
        barrier.append(time.perf_counter() - t0)
    if rank == 0:
        summary = {"times": times, "barrier_s": statistics.median(barrier)}
        for k in runners:
            r = reports[k]
            summary[k] = {f: getattr(r, f) for f in ("wall_s", "stage_s", "broadcast_s", "apply_s", "checksum_s",
                                                     "bytes_sent", "bytes_copied", "n_buckets", "mode", "transport")}
        with open(out_path, "w") as f:
            json.dump(summary, f)
    dist.barrier()
    dist.destroy_process_group()


def bench_update(repeats: int, bucket_mib: int) -> tuple[list[dict], dict]:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "update.json")
        mp.spawn(_update_worker, args=(port, repeats, bucket_mib, path), nprocs=2)
        with open(path) as f:
            s = json.load(f)
    t = s.pop("times")
    nbytes = s["pipelined"]["bytes_sent"]
    common = dict(threads=1, system_threads=1, work=nbytes, unit="GB/s", scale=1e9,
                  ranks=2, bucket_mib=bucket_mib)
    out = [paired_row("update_2rank_pipelined_vs_serial", t["pipelined"], t["serial"], kind="peer",
                      bound="the serial update (pipeline=False): same 2 ranks, shards, buckets, checksums and "
                            "transport (shared-memory rings, the default between ranks on one host)",
                      target=1.25, transport="shm", **common),
           paired_row("update_2rank_gloo_pipelined_vs_serial", t["gloo_pipelined"], t["gloo_serial"], kind="peer",
                      bound="the serial update over the same gloo broadcasts (transport='collective')",
                      transport="collective", **common),
           paired_row("update_2rank_shm_vs_gloo_pipelined", t["pipelined"], t["gloo_pipelined"], kind="peer",
                      bound="the same pipelined update with gloo broadcasts (transport='collective')",
                      transport="shm", **common),
           paired_row("update_2rank_gloo_pipelined_vs_broadcast", t["gloo_pipelined"], t["broadcast"],
                      bound=f"gloo broadcast of the same {nbytes / 1e6:.0f} MB between the same 2 ranks (1 thread "
                            "each), one message per rank: the collective transport alone (the shm transport "
                            "moves no bytes in transit, so this is no bound for it)",
                      transport="collective", **common)]
    alone, both = statistics.median(t["copy_alone"]), statistics.median(t["copy_both"])
    out.append(diagnostic("update_2rank_copy_headroom", round(2 * alone / both, 4), "x",
                          f"aggregate copy throughput of the 2 ranks copying at once / of one rank copying alone "
                          f"({HEADROOM_BYTES >> 20} MiB each, 1 thread per rank, touched buffers, in the same "
                          f"rounds; medians of {len(t['copy_both'])}): what the second rank's core adds to this "
                          "host's memory bandwidth. The update is memory-bound, so overlapping the ranks' copies "
                          "gains at most about this much over running them in turn (not a bound)"))
    # What overlap alone would give: pipelined, each rank still stages its own buckets and applies all
    # of them (S + A); serially the stages of both ranks come one after the other (2S + A). Not a
    # bound: a bucket read soon after it was packed comes from cache, so the pipeline can beat it.
    ser = s["serial"]
    stage, apply_ = ser["stage_s"], ser["apply_s"]
    if stage + apply_ > 0:
        out.append(diagnostic("update_2rank_overlap_estimate", round((2 * stage + apply_) / (stage + apply_), 4),
                              "x", "pipelined/serial from overlap alone (no cache reuse; not a bound): "
                              "(2 S + A) / (S + A) from rank 0's serial update, S = packing its own buckets "
                              f"({stage:.3f} s), A = verifying and applying every bucket ({apply_:.3f} s)"))
    return out, s


# ------------------------------------------------------------------ reshard apply
def bench_apply(repeats: int) -> list[dict]:
    threads = all_cores()
    sources = {r: engine_tp_layout(BENCH_MODEL, 2, r) for r in range(2)}
    dst = engine_tp_layout(BENCH_MODEL, 1, 0)
    plan = plan_reshard(sources, dst)
    per_owner = {r: list(l.tensors.values()) for r, l in sources.items()}
    buckets = interleave_owners(per_owner, 32 * MiB)
    comp = compile_buckets(plan, buckets)
    bufs = [torch.randint(0, 256, (b.nbytes,), dtype=torch.uint8) for b in buckets]
    outs = {n: torch.empty(s.shape, dtype=s.dtype) for n, s in dst.tensors.items()}
    for t in outs.values():
        t.view(-1).view(torch.uint8).fill_(0)
    rows = [c.absolute_rows(b.data_ptr(), torch.tensor([outs[n].data_ptr() for n in c.dst_names], dtype=torch.int64))
            for c, b in zip(comp, bufs)]
    total = sum(c.nbytes for c in comp)

    def apply_all():
        for r in rows:
            ext.batched_strided_copy_(r, threads=threads)

    with CopyBound(list(outs.values()), bufs, threads=thread_counts(threads), nbytes=total) as cb:
        tm = interleaved({"apply": apply_all, **cb.fns()}, repeats)
    n_rows = sum(r.shape[0] for r in rows)
    return copy_bound_rows("reshard_apply_tp2_to_tp1", tm["apply"], cb, tm, system_threads=threads,
                           what=f"system: batched strided copy of {n_rows} rows, {len(bufs)} buckets") + \
        [diagnostic("reshard_apply_rows", n_rows, "strided rows", "rows of the TP2 -> TP1 apply table")]


# ------------------------------------------------------------------ cross-process (shm vs http)
def _free_port() -> int:
    import socket
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def _serve(path: str):
    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "k2sys.engine.api.server", "--model", str(path), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("k2sys serve did not come up")


def bench_shm(repeats: int, bucket_mib: int, model: str) -> tuple[list[dict], float]:
    """Rows, and the median control round trip (GET /health) to the server, for the projection."""
    from k2sys.engine.api.client import HTTPEngine
    from k2sys.models import build_model, param_shapes, preset, save_hf

    cfg = preset(model)
    threads = all_cores()
    with tempfile.TemporaryDirectory() as d:
        proc, url = _serve(save_hf(build_model(cfg, seed=0), os.path.join(d, "model")))
        try:
            names = param_shapes(cfg)
            named = [(n, t) for n, t in build_model(cfg, seed=1).state_dict().items() if n in names]
            total = sum(t.numel() * t.element_size() for _, t in named)
            scratch = [torch.empty_like(t).fill_(1) for _, t in named]
            with HTTPEngine(url, shm_bucket_bytes=bucket_mib * MiB) as c:
                session = {k: (lambda k=k: c.update_weights(named, transport=k)) for k in ("shm", "http")}
                with CopyBound(scratch, [t for _, t in named], threads=thread_counts(threads),
                               where="from the same source tensors into touched buffers of the same sizes") as cb:
                    # begin/end (the engine's commit copy, the same for both transports) stay untimed
                    tm = interleaved({**session, **cb.fns()}, repeats,
                                     before={k: c.begin_weight_update for k in session},
                                     after={k: c.end_weight_update for k in session})
                rtt = interleaved({"health": lambda: c.health()}, 50, warmup=3)
                probe = named[-1]
                got = c.get_weights_by_name(probe[0], truncate_size=64)
                assert got == probe[1].float().reshape(-1)[:64].tolist(), "server weights differ after the update"
        finally:
            proc.terminate()
            proc.wait(30)
    rows = [paired_row(f"update_xproc_shm_vs_http_{model}", tm["shm"], tm["http"], kind="peer", work=total,
                       unit="GB/s", scale=1e9, threads=threads, system_threads=threads,
                       bound="the same update through base64 HTTP bodies (same server, weights, buckets)")]
    rows += copy_bound_rows(f"update_xproc_shm_{model}", tm["shm"], cb, tm, system_threads=threads, factor=2,
                            what="the shm path copies every byte twice (pack into the segment, server copy out), so "
                                 "the bound is two plain copies")
    return rows, statistics.median(rtt["health"])


# ------------------------------------------------------------------ bytes copied per update
def bench_copies(model: str, repeats: int, bucket_mib: int) -> tuple[list[dict], dict]:
    """Bytes copied per update of update_weights(shards, sink) for the native sinks (see module doc)."""
    from k2sys.ckpt.engine_sinks import NativeEngineSink, NativeServerSink
    from k2sys.engine.api.client import HTTPEngine
    from k2sys.engine.core.engine import NativeEngine
    from k2sys.models import build_model, preset, save_hf
    from k2sys.trainer.backend import MegatronBackend

    cfg = preset(model)
    trainer = MegatronBackend.from_model(build_model(cfg, seed=1))
    trainer.offload()  # the colocated push reads the trainer's host copy
    tensors, layout = trainer.export_shards()
    shards = TrainerShards(layout, tensors)
    ucfg = UpdateConfig(bucket_bytes=bucket_mib * MiB)
    out, detail = [], {}

    def measure(name: str, sink, before=None, target=None) -> None:
        reps = []
        for _ in range(repeats + 1):  # first: warm (plans, buffers, pages)
            if before:
                before()
            reps.append(update_weights(shards, sink, config=ucfg))
        reps = reps[1:]
        ratios = [r.copy_ratio for r in reps]
        r = reps[0]
        detail[name] = {"wall_s": summarize([x.wall_s for x in reps]), "apply_s": summarize([x.apply_s for x in reps]),
                        "commit_s": summarize([x.commit_s for x in reps]), "bytes_copied": r.bytes_copied,
                        "model_bytes": r.model_bytes, "mode": r.mode}
        sp = summarize(ratios)
        out.append(result(f"update_copies_{name}_{model}", round(sp["median"], 3), "x model bytes (copied/model)", 1.0,
                          target=target, ratio=round(1 / sp["median"], 3), kind="count",
                          bound="one copy of the model bytes (each byte written once into the engine's weights); "
                                "ratio = model bytes / bytes copied", threads=all_cores(), system_threads=all_cores(),
                          reps=len(reps), spread={"min": 1 / sp["max"], "max": 1 / sp["min"]},
                          bytes_copied=r.bytes_copied, model_bytes=r.model_bytes))
        out.append(diagnostic(f"update_wall_{name}_{model}", round(detail[name]["wall_s"]["median"], 4), "s",
                              "wall time of update_weights (no bound: see the copy-bound rows of onload/apply)",
                              reps=len(reps), spread=detail[name]["wall_s"]))

    with NativeEngine.from_model(build_model(cfg, seed=0)) as eng:
        sink = NativeEngineSink(eng)

        def cycle():
            eng.release_memory(["kv_cache", "weights"])
            eng.resume_memory(["weights"])
        measure("native_inproc_colocated", sink, cycle, 1.0)
        eng.resume_memory(["kv_cache"])
        measure("native_inproc_live", sink, None, None)
    with tempfile.TemporaryDirectory() as d:
        proc, url = _serve(save_hf(build_model(cfg, seed=0), os.path.join(d, "model")))
        try:
            with HTTPEngine(url) as c:
                sink = NativeServerSink(c, bucket_bytes=bucket_mib * MiB)

                def cycle():
                    c.release_memory(["kv_cache", "weights"])
                    c.resume_memory(["weights"])
                measure(f"native_xproc_{sink.mode}_colocated", sink, cycle, 0.5)
                c.resume_memory(["kv_cache"])
                measure(f"native_xproc_{sink.mode}_live", sink, None, None)
                sink.close()
        finally:
            proc.terminate()
            proc.wait(30)
    return out, detail


def per_tensor_overhead(repeats: int) -> tuple[list[dict], float]:
    """Engine-side cost per destination tensor of a colocated in-process update on k2-tiny (6 MB, so
    the bytes hardly count): apply = (apply_s - a plain copy of the same bytes) / tensors, which any
    engine fed by k2sys pays per tensor (target lookup, copy rows, ready); commit_s / tensors is the
    CPU engine's own repack of its oneDNN weights (CPU fp32 only), reported but not projected."""
    from k2sys.ckpt.engine_sinks import NativeEngineSink
    from k2sys.engine.core.engine import NativeEngine
    from k2sys.models import build_model, preset
    from k2sys.trainer.backend import MegatronBackend

    cfg = preset("k2-tiny")
    trainer = MegatronBackend.from_model(build_model(cfg, seed=1))
    trainer.offload()
    tensors, layout = trainer.export_shards()
    shards = TrainerShards(layout, tensors)
    srcs = [t.contiguous() for t in tensors.values()]
    scratch = [torch.empty_like(t) for t in srcs]
    reports = []
    with NativeEngine.from_model(build_model(cfg, seed=0)) as eng:
        sink = NativeEngineSink(eng)

        def cycle():
            eng.release_memory(["kv_cache", "weights"])
            eng.resume_memory(["weights"])
        with CopyBound(scratch, srcs, threads=[all_cores()],
                       where="from the trainer's host tensors into touched buffers of the same sizes") as cb:
            tm = interleaved({"update": lambda: reports.append(update_weights(shards, sink)), **cb.fns()}, repeats,
                             before={"update": cycle})
        n = len(sink.layout.tensors)
    reports = reports[1:]  # the warm-up round
    copy_s = cb.seconds(tm, all_cores())
    apply = summarize([(r.apply_s - c) / n for r, c in zip(reports, copy_s)])
    commit = summarize([r.commit_s / n for r in reports])
    us = lambda sp: {k: round(sp[k] * 1e6, 2) for k in ("min", "q1", "q3", "max")}  # noqa: E731
    rows = [diagnostic("engine_apply_overhead_per_tensor_k2-tiny", round(apply["median"] * 1e6, 2), "us/tensor",
                       f"(apply_s - plain copy of the same {cb.nbytes / 1e6:.1f} MB) / {n} destination tensors, "
                       "colocated in-process update; feeds the Kimi-K2 projection", reps=apply["n"], spread=us(apply)),
            diagnostic("engine_commit_per_tensor_k2-tiny", round(commit["median"] * 1e6, 2), "us/tensor",
                       f"commit_s / {n} tensors: the CPU engine repacks its oneDNN fp32 weights (CPU only; a GPU "
                       "engine does not pack), so not in the projection", reps=commit["n"], spread=us(commit))]
    return rows, apply["median"]


# ------------------------------------------------------------------ Kimi-K2 projection
def projection(measured: dict) -> tuple[list[dict], list[str]]:
    sizes = k2_projection.k2_sizes(KIMI_K2)
    lines = [f"Kimi-K2 from real shapes: {sizes['params'] / 1e12:.3f}T params, {sizes['bf16_bytes'] / 1e12:.3f} TB "
             f"bf16, {sizes['fp8_bytes'] / 1e12:.3f} TB FP8 block-128 (+ bf16 rest), {sizes['tensors']} HF tensors"]
    rows = []
    for hw in k2_projection.HARDWARE:
        for n in (16, 256):
            p = k2_projection.project(hw, n, sizes, measured)
            lines += k2_projection.table(p)
            comps = {k: round(v["s"], 4) for k, v in p["components"].items()}
            srcs = sorted({s.strip() for v in p["components"].values() for s in v["source"].split(",")})
            for key, what in (("pipelined_s", "transfers overlapped per bucket, everything else in series"),
                              ("serial_s", "every component in series"),
                              ("bandwidth_floor_s", "max(FP8 H2D, broadcast, reload) only: the old projection, "
                                                    "omitting every other component")):
                rows.append(projection_row(f"k2_update_{hw}_{n}gpu_tp16_{key[:-2]}", round(p[key], 2), "s", what,
                                           components_s=comps, missing=p["missing"], notes=p["notes"],
                                           sources=[k2_projection.SOURCES[s] for s in srcs if s in k2_projection.SOURCES],
                                           anchor_cited=p["anchor"]))
    return rows, lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True, help="write results here")
    ap.add_argument("--sizes", default="1,2,4", help="onload sizes in GiB, comma separated (e.g. 0.25,0.5)")
    ap.add_argument("--repeats", type=int, default=MIN_REPS, help=f"interleaved rounds (>= {MIN_REPS} for a bound)")
    ap.add_argument("--bucket-mib", type=int, default=4, help="bucket cap of the 2-rank update")
    ap.add_argument("--update-repeats", type=int, default=15,
                    help="interleaved rounds of the 2-rank update (at least --repeats): single rounds of a 0.2 s "
                         "update swing 1.1-1.6x on a shared 2-core machine, so its median needs more of them")
    ap.add_argument("--skip-update", action="store_true", help="skip the 2-rank gloo update")
    ap.add_argument("--skip-shm", action="store_true", help="skip the cross-process shm vs http update")
    ap.add_argument("--skip-copies", action="store_true", help="skip the bytes-copied figures of the sinks")
    ap.add_argument("--copies-model", default="k2-small", help="model preset of the bytes-copied figures")
    ap.add_argument("--shm-model", default="k2-small", help="model preset served for the shm vs http figure")
    ap.add_argument("--shm-bucket-mib", type=int, default=64, help="shm bucket cap of the cross-process update")
    add_common_args(ap)
    args = ap.parse_args(argv)
    sizes = [float(x) for x in args.sizes.split(",") if x]
    if not sizes or min(sizes) <= 0:
        ap.error("--sizes needs positive GiB values, e.g. --sizes 0.5,1")
    ext.require_cpp()
    load_before = os.getloadavg()
    results = bench_onload(sizes, args.repeats)
    results += bench_apply(args.repeats)
    stages, measured = None, {}
    if not args.skip_update:
        upd, stages = bench_update(max(args.repeats, args.update_repeats), args.bucket_mib)
        measured["barrier_s"] = stages.pop("barrier_s")
        results += upd
    if not args.skip_shm:
        rows, measured["control_rtt_s"] = bench_shm(args.repeats, args.shm_bucket_mib, args.shm_model)
        results += rows
    copies = None
    if not args.skip_copies:
        rows, copies = bench_copies(args.copies_model, args.repeats, args.shm_bucket_mib)
        results += rows
    rows, measured["per_tensor_s"] = per_tensor_overhead(args.repeats)
    results += rows
    proj, lines = projection(measured)
    results += proj
    env = env_info(crc32c_hw=ext.summary()["crc32c_hw"], update_stages=stages, projection=lines, copies=copies,
                   projection_measured=measured, projection_sources=k2_projection.SOURCES, sizes_gib=sizes,
                   repeats=args.repeats, note=args.note, load_avg_before=load_before, load_avg_after=os.getloadavg())
    print_results(results, "# checkpoint engine: onload, apply, update, shm, copies, projection")
    write_results(args.json, results, env)
    if stages:
        for k in ("pipelined", "serial", "gloo_pipelined", "gloo_serial"):
            s = stages[k]
            print(f"update {k:14s}: wall {s['wall_s']:.3f} s = stage {s['stage_s']:.3f} + broadcast {s['broadcast_s']:.3f}"
                  f" + apply {s['apply_s']:.3f} (checksum {s['checksum_s']:.3f}) [{s['mode']}, {s['n_buckets']} buckets,"
                  f" {s['bytes_sent'] / 1e6:.0f} MB] (rank 0, stage sums overlap when pipelined)")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
