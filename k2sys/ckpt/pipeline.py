"""The update pipeline: trainer shards -> buckets -> broadcast -> reshard -> receiver.

    layouts (all_gather) -> plan + buckets (cached) -> receiver.begin
      -> for each bucket i:  stage(i+1) || broadcast(i) || apply(i-1)   (3 buffers)
      -> agree (every rank learns any failure) -> receiver.commit | receiver.abort + UpdateError

stage:     the owner packs its tensors into a staging buffer (CPU: one batched C++ copy into a
           pooled aligned buffer; GPU: H2D through the pinned ring) and writes the crc32c trailer.
broadcast: one torch.distributed broadcast per bucket (gloo on CPU, NCCL on GPU).
apply:     verify the trailer, then one batched strided copy of every plan op fed by the bucket
           into the receiver's staging tensors.
With too little staging memory for 3 buffers the pipeline runs 2 stages (stage || broadcast
then apply) or serially, and logs why.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from k2sys import ext
from k2sys.ckpt.apply import BucketApply, compile_buckets, op_slices, pack_bucket
from k2sys.ckpt.bucket import interleave_owners
from k2sys.ckpt.layout import Layout
from k2sys.ckpt.plan import ReshardPlan, plan_reshard, select_sources
from k2sys.ckpt.receiver import WeightReceiver, as_receiver
from k2sys.ckpt.transport import TRAILER_BYTES, BucketTransport, Failure, payload_crc, read_trailer, write_trailer
from k2sys.ckpt.types import Bucket, PlanError, TensorSpec, UpdateConfig, UpdateError

log = logging.getLogger("k2sys.ckpt")


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
    bytes_sent: int = 0
    bytes_applied: int = 0
    n_buckets: int = 0
    depth: int = 0
    version: int = 0
    mode: str = ""


@dataclass
class _Prepared:
    buckets: list[Bucket]
    compiled: list[BucketApply]
    dst_specs: dict[str, TensorSpec]
    slot_bytes: int


class WeightUpdater:
    """Runs updates for one process group; keeps staging buffers and plans across updates."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, config: Optional[UpdateConfig] = None,
                 device: str | torch.device = "cpu"):
        self.group = group
        self.config = config or UpdateConfig()
        self.device = torch.device(device)
        self._cache: dict[tuple, _Prepared] = {}
        self._local_plan: dict[tuple, ReshardPlan] = {}
        self._pool = ext.StagingPool() if self.device.type == "cpu" else None
        self._onloader = ext.Onloader(self.device) if self.device.type == "cuda" else None
        self._slots: list[Any] = []

    # ------------------------------------------------------------------ planning
    def _prepare(self, tr: BucketTransport, shards: TrainerShards, dst: Layout) -> _Prepared:
        fps = tr.gather_objects(shards.layout.fingerprint)
        key = (tuple(fps), dst.fingerprint, self.config.bucket_bytes)
        if key in self._cache:
            return self._cache[key]
        layouts = tr.gather_objects(shards.layout)
        sources = dict(enumerate(layouts))
        chosen = select_sources(sources)
        per_owner: dict[int, list[TensorSpec]] = {r: [] for r in sources}
        for r, lay in sources.items():  # layout order, so every rank packs identically
            per_owner[r] = [spec for name, spec in lay.tensors.items() if (r, name) in chosen]
        buckets = interleave_owners(per_owner, self.config.bucket_bytes)
        plan = plan_reshard(sources, dst)
        prepared = _Prepared(buckets, compile_buckets(plan, buckets), dict(dst.tensors),
                             max((b.nbytes for b in buckets), default=0) + TRAILER_BYTES)
        self._cache = {key: prepared}  # one live plan: layouts rarely change between updates
        return prepared

    def _depth(self, slot_bytes: int) -> int:
        want = 3 if self.config.pipeline else 1
        budget = self.config.max_staging_bytes
        if budget is None:
            return want
        fits = budget // slot_bytes
        if fits < 1:
            raise UpdateError(f"weight update: max_staging_bytes={budget} cannot hold one bucket of {slot_bytes} "
                              f"bytes; raise max_staging_bytes or lower bucket_bytes")
        if fits < want:
            log.warning("weight update: staging memory %d B holds %d bucket buffer(s) of %d B; running %s instead of "
                        "the 3-stage pipeline", budget, fits, slot_bytes, "2 stages" if fits == 2 else "serially")
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

    # ------------------------------------------------------------------ the update
    def update(self, shards: TrainerShards, receiver: WeightReceiver) -> UpdateReport:
        cfg = self.config
        t_start = time.perf_counter()
        world = dist.get_world_size(self.group) if dist.is_initialized() else 1
        if world == 1 and callable(getattr(receiver, "target", None)) and cfg.fault is None:
            return self._update_local(shards, receiver, t_start)
        tr = BucketTransport(self.group, cfg.timeout_s)
        prep = self._prepare(tr, shards, receiver.layout)
        depth = self._depth(prep.slot_bytes)
        bufs = self._buffers(depth, prep.slot_bytes)
        threads = cfg.copy_threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", tr.world)))
        rep = UpdateReport(n_buckets=len(prep.buckets), depth=depth,
                           mode={3: "3-stage", 2: "2-stage", 1: "serial"}[depth],
                           bytes_sent=sum(b.nbytes for b in prep.buckets))
        failure: list[Optional[Failure]] = [None]
        receiver.begin(prep.dst_specs)
        try:
            fast = callable(getattr(receiver, "target", None))
            dst_addrs = (torch.tensor([receiver.target(n).data_ptr() for n in prep.compiled[0].dst_names],
                                      dtype=torch.int64) if fast and prep.compiled else None)

            def fail(bucket: Bucket, reason: str) -> None:
                if failure[0] is None:
                    failure[0] = Failure(bucket.index, bucket.owner, reason)
                    log.error("weight update: bucket %d (rank %d) failed on rank %d: %s",
                              bucket.index, bucket.owner, tr.rank, reason)

            def stage(i: int) -> None:
                b = prep.buckets[i]
                if b.owner != tr.rank:
                    return
                t0 = time.perf_counter()
                buf = bufs[i % depth]
                try:
                    self._pack(b, shards.tensors, buf, threads)
                    t1 = time.perf_counter()
                    write_trailer(buf, b.nbytes, payload_crc(buf, b.nbytes, threads) if cfg.checksum else 0)
                    rep.checksum_s += time.perf_counter() - t1
                except Exception as e:  # keep broadcasting: the receivers' checksums will fail
                    fail(b, f"staging failed on the owner: {type(e).__name__}: {e}")
                rep.stage_s += time.perf_counter() - t0

            def broadcast(i: int) -> None:
                b = prep.buckets[i]
                if cfg.fault and cfg.fault.kind == "die" and cfg.fault.bucket == i and cfg.fault.rank == tr.rank:
                    log.error("fault drill: rank %d exits before broadcast of bucket %d", tr.rank, i)
                    os._exit(17)
                drill = cfg.fault and cfg.fault.kind == "corrupt" and cfg.fault.bucket == i and cfg.fault.rank == tr.rank
                if drill and b.owner == tr.rank:
                    bufs[i % depth][0] ^= 0xFF  # drill: corrupted after the checksum, before sending
                t0 = time.perf_counter()
                tr.wait(tr.broadcast_async(bufs[i % depth][:b.nbytes + TRAILER_BYTES], b.owner), i, b.owner)
                rep.broadcast_s += time.perf_counter() - t0
                if drill and b.owner != tr.rank:
                    bufs[i % depth][0] ^= 0xFF  # drill: a bit flipped in transit

            def apply(i: int) -> None:
                b, comp = prep.buckets[i], prep.compiled[i]
                buf = bufs[i % depth]
                t0 = time.perf_counter()
                try:
                    # The owner's buffer never travelled: only receivers verify.
                    if cfg.checksum and b.owner != tr.rank:
                        got, want = payload_crc(buf, b.nbytes, threads), read_trailer(buf, b.nbytes)
                        rep.checksum_s += time.perf_counter() - t0
                        if got != want:
                            fail(b, f"checksum mismatch (crc32c {got:#010x} != sent {want:#010x}, {b.nbytes} bytes)")
                            return
                    if failure[0] is not None:
                        return  # the update is lost anyway; do not spend time applying
                    if fast:
                        if comp.rows.shape[0]:
                            ext.batched_strided_copy_(comp.absolute_rows(buf.data_ptr(), dst_addrs), self.device,
                                                      threads)
                    else:
                        for name, slices in op_slices(b, buf, comp.ops).items():
                            receiver.apply(name, slices)
                    rep.bytes_applied += comp.nbytes
                except Exception as e:
                    fail(b, f"apply failed: {type(e).__name__}: {e}")
                finally:
                    rep.apply_s += time.perf_counter() - t0

            self._schedule(len(prep.buckets), depth, stage, broadcast, apply)
            tr.agree(failure[0])
        except BaseException:
            receiver.abort()
            raise
        receiver.commit()
        rep.version = getattr(receiver, "version", 0)
        rep.wall_s = time.perf_counter() - t_start
        return rep

    def _update_local(self, shards: TrainerShards, receiver: WeightReceiver, t_start: float) -> UpdateReport:
        """One process holds every source shard (colocated, world size 1): each plan copy goes
        straight from the source view into the receiver's staging tensor, in one native batched
        call. No bucket staging, broadcast or checksum: the bytes never leave this process."""
        key = ("local", shards.layout.fingerprint, receiver.layout.fingerprint)
        plan = self._local_plan.get(key)
        if plan is None:
            plan = plan_reshard({0: shards.layout}, receiver.layout)
            self._local_plan = {key: plan}  # one live plan, as for the distributed path
        rep = UpdateReport(n_buckets=0, depth=1, mode="local")
        receiver.begin(dict(receiver.layout.tensors))
        try:
            t0 = time.perf_counter()
            # boxes agree up to unit dims (CopyOp checks it): compare squeezed views
            pairs = [(op.dst_box.view(receiver.target(op.dst_name)).squeeze(),
                      op.src_box.view(shards.tensors[op.src_name]).squeeze()) for op in plan.ops]
            if self.device.type == "cpu" and all(src.device.type == "cpu" for _, src in pairs):
                ext.batched_view_copy_(pairs, self.config.copy_threads)
            else:
                for dst, src in pairs:
                    dst.copy_(src, non_blocking=True)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            rep.apply_s = time.perf_counter() - t0
            rep.bytes_applied = rep.bytes_sent = plan.nbytes
        except BaseException:
            receiver.abort()
            raise
        receiver.commit()
        rep.version = getattr(receiver, "version", 0)
        rep.wall_s = time.perf_counter() - t_start
        return rep

    def _pack(self, b: Bucket, tensors: Mapping[str, torch.Tensor], buf: torch.Tensor, threads: int) -> None:
        if self.device.type == "cpu":
            pack_bucket(b, tensors, buf, threads)
            return
        for e in b.entries:  # GPU: H2D each tensor into its slot through the pinned ring
            if e.nbytes:
                src = tensors[e.name].contiguous().view(-1).view(torch.uint8)
                self._onloader.submit(buf[e.offset:e.offset + e.nbytes], src)
        self._onloader.synchronize()

    @staticmethod
    def _schedule(n: int, depth: int, stage, broadcast, apply) -> None:
        """Lock-step schedule; collectives are issued only from this thread, in bucket order."""
        if depth == 1:
            for i in range(n):
                stage(i)
                broadcast(i)
                apply(i)
            return
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="k2-ckpt") as pool:
            if depth == 2:  # stage(t) || [broadcast(t-1) -> apply(t-1)]
                for t in range(n + 1):
                    fs = pool.submit(stage, t) if t < n else None
                    if t >= 1:
                        broadcast(t - 1)
                        apply(t - 1)
                    if fs:
                        fs.result()
                return
            for t in range(n + 2):  # stage(t) || broadcast(t-1) || apply(t-2)
                fs = pool.submit(stage, t) if t < n else None
                fa = pool.submit(apply, t - 2) if 0 <= t - 2 < n else None
                try:
                    if 0 <= t - 1 < n:
                        broadcast(t - 1)
                finally:
                    for f in (fs, fa):
                        if f:
                            f.result()


_UPDATERS: dict[tuple, WeightUpdater] = {}
_ADAPTERS: "weakref.WeakKeyDictionary[Any, WeightReceiver]" = weakref.WeakKeyDictionary()


def update_weights(trainer_shards: TrainerShards, engine: Any, *, layout: Optional[Layout] = None,
                   group: Optional[dist.ProcessGroup] = None, config: Optional[UpdateConfig] = None,
                   device: str | torch.device = "cpu") -> UpdateReport:
    """The coordinator's one call: move this rank's trainer shards into `engine` on every rank.

    `engine` is a WeightReceiver (e.g. InProcessReceiver) or any engine with
    begin_weight_update / update_weights_from_tensor / end_weight_update (then `layout`, or
    the engine's weight_layout(), names what it loads). Collective over `group`: every rank
    calls it with its own shards and engine. Raises UpdateError on every rank if any rank
    fails; the engines then keep their previous weights and version.
    """
    cfg = config or UpdateConfig()
    receiver = _ADAPTERS.get(engine) if not isinstance(engine, WeightReceiver) else None
    if receiver is None or (layout is not None and receiver.layout is not layout):
        receiver = as_receiver(engine, layout, device)
        if receiver is not engine:
            try:  # keep the adapter (and its staging tensors) for the next update
                _ADAPTERS[engine] = receiver
            except TypeError:
                pass
    key = (id(group), str(torch.device(device)), repr(cfg))
    upd = _UPDATERS.get(key)
    if upd is None:
        upd = _UPDATERS[key] = WeightUpdater(group, cfg, device)
    return upd.update(trainer_shards, receiver)
