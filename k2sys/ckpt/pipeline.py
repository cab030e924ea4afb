"""The update pipeline: trainer shards -> buckets -> broadcast -> reshard -> sink (the one entry).

    update_weights(shards, sink)
      layouts (all_gather) -> sink.destination -> plan + buckets (cached) -> sink.begin
        -> a ring of 4 bucket buffers (k2sys.ckpt.schedule):
             stage(i + k) || broadcast(i), broadcast(i + 1) in flight || apply(i - 1)
             apply(i): verify crc32c, one batched strided copy of every plan op fed by bucket i
                       straight into sink.target() memory, then sink.ready(tensors it completed)
        -> agree (every rank learns any failure) -> sink.commit | sink.abort + UpdateError

stage:     the owner packs its tensors into a staging buffer (CPU: one batched C++ copy into a
           pooled aligned buffer; GPU: H2D through the pinned ring) and writes the crc32c trailer.
broadcast: one torch.distributed broadcast per bucket (gloo on CPU, NCCL on GPU); between CPU ranks
           on one host (UpdateConfig.transport="auto" or "shm") the owner packs into its slot of a
           shared-memory ring and publishes it, and receivers apply from there (k2sys.ckpt.shm_ring).
apply:     into the sink's memory: the engine's weights (in-process native engine), or the
           out-buckets a forwarding sink sends on as they complete, so the engine applies bucket i
           while bucket i+1 is broadcast; there is no full-model staging copy on the way.
One process holding every shard (world size 1, the colocated trainer) skips buckets, broadcast
and checksums: each plan copy goes from the trainer's (host) tensors straight into the sink.
With too little staging memory for 4 buffers the ring runs on what fits (3: one broadcast in
flight; 2: stage and apply share the other buffer), or serially on 1, and logs why; pipeline=False
runs serially (one bucket at a time, nothing overlapped).

Why two broadcasts in flight: one broadcast at a time leaves the link idle between buckets while
the next owner's stage and the receivers' apply finish, and the lock step makes every bucket
wait for the slowest of the three stages; with buckets of alternating owners in flight, both
directions of a 2-rank link carry data at once.

Bytes copied (UpdateReport.bytes_copied) counts every byte written on the way from the
trainer's tensors to the engine's weights on this rank, the engine's own copies included (as
the sink reports them); copy_ratio divides it by the destination's bytes.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from k2sys import ext
from k2sys.ckpt.apply import BucketApply, compile_buckets, completions, op_slices
from k2sys.ckpt.bucket import PieceTensors, RowPiece, fill_bucket, interleave_owners, split_rows
from k2sys.ckpt.layout import Layout
from k2sys.ckpt.plan import ReshardPlan, plan_on_pieces, plan_reshard, select_sources
from k2sys.ckpt.schedule import run_coop, run_ring, run_serial
from k2sys.ckpt.shm_ring import ShmRings, open_rings
from k2sys.ckpt.sink import NullSink, WeightSink, global_specs
from k2sys.ckpt.transport import TRAILER_BYTES, BucketTransport, Failure, payload_crc, read_trailer, write_trailer
from k2sys.ckpt.types import Bucket, PlanError, TensorSpec, UpdateConfig, UpdateError

log = logging.getLogger("k2sys.ckpt")

PIPELINE_BUFFERS = 4
"""Bucket buffers of the pipelined update: one being staged, two broadcasts in flight, one applied."""


@dataclass
class TrainerShards:
    """What one rank contributes: its local tensors and the layout that names them."""

    layout: Layout
    tensors: Mapping[str, torch.Tensor]

    def __post_init__(self):
        for name, spec in self.layout.tensors.items():
            t = self.tensors.get(name)
            if t is None:
                raise PlanError(f"TrainerShards: layout {self.layout.name!r} declares {name} but no tensor is given")
            if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
                raise PlanError(f"TrainerShards: tensor {name} is {tuple(t.shape)} {t.dtype} but the layout says "
                                f"{spec.shape} {spec.dtype}")


@dataclass
class UpdateReport:
    """Timings (seconds, summed per stage over buckets) and sizes of one update on this rank."""

    wall_s: float = 0.0
    stage_s: float = 0.0
    broadcast_s: float = 0.0
    apply_s: float = 0.0
    checksum_s: float = 0.0
    commit_s: float = 0.0
    bytes_sent: int = 0
    """Bucket bytes broadcast (every rank's buckets; 0 in-process)."""
    bytes_applied: int = 0
    """Bytes written into the sink's memory by this rank."""
    bytes_copied: int = 0
    """Every byte copied on this rank on the way to the engine's weights, the engine's copies included."""
    model_bytes: int = 0
    """Bytes of this rank's destination tensors (what its engine receives)."""
    n_buckets: int = 0
    depth: int = 0
    version: Any = 0
    mode: str = ""
    """The schedule: "serial" (one bucket at a time), "2-stage" / "3-stage" (the broadcast ring,
    `depth` buffers), "coop" (shared-memory rings: one thread per rank packs ahead and applies,
    `depth` slots per rank)."""
    transport: str = ""
    """How bucket bytes travelled between ranks: "collective" (broadcasts) or "shm" (UpdateConfig.transport);
    "" for an update within one process."""

    @property
    def copy_ratio(self) -> float:
        return self.bytes_copied / self.model_bytes if self.model_bytes else 0.0


@dataclass
class _Prepared:
    buckets: list[Bucket]
    compiled: list[BucketApply]
    done: list[list[str]]
    empty: list[str]
    dst: Layout
    slot_bytes: int
    pieces: Mapping[str, RowPiece]  # this rank's row pieces (bucket entries that are parts of its tensors)


@dataclass
class _LocalChunk:
    """About bucket_bytes of destination tensors of an in-process update, their plan ops, and the
    copy table last built for them with the addresses it was built for (`sig`)."""

    names: list[str]
    ops: list
    sig: Optional[tuple] = None
    rows: Optional[torch.Tensor] = None


def _sink_copies(sink: Any) -> int:
    """Bytes the sink's engine copied itself during the last session (0 when it does not say)."""
    get = getattr(sink, "engine_bytes_copied", None)
    if callable(get):
        return int(get() or 0)
    return int(getattr(sink, "bytes_copied", 0) or 0)


class WeightUpdater:
    """Runs updates for one process group; keeps staging buffers and plans across updates."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, config: Optional[UpdateConfig] = None,
                 device: str | torch.device = "cpu"):
        self.group = group
        self.config = config or UpdateConfig()
        self.device = torch.device(device)
        self._cache: dict[tuple, _Prepared] = {}
        self._sources: Optional[tuple] = None  # (gathered key, layouts by rank, global specs, buckets, row pieces)
        self._local_plan: dict[tuple, tuple[ReshardPlan, list[_LocalChunk]]] = {}
        self._pool = ext.StagingPool() if self.device.type == "cpu" else None
        self._onloader = ext.Onloader(self.device) if self.device.type == "cuda" else None
        self._slots: list[Any] = []
        self._shm: Optional[ShmRings] = None  # k2sys.ckpt.shm_ring, for ranks on one host
        self._shm_key: Optional[tuple] = None
        self._shm_why = ""

    # ------------------------------------------------------------------ planning
    def _prepare(self, tr: BucketTransport, shards: TrainerShards, sink: WeightSink) -> _Prepared:
        """Buckets (collective: every rank decides from the same gathered fingerprints whether to
        exchange layouts again) and this rank's plan into its sink's destination (local)."""
        fps = tr.gather_objects(shards.layout.fingerprint)
        key = (tuple(fps), self.config.bucket_bytes)
        if self._sources is None or self._sources[0] != key:
            layouts = tr.gather_objects(shards.layout)
            sources = dict(enumerate(layouts))
            chosen = select_sources(sources)
            per_owner: dict[int, list[TensorSpec]] = {r: [] for r in sources}
            pieces: dict[int, dict[str, RowPiece]] = {}
            for r, lay in sources.items():  # layout order, so every rank packs identically
                # tensors larger than a bucket travel as row pieces: buckets and slots stay within the cap
                per_owner[r], pieces[r] = split_rows([spec for name, spec in lay.tensors.items()
                                                      if (r, name) in chosen], self.config.bucket_bytes)
            self._sources = (key, sources, global_specs(layouts),
                             interleave_owners(per_owner, self.config.bucket_bytes), pieces)
        _, sources, specs, buckets, pieces = self._sources
        dst = sink.destination(specs)
        hit = self._cache.get((key, dst.fingerprint))
        if hit is not None:
            return hit
        plan = plan_on_pieces(plan_reshard(sources, dst), pieces)
        compiled = compile_buckets(plan, buckets)
        done, empty = completions(plan, compiled)
        prepared = _Prepared(buckets, compiled, done, empty, dst,
                             max((b.nbytes for b in buckets), default=0) + TRAILER_BYTES, pieces.get(tr.rank, {}))
        self._cache = {(key, dst.fingerprint): prepared}  # one live plan: layouts rarely change between updates
        return prepared

    def _depth(self, slot_bytes: int) -> int:
        want = PIPELINE_BUFFERS if self.config.pipeline else 1
        budget = self.config.max_staging_bytes
        if budget is None:
            return want
        fits = budget // slot_bytes
        if fits < 1:
            raise UpdateError(f"weight update: max_staging_bytes={budget} cannot hold one bucket of {slot_bytes} "
                              f"bytes; raise max_staging_bytes or lower bucket_bytes")
        if fits < want:
            log.warning("weight update: staging memory %d B holds %d bucket buffer(s) of %d B (the pipeline wants %d); "
                        "running %s", budget, fits, slot_bytes, want,
                        "serially" if fits == 1 else "2 stages" if fits == 2 else "3 stages, one broadcast in flight")
        return min(want, fits)

    def _buffers(self, depth: int, slot_bytes: int) -> list[torch.Tensor]:
        for s in self._slots:
            if self._pool is not None:
                s.release()
        self._slots = []
        if self._pool is not None:
            self._slots = [self._pool.acquire(slot_bytes) for _ in range(depth)]
            return [s.tensor for s in self._slots]
        return [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(depth)]

    def _rings(self, tr: BucketTransport, depth: int, slot_bytes: int) -> Optional[ShmRings]:
        """The shared-memory rings of this group (UpdateConfig.transport), or None for broadcasts.
        Collective: every rank decides alike (the rings are opened, or refused, on all of them)."""
        mode = self.config.transport
        if mode == "collective" or (mode == "auto" and self.device.type != "cpu"):
            return None
        if self.device.type != "cpu":
            raise UpdateError(f"UpdateConfig.transport='shm' moves CPU buckets; this update stages on "
                              f"{self.device} (use 'auto' or 'collective': NCCL)")
        key = (tr.world, depth, (slot_bytes + 63) // 64 * 64)
        if self._shm_key != key:
            if self._shm is not None:
                self._shm.close()
            self._shm, why = open_rings(tr, depth, slot_bytes)
            self._shm_key = key
            if self._shm is None:
                log.info("weight update: shared-memory transport unavailable (%s); broadcasting", why)
                self._shm_why = why
        if self._shm is None and mode == "shm":
            raise UpdateError(f"UpdateConfig.transport='shm': {self._shm_why}; use 'auto' or 'collective'")
        return self._shm

    # ------------------------------------------------------------------ the update
    def update(self, shards: TrainerShards, sink: Optional[WeightSink]) -> UpdateReport:
        cfg = self.config
        sink = NullSink() if sink is None else sink
        if not isinstance(sink, WeightSink):
            raise TypeError(f"update_weights: {type(sink).__name__} is not a weight sink; pass a WeightSink "
                            "(k2sys.ckpt.sink / k2sys.ckpt.engine_sinks) or an engine sink_for() knows")
        t_start = time.perf_counter()
        world = dist.get_world_size(self.group) if dist.is_initialized() else 1
        if world == 1 and cfg.fault is None:
            return self._update_local(shards, sink, t_start)
        tr = BucketTransport(self.group, cfg.timeout_s)
        prep = self._prepare(tr, shards, sink)
        depth = self._depth(prep.slot_bytes)
        rings = self._rings(tr, depth, prep.slot_bytes)
        bufs = self._buffers(depth, prep.slot_bytes) if rings is None else []
        if rings is not None:
            rings.begin()
            rings.set_owners([b.owner for b in prep.buckets])

        def buf_of(i: int) -> torch.Tensor:  # bucket i's buffer: the owner's shared slot, or this rank's own
            return rings.slot(prep.buckets[i].owner, i) if rings is not None else bufs[i % depth]
        threads = cfg.copy_threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", tr.world)))
        rep = UpdateReport(n_buckets=len(prep.buckets), depth=depth,
                           mode="serial" if depth == 1 else "coop" if rings is not None else
                           "2-stage" if depth == 2 else "3-stage",
                           transport="collective" if rings is None else "shm",
                           bytes_sent=sum(b.nbytes for b in prep.buckets), model_bytes=prep.dst.nbytes)
        tensors = PieceTensors(shards.tensors, prep.pieces) if prep.pieces else shards.tensors
        failure: list[Optional[Failure]] = [None]
        staged, received = [0], [0]  # bytes packed (stage thread) / received (broadcast thread) on this rank
        sink.begin()
        try:
            for n in prep.empty:  # destination tensors no byte travels for (empty tensors)
                sink.target(n)
            if prep.empty:
                sink.ready(prep.empty)

            def fail(bucket: Bucket, reason: str) -> None:
                if failure[0] is None:
                    failure[0] = Failure(bucket.index, bucket.owner, reason)
                    log.error("weight update: bucket %d (rank %d) failed on rank %d: %s",
                              bucket.index, bucket.owner, tr.rank, reason)

            def drill(i: int) -> bool:
                return bool(cfg.fault and cfg.fault.kind == "corrupt" and cfg.fault.bucket == i
                            and cfg.fault.rank == tr.rank)

            def stage(i: int) -> None:
                b = prep.buckets[i]
                if b.owner != tr.rank:
                    return
                t0 = time.perf_counter()
                buf = buf_of(i)
                try:
                    if rings is not None:  # the slot's previous bucket has been applied everywhere
                        rings.wait_slot_free(i, cfg.timeout_s)
                        t0 = time.perf_counter()  # stage_s: packing time, not waiting for the peers
                    crc = self._pack(b, tensors, buf, threads, cfg.checksum)  # CPU: crc fused in
                    staged[0] += b.nbytes
                    t1 = time.perf_counter()
                    if cfg.checksum and crc is None:
                        crc = payload_crc(buf, b.nbytes, threads)
                    write_trailer(buf, b.nbytes, crc or 0)
                    rep.checksum_s += time.perf_counter() - t1
                except Exception as e:  # keep broadcasting: the receivers' checksums will fail
                    fail(b, f"staging failed on the owner: {type(e).__name__}: {e}")
                rep.stage_s += time.perf_counter() - t0

            def issue(i: int):
                b = prep.buckets[i]
                if cfg.fault and cfg.fault.kind == "die" and cfg.fault.bucket == i and cfg.fault.rank == tr.rank:
                    log.error("fault drill: rank %d exits before broadcast of bucket %d", tr.rank, i)
                    os._exit(17)
                if drill(i) and b.owner == tr.rank:
                    buf_of(i)[0] ^= 0xFF  # drill: corrupted after the checksum, before sending
                issued[i] = time.perf_counter()
                if rings is not None:
                    if b.owner == tr.rank:
                        rings.publish(i)
                    return None
                return tr.broadcast_async(bufs[i % depth][:b.nbytes + TRAILER_BYTES], b.owner)

            def land(i: int, work) -> None:
                b = prep.buckets[i]
                if rings is None:
                    tr.wait(work, i, b.owner)
                elif b.owner != tr.rank:
                    rings.wait_published(b.owner, i, cfg.timeout_s)
                # from issue to landing: with several in flight this counts overlapping time once each
                rep.broadcast_s += time.perf_counter() - issued[i]
                if b.owner != tr.rank and rings is None:
                    received[0] += b.nbytes  # landed in this rank's buffer (shm: read where the owner wrote it)
                if drill(i) and b.owner != tr.rank:
                    buf_of(i)[0] ^= 0xFF  # drill: a bit flipped in transit

            def apply(i: int) -> None:
                b, comp = prep.buckets[i], prep.compiled[i]
                buf = buf_of(i)
                t0 = time.perf_counter()
                try:
                    if failure[0] is not None:
                        return  # the update is lost anyway; do not spend time applying
                    # The owner's buffer never travelled: only receivers verify.
                    verify = cfg.checksum and b.owner != tr.rank
                    targets = [sink.target(n) for n in comp.dst_names] if comp.rows.shape[0] else []
                    local = bool(targets) and all(t.device == buf.device for t in targets)
                    rows = None
                    if local:
                        addrs = torch.tensor([t.data_ptr() for t in targets], dtype=torch.int64)
                        rows = comp.absolute_rows(buf.data_ptr(), addrs)
                    got = None
                    if verify and rows is not None and buf.device.type == "cpu":
                        # verify and apply in one pass over the bucket: each piece is hashed, then
                        # copied from cache. A mismatch then leaves bytes in the sink's memory, as a
                        # failure in a later bucket would: the update is aborted and these tensors are
                        # never reported ready (sinks keep their live weights, or mark them stale).
                        got = ext.batched_strided_copy_crc_(rows, buf[:b.nbytes], True, threads)
                        applied = got is not None
                    else:
                        applied = False
                    if verify:
                        if got is None:
                            got = payload_crc(buf, b.nbytes, threads)
                            rep.checksum_s += time.perf_counter() - t0
                        want = read_trailer(buf, b.nbytes)
                        if got != want:
                            fail(b, f"checksum mismatch (crc32c {got:#010x} != sent {want:#010x}, {b.nbytes} bytes)")
                            return
                    if rows is not None and not applied:
                        ext.batched_strided_copy_(rows, self.device, threads)
                    elif targets and not local:  # sink memory on another device (e.g. CPU buckets, CUDA engine)
                        by_name = dict(zip(comp.dst_names, targets))
                        for name, slices in op_slices(b, buf, comp.ops).items():
                            for box, src in slices:
                                box.view(by_name[name]).copy_(src)
                    rep.bytes_applied += comp.nbytes
                    if prep.done[i]:
                        sink.ready(prep.done[i])
                except Exception as e:
                    fail(b, f"apply failed: {type(e).__name__}: {e}")
                finally:
                    rep.apply_s += time.perf_counter() - t0
                    if rings is not None:
                        rings.ack(i)  # the owner may reuse the slot once every rank has said so

            issued: dict[int, float] = {}

            def stage_publish(i: int) -> None:  # shm: the owner publishes as soon as it has staged
                stage(i)
                issue(i)

            def before(i: int) -> None:  # shm: a receiver's issue (timing, the die drill) as bucket i comes up
                if prep.buckets[i].owner != tr.rank:
                    issue(i)

            def land_apply(i: int) -> None:
                land(i, None)
                apply(i)

            if depth == 1:
                run_serial(len(prep.buckets), stage, issue, land, apply)
            elif rings is not None:
                run_coop(len(prep.buckets), lambda i: prep.buckets[i].owner == tr.rank, rings.slot_free,
                         stage_publish, lambda i: rings.published(prep.buckets[i].owner, i), land_apply,
                         lambda pred, i: rings.wait_until(pred, "publish (or free a slot before)", i, cfg.timeout_s),
                         before)
            else:
                run_ring(len(prep.buckets), depth, lambda i: prep.buckets[i].owner == tr.rank, stage, issue, land,
                         apply)
            tr.agree(failure[0])
        except BaseException:
            sink.abort()
            raise
        t0 = time.perf_counter()
        rep.version = sink.commit()
        rep.commit_s = time.perf_counter() - t0
        rep.bytes_copied = staged[0] + received[0] + rep.bytes_applied + _sink_copies(sink)
        rep.wall_s = time.perf_counter() - t_start
        return rep

    def _update_local(self, shards: TrainerShards, sink: WeightSink, t_start: float) -> UpdateReport:
        """One process holds every source shard (colocated, world size 1): each plan copy goes
        straight from the source view into the sink's memory, one native batched call per chunk
        of about bucket_bytes (then those tensors are ready). No bucket staging, broadcast or
        checksum: the bytes never leave this process.

        A chunk's copy table (strided rows between absolute addresses) is kept with the plan and
        reused while its source and target tensors sit at the same addresses: the trainer's host
        buffers persist, and the host arena gives the engine's storages back their previous memory,
        so a colocated update builds no view in Python after the first."""
        dst = sink.destination(global_specs([shards.layout]))
        key = ("local", shards.layout.fingerprint, dst.fingerprint, self.config.bucket_bytes)
        local = self._local_plan.get(key)
        if local is None:
            plan = plan_reshard({0: shards.layout}, dst)
            by_dst: dict[str, list] = {}
            for op in plan.ops:
                by_dst.setdefault(op.dst_name, []).append(op)
            chunks, chunk, used = [], [], 0
            for name, spec in dst.tensors.items():
                chunk.append(name)
                used += spec.nbytes
                if used >= self.config.bucket_bytes:
                    chunks.append(_LocalChunk(chunk, [op for n in chunk for op in by_dst.get(n, ())]))
                    chunk, used = [], 0
            if chunk:
                chunks.append(_LocalChunk(chunk, [op for n in chunk for op in by_dst.get(n, ())]))
            local = (plan, chunks)
            self._local_plan = {key: local}  # one live plan, as for the distributed path
        plan, chunks = local
        rep = UpdateReport(n_buckets=0, depth=1, mode="local", model_bytes=dst.nbytes)
        sink.begin()
        try:
            t0 = time.perf_counter()
            for c in chunks:
                self._copy_local(c, shards, sink)
            rep.apply_s = time.perf_counter() - t0
            rep.bytes_applied = rep.bytes_copied = plan.nbytes
        except BaseException:
            sink.abort()
            raise
        t0 = time.perf_counter()
        rep.version = sink.commit()
        rep.commit_s = time.perf_counter() - t0
        rep.bytes_copied += _sink_copies(sink)
        rep.wall_s = time.perf_counter() - t_start
        return rep

    def _copy_local(self, c: "_LocalChunk", shards: TrainerShards, sink: WeightSink) -> None:
        targets = {name: sink.target(name) for name in c.names}  # every target is asked for, every update
        srcs = [shards.tensors[op.src_name] for op in c.ops]
        dsts = [targets[op.dst_name] for op in c.ops]
        if all(t.device.type == "cpu" for t in dsts + srcs):
            sig = tuple((t.data_ptr(), t.stride()) for t in dsts + srcs)
            if sig != c.sig:
                # boxes agree up to unit dims (CopyOp checks it): compare squeezed views
                pairs = [(op.dst_box.view(d).squeeze(), op.src_box.view(s).squeeze())
                         for op, d, s in zip(c.ops, dsts, srcs)]
                c.rows, c.sig = (ext.view_copy_rows(pairs) if pairs else None), sig
            if c.rows is not None:
                ext.batched_strided_copy_(c.rows, "cpu", self.config.copy_threads)
        else:
            for op, d, s in zip(c.ops, dsts, srcs):
                op.dst_box.view(d).squeeze().copy_(op.src_box.view(s).squeeze(), non_blocking=True)
            for dev in {t.device for t in dsts + srcs if t.device.type == "cuda"}:
                torch.cuda.synchronize(dev)
        sink.ready(c.names)

    def _pack(self, b: Bucket, tensors: Mapping[str, torch.Tensor], buf: torch.Tensor, threads: int,
              checksum: bool = False) -> Optional[int]:
        """Pack bucket b into buf; on CPU with `checksum`, the payload's crc32c computed in the same
        pass (None otherwise: the caller hashes)."""
        if self.device.type == "cpu":
            return fill_bucket(b, tensors, buf, threads, checksum=checksum)
        for e in b.entries:  # GPU: H2D each tensor into its slot through the pinned ring
            if e.nbytes:
                src = tensors[e.name].contiguous().view(-1).view(torch.uint8)
                self._onloader.submit(buf[e.offset:e.offset + e.nbytes], src)
        self._onloader.synchronize()
        return None


_UPDATERS: dict[tuple, WeightUpdater] = {}
_SINKS: "weakref.WeakKeyDictionary[Any, WeightSink]" = weakref.WeakKeyDictionary()


def as_sink(engine: Any) -> WeightSink:
    """`engine` itself when it is a WeightSink (None: a rank without an engine), else the sink of
    its transport (k2sys.ckpt.engine_sinks.sink_for), kept per engine for the next update."""
    if engine is None:
        return NullSink()
    if isinstance(engine, WeightSink):
        return engine
    sink = _SINKS.get(engine)
    if sink is None:
        from k2sys.ckpt.engine_sinks import sink_for

        sink = sink_for(engine)
        try:
            _SINKS[engine] = sink
        except TypeError:
            pass
    return sink


def update_weights(trainer_shards: TrainerShards, sink: Any, *, group: Optional[dist.ProcessGroup] = None,
                   config: Optional[UpdateConfig] = None, device: str | torch.device = "cpu") -> UpdateReport:
    """The coordinator's one call: move this rank's trainer shards into its engine, every rank.

    `sink` is the engine side of the transport (k2sys.ckpt.sink: TensorSink, NullSink;
    k2sys.ckpt.engine_sinks: NativeEngineSink, NativeServerSink, SGLangTensorSink,
    SGLangDistributedSink), an engine object (its sink is picked by sink_for), or None on a rank
    that only sends. Collective over `group`: every rank calls it with its own shards. Raises
    UpdateError on every rank if any rank fails; the engines then keep their previous weights
    and version (or, released and resumed, stay marked stale until an update succeeds).
    """
    cfg = config or UpdateConfig()
    key = (id(group), str(torch.device(device)), repr(cfg))
    upd = _UPDATERS.get(key)
    if upd is None:
        upd = _UPDATERS[key] = WeightUpdater(group, cfg, device)
    return upd.update(trainer_shards, as_sink(sink))
