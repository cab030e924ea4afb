"""Sinks: the engine side of a weight update, one class per transport.

    update_weights(shards, sink)                     (k2sys.ckpt.pipeline, the one entry)
      sink.destination(sources) -> Layout   which global tensors this rank's engine takes, named and
                                            ordered as the engine wants them, in the dtype they arrive in
      sink.begin()                          open the engine's update session
      sink.target(name) -> Tensor           memory the bytes of `name` are written into, before its first
                                            byte arrives: engine-owned wherever the transport allows it
      sink.ready(names)                     these tensors are complete (FP8: quantize them; forwarding
                                            sinks: send every bucket whose tensors are all complete)
      sink.commit() -> version              the engine publishes the whole session ...
      sink.abort()                          ... or discards it: previous weights and version kept

The pipeline writes every byte once into `target()` memory. Which memory that is decides the
copy count of a transport (UpdateReport.bytes_copied, benchmarks/bench_update.py):
  NativeEngineSink (in-process)    the engine's own weight storage when its weights are stale
                                   (released and resumed: the colocated cycle), else the session's
                                   staging tensors (old weights keep serving until commit)
  forwarding sinks (BucketSink)    out-buckets in transport memory (a /dev/shm segment, a CUDA
                                   buffer behind an IPC handle, an NCCL send buffer); the engine
                                   copies each bucket into its weights on arrival
  TensorSink                       a dict of tensors (tests, startup loading, peer loading)

Engine sinks live in k2sys.ckpt.engine_sinks; this module has the protocol and the generic ones.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, runtime_checkable

import torch

from k2sys import ext
from k2sys.ckpt.bucket import FlattenedBucket, plan_buckets
from k2sys.ckpt.layout import Layout, hf_layout
from k2sys.ckpt.types import Bucket, PlanError, TensorSpec, UpdateError


@runtime_checkable
class WeightSink(Protocol):
    """What an update target implements (see the module doc)."""

    def destination(self, sources: Mapping[str, TensorSpec]) -> Layout: ...

    def begin(self) -> None: ...

    def target(self, name: str) -> torch.Tensor: ...

    def ready(self, names: Sequence[str]) -> None: ...

    def commit(self) -> Any: ...

    def abort(self) -> None: ...


def global_specs(layouts: Sequence[Layout]) -> dict[str, TensorSpec]:
    """{global name: spec} of every global tensor the source layouts hold, in first-seen order,
    with the dtype of the local tensor that holds it (what arrives at the sink)."""
    out: dict[str, TensorSpec] = {}
    for lay in layouts:
        for p in lay.pieces:
            dtype = lay.tensors[p.local_name].dtype
            prev = out.get(p.global_name)
            if prev is None:
                out[p.global_name] = TensorSpec(p.global_name, p.global_shape, dtype)
            elif prev.dtype != dtype:
                raise PlanError(f"global tensor {p.global_name} is {prev.dtype} in one source layout and {dtype} in "
                                f"{lay.name!r}; every trainer rank must send one dtype")
    return out


class TensorSink:
    """A dict of live tensors under a fixed layout (tests, startup loading, peer loading).

    Writes go into staging tensors kept between updates; commit() publishes them: in_place=True
    copies staging into the existing live tensors (their storage stays, so holders of references
    see the new values), in_place=False swaps the staging and live dicts (no copy; the previous
    weights become the next update's staging). abort() leaves the live tensors as they were.
    """

    def __init__(self, layout: Layout, device: str | torch.device = "cpu", in_place: bool = True):
        self.layout = layout
        self.device = torch.device(device)
        self.in_place = in_place
        self.weights: dict[str, torch.Tensor] = {}
        self.version = 0
        self.bytes_copied = 0
        """Bytes the last commit copied (staging -> live; 0 when swapping)."""
        self._staging: dict[str, torch.Tensor] = {}
        self._open = False

    def destination(self, sources: Mapping[str, TensorSpec]) -> Layout:
        return self.layout

    def begin(self) -> None:
        if self._open:
            raise UpdateError("sink: begin() called while an update is open; commit() or abort() it first")
        for name, s in self.layout.tensors.items():
            t = self._staging.get(name)
            if t is None or tuple(t.shape) != s.shape or t.dtype != s.dtype:
                self._staging[name] = torch.empty(s.shape, dtype=s.dtype, device=self.device)
        for name in set(self._staging) - set(self.layout.tensors):
            del self._staging[name]
        self._open = True
        self.bytes_copied = 0

    def target(self, name: str) -> torch.Tensor:
        if not self._open:
            raise UpdateError("sink: no update is open (call begin())")
        return self._staging[name]

    def ready(self, names: Sequence[str]) -> None:
        pass

    def commit(self) -> int:
        if not self._open:
            raise UpdateError("sink: commit() without begin()")
        try:
            self._publish()
        finally:  # a failed publish ends the update too (version kept); the next begin() may retry
            self._open = False
        self.version += 1
        return self.version

    def abort(self) -> None:
        self._open = False  # staging is simply not published; live weights were never touched

    def _publish(self) -> None:
        staged = self._staging
        if not self.in_place:
            old = self.weights
            self.weights = dict(staged)
            self._staging = {n: t for n, t in old.items() if n in staged}  # begin() fills in the rest
            return
        dsts, srcs = [], []
        for name, t in staged.items():
            live = self.weights.get(name)
            self.bytes_copied += t.numel() * t.element_size()
            if live is None or live.shape != t.shape or live.dtype != t.dtype:
                self.weights[name] = t.clone()
            elif t.device.type == "cpu":
                dsts.append(live)
                srcs.append(t)
            else:
                live.copy_(t)
        if dsts:
            ext.batched_host_copy(dsts, srcs)


class NullSink:
    """A rank that only sends its shards (no engine here): takes no tensors."""

    layout = Layout({}, (), "none")

    def destination(self, sources: Mapping[str, TensorSpec]) -> Layout:
        return self.layout

    def begin(self) -> None:
        pass

    def target(self, name: str) -> torch.Tensor:
        raise UpdateError(f"sink: this rank takes no tensors, yet {name} was routed to it")

    def ready(self, names: Sequence[str]) -> None:
        pass

    def commit(self) -> None:
        return None

    def abort(self) -> None:
        pass


class BucketSink:
    """Base of the forwarding sinks: an engine in another process that takes buckets of whole
    HF-named tensors over its own transport.

    The destination (every global tensor the trainer sends, in the trainer's dtype) is planned
    into out-buckets of at most `bucket_bytes`. target(name) lays the tensor out in its
    out-bucket's buffer (allocated at first touch); when every tensor of an out-bucket is ready
    it is sent as one FlattenedBucket (`_send`, on a sender thread: the engine loads bucket i while
    the pipeline fills bucket i+1; one send at a time) and its buffer goes back to the pool. So
    bytes go trainer -> out-bucket (one copy, by the pipeline) -> engine weights (one copy, by the
    engine). A failed send fails the next ready() or the commit, and the update aborts.

    Subclasses implement _alloc(nbytes) / _free(buffer) (transport memory), _open(), _send(bucket),
    _finish() -> version, _discard(), and may override `order` (the out-bucket layout).
    """

    align = 256
    """Byte alignment of tensors in an out-bucket (1: back to back, see sort_for_packing)."""

    def __init__(self, bucket_bytes: int = 256 << 20):
        if bucket_bytes < 1 << 10:
            raise ValueError(f"bucket_bytes: {bucket_bytes} is below 1 KiB; use e.g. 256 << 20")
        self.bucket_bytes = int(bucket_bytes)
        self.layout: Optional[Layout] = None
        self._plan: list[Bucket] = []
        self._where: dict[str, int] = {}
        self._entry: dict = {}
        self._key: Optional[tuple] = None
        self._lock = threading.Lock()
        self._reset()
        self.bytes_sent = 0
        self.buckets_sent = 0

    def _reset(self) -> None:
        self._bufs: dict[int, torch.Tensor] = {}
        self._pending: dict[int, set[str]] = {}
        self._sent: set[int] = set()
        self._inflight: list[Future] = []

    def _sender(self) -> ThreadPoolExecutor:
        ex = getattr(self, "_executor", None)
        if ex is None:
            ex = self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="k2-sink-send")
        return ex

    def _drain(self, keep: int = 0) -> None:
        """Wait until at most `keep` sends are in flight; a failed send raises here."""
        while len(self._inflight) > keep:
            self._inflight.pop(0).result()

    # ---- planning
    def order(self, specs: list[TensorSpec]) -> list[TensorSpec]:
        """The order tensors are laid out in out-buckets (default: the trainer's)."""
        return specs

    def destination(self, sources: Mapping[str, TensorSpec]) -> Layout:
        key = tuple((s.name, s.shape, str(s.dtype)) for s in sources.values())
        if key != self._key:  # the engine rejects a tensor it does not know by name, at its first bucket
            specs = self.order(list(sources.values()))
            self.layout = hf_layout({s.name: s.shape for s in specs}, {s.name: s.dtype for s in specs},
                                    name=f"{type(self).__name__} buckets")
            self._plan = plan_buckets(specs, self.bucket_bytes, align=self.align)
            self._where = {e.name: b.index for b in self._plan for e in b.entries}
            self._entry = {e.name: e for b in self._plan for e in b.entries}
            self._key = key
        return self.layout

    @property
    def out_buckets(self) -> list[Bucket]:
        return list(self._plan)

    # ---- the session
    def begin(self) -> None:
        if self.layout is None:
            raise UpdateError(f"{type(self).__name__}: destination() was not called before begin()")
        self._reset()
        self.bytes_sent = self.buckets_sent = 0
        self._open()

    def target(self, name: str) -> torch.Tensor:
        i = self._where.get(name)
        if i is None:
            raise UpdateError(f"{type(self).__name__}: {name} is not in this update's destination")
        with self._lock:
            buf = self._bufs.get(i)
            if buf is None:
                b = self._plan[i]
                buf = self._bufs[i] = self._alloc(b.nbytes)
                self._pending[i] = {e.name for e in b.entries}
        e = self._entry[name]
        return buf[e.offset:e.end].view(e.dtype).view(e.shape) if e.nbytes else \
            torch.empty(e.shape, dtype=e.dtype, device=buf.device)

    def ready(self, names: Sequence[str]) -> None:
        full = []
        with self._lock:
            for n in names:
                i = self._where[n]
                pend = self._pending.get(i)
                if pend is None:
                    raise UpdateError(f"{type(self).__name__}: {n} reported ready before target() was called")
                pend.discard(n)
                if not pend and i not in self._sent:
                    full.append(i)
        for i in sorted(full):
            with self._lock:
                self._sent.add(i)
                buf = self._bufs.pop(i)
            self._drain(keep=0)  # one send at a time: the previous bucket is loaded before this one goes
            self._inflight.append(self._sender().submit(self._forward, self._plan[i], buf))

    def _forward(self, b: Bucket, buf: torch.Tensor) -> None:
        try:
            self._send(FlattenedBucket.of(b, buf))
        finally:
            self._free(buf)
        self.bytes_sent += b.nbytes
        self.buckets_sent += 1

    def commit(self) -> Any:
        try:
            self._drain()
        except BaseException:
            self.abort()
            raise
        missing = [b.index for b in self._plan if b.index not in self._sent]
        if missing:
            self.abort()
            raise UpdateError(f"{type(self).__name__}: out-buckets {missing[:5]} were never completed; the update "
                              "did not cover every destination tensor (nothing published)")
        return self._finish()

    def abort(self) -> None:
        for f in self._inflight:
            try:
                f.result()
            except BaseException:  # noqa: BLE001 - the error that aborted the update is reported by the caller
                pass
        for buf in self._bufs.values():
            self._free(buf)
        self._reset()
        self._discard()

    # ---- transport hooks
    def _alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def _free(self, buf: torch.Tensor) -> None:
        pass

    def _open(self) -> None:
        raise NotImplementedError

    def _send(self, bucket: FlattenedBucket) -> None:
        raise NotImplementedError

    def _finish(self) -> Any:
        raise NotImplementedError

    def _discard(self) -> None:
        raise NotImplementedError


class BufferPool:
    """Reusable uint8 buffers by size (out-bucket memory that outlives one update)."""

    def __init__(self, make: Callable[[int], torch.Tensor]):
        self._make = make
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            lst = self._free.get(nbytes)
            if lst:
                return lst.pop()
        return self._make(nbytes)

    def put(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault(buf.numel(), []).append(buf)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
