"""Same-host weight transport: a POSIX shared-memory segment (CPU) or CUDA IPC handles (GPU).

    client  ShmSegment (one /dev/shm file, created once, grown to the largest bucket, reused)
              <- one batched C++ copy of a bucket's tensors at aligned offsets
            POST /update_weights_from_shm {"transport": "shm", "shm_name", "shm_size", "entries", ...}
    server  ShmReader maps the segment read-only (kept mapped for a run of buckets, `release` ends
              it) -> typed views -> engine.update_weights (its one copy into the session's staging)

On GPU the bucket stays on the device: the client packs it there and sends the CUDA IPC handle
of its buffer (`cuda_ipc_handle`, the fields of torch.multiprocessing's reduction, as JSON:
no pickle crosses the process edge); the server opens it (`open_cuda_ipc`) and copies
device-to-device. The client keeps the buffer alive until the server has answered.

Leaks: the segment is unlinked by `ShmSegment.close()`, by a weakref finalizer (garbage
collection, interpreter exit), and by the client when an update fails; a segment whose
creator process died (SIGKILL) is reaped by the next `ShmSegment` created on the host (its
name carries the creator's pid).
"""

from __future__ import annotations

import base64
import mmap
import os
import re
import secrets
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from k2sys.ckpt.bucket import bucket_of, fill_bucket, plan_buckets
from k2sys.ckpt.types import TensorSpec
from k2sys.engine.api.protocol import ProtocolError

SHM_DIR = "/dev/shm"
PREFIX = "k2sys-w-"
NAME_RE = re.compile(r"^k2sys-w-(\d+)-[0-9a-f]{16}$")
ALIGN = 64
TRANSPORTS = ("shm", "cuda_ipc")


def _path(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ProtocolError(f"shm_name: {name!r} is not a k2sys segment name ({NAME_RE.pattern}); "
                            f"segments are created by k2sys.engine.transport.shm.ShmSegment")
    return os.path.join(SHM_DIR, name)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def reap_stale_segments() -> list[str]:
    """Unlink segments whose creator process is gone (killed before it could clean up)."""
    reaped = []
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return reaped
    for name in names:
        m = NAME_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _unlink(os.path.join(SHM_DIR, name))
            reaped.append(name)
    return reaped


def server_transports() -> list[str]:
    """What a server on this host accepts besides HTTP bodies (its /get_server_info capability)."""
    out = ["http"]
    if os.path.isdir(SHM_DIR):
        out.append("shm")
    if torch.cuda.is_available():
        out.append("cuda_ipc")
    return out


# ---------------------------------------------------------------- writer (client)

class ShmSegment:
    """A writable /dev/shm segment owned by this process (unlinked on close/GC/exit)."""

    def __init__(self, nbytes: int):
        if nbytes <= 0:
            raise ValueError(f"ShmSegment: nbytes must be > 0, got {nbytes}")
        reap_stale_segments()
        self.name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        self.path = _path(self.name)
        self.nbytes = int(nbytes)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._finalizer = weakref.finalize(self, _unlink, self.path)
        try:
            os.ftruncate(fd, self.nbytes)
            self._mm = mmap.mmap(fd, self.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            self._finalizer()
            raise
        finally:
            os.close(fd)
        self.tensor: Optional[torch.Tensor] = torch.frombuffer(self._mm, dtype=torch.uint8)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def write(self, named: Sequence[tuple[str, torch.Tensor]], threads: int = 0) -> list[dict[str, Any]]:
        """Copy tensors to aligned offsets (bucket_of's layout, fill_bucket's copy: CPU sources in one
        batched C++ copy); returns the entries as JSON."""
        if self.tensor is None:
            raise RuntimeError(f"ShmSegment {self.name} is closed")
        bucket = bucket_of(named, ALIGN)
        if bucket.nbytes > self.nbytes:
            raise ValueError(f"ShmSegment {self.name}: {bucket.nbytes} bytes do not fit its {self.nbytes}; grow it first")
        fill_bucket(bucket, dict(named), self.tensor, threads)
        return [e.to_json() for e in bucket.entries]

    def close(self) -> None:
        """Unlink the name at once; the mapping goes when no view of it is left."""
        self._finalizer()
        self.tensor = None
        try:
            self._mm.close()
        except BufferError:  # a caller still holds a view; the memory is freed with it
            pass

    def __enter__(self) -> "ShmSegment":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ShmWriter:
    """The client side: one segment reused across buckets and updates, grown when a bucket is larger."""

    def __init__(self):
        self._seg: Optional[ShmSegment] = None
        self.lock = threading.Lock()

    def segment(self, nbytes: int) -> ShmSegment:
        if self._seg is None or self._seg.closed or self._seg.nbytes < nbytes:
            self.close()
            self._seg = ShmSegment(max(nbytes, ALIGN))
        return self._seg

    @property
    def name(self) -> Optional[str]:
        return None if self._seg is None or self._seg.closed else self._seg.name

    def close(self) -> None:
        if self._seg is not None:
            self._seg.close()
            self._seg = None


class ShmPool:
    """Segments for out-buckets (k2sys.ckpt.engine_sinks.NativeServerSink): a bucket is written
    straight into a segment and the server copies it from there, so the bytes move twice in all.
    Segments are reused across buckets and updates (fresh pages cost a quarter of the copy bound,
    docs/FACTS.md); at most as many exist as buckets were in flight at once."""

    def __init__(self, min_bytes: int = 1 << 20):
        self.min_bytes = max(int(min_bytes), ALIGN)
        self._free: list[ShmSegment] = []
        self._used: dict[int, ShmSegment] = {}
        self.lock = threading.Lock()

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A writable uint8 view of `nbytes` at the start of a free segment (grown if needed)."""
        with self.lock:
            fit = [s for s in self._free if not s.closed and s.nbytes >= nbytes]
            seg = min(fit, key=lambda s: s.nbytes) if fit else None
            if seg is None:
                seg = ShmSegment(max(nbytes, self.min_bytes))
            else:
                self._free.remove(seg)
            view = seg.tensor[:nbytes]
            self._used[view.data_ptr()] = seg
            return view

    def segment_of(self, view: torch.Tensor) -> ShmSegment:
        seg = self._used.get(view.data_ptr())
        if seg is None:
            raise ValueError("ShmPool: this buffer was not acquired from the pool (or was released)")
        return seg

    def release(self, view: torch.Tensor) -> None:
        with self.lock:
            seg = self._used.pop(view.data_ptr(), None)
            if seg is not None:
                self._free.append(seg)

    @property
    def segments(self) -> list[ShmSegment]:
        return list(self._free) + list(self._used.values())

    def close(self) -> None:
        with self.lock:
            for seg in self._free + list(self._used.values()):
                seg.close()
            self._free, self._used = [], {}


def split_buckets(named: Sequence[tuple[str, torch.Tensor]], cap_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """In-order groups of at most cap_bytes (aligned); a larger tensor travels alone (plan_buckets' rule)."""
    by_name = dict(named)
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in named]
    return [[(e.name, by_name[e.name]) for e in b.entries] for b in plan_buckets(specs, cap_bytes, ALIGN)]


# ---------------------------------------------------------------- CUDA IPC (GPU only)

def _b64(b: Optional[bytes]) -> Optional[str]:
    return None if b is None else base64.b64encode(b).decode("ascii")


def _unb64(s: Optional[str], field: str) -> Optional[bytes]:
    if s is None:
        return None
    try:
        return base64.b64decode(s, validate=True)
    except (ValueError, TypeError) as e:
        raise ProtocolError(f"cuda_ipc.{field}: not base64 ({e})") from e


def cuda_ipc_handle(buffer: torch.Tensor) -> dict[str, Any]:
    """JSON fields that let another process open `buffer` (a CUDA uint8 tensor) via CUDA IPC."""
    from torch.multiprocessing.reductions import reduce_tensor

    if buffer.device.type != "cuda":
        raise ValueError("cuda_ipc_handle: the buffer must be a CUDA tensor; use the shm transport for CPU tensors")
    _, a = reduce_tensor(buffer)
    return {"size": list(a[1]), "stride": list(a[2]), "offset": a[3], "dtype": str(a[5]).removeprefix("torch."),
            "device": a[6], "handle": _b64(a[7]), "storage_size_bytes": a[8], "storage_offset_bytes": a[9],
            "ref_counter_handle": _b64(a[11]), "ref_counter_offset": a[12], "event_handle": _b64(a[13]),
            "event_sync_required": bool(a[14])}


def open_cuda_ipc(h: dict[str, Any]) -> torch.Tensor:
    """The tensor a `cuda_ipc_handle` describes, opened in this process (shares the producer's memory)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if not torch.cuda.is_available():
        raise ProtocolError("transport: cuda_ipc needs a CUDA device in the server; use transport 'shm'")
    try:
        return rebuild_cuda_tensor(torch.Tensor, torch.Size(h["size"]), tuple(h["stride"]), int(h["offset"]),
                                   torch.storage.TypedStorage, getattr(torch, h["dtype"]), int(h["device"]),
                                   _unb64(h["handle"], "handle"), int(h["storage_size_bytes"]),
                                   int(h["storage_offset_bytes"]), False, _unb64(h["ref_counter_handle"],
                                                                                 "ref_counter_handle"),
                                   int(h["ref_counter_offset"]), _unb64(h.get("event_handle"), "event_handle"),
                                   bool(h["event_sync_required"]))
    except KeyError as e:
        raise ProtocolError(f"cuda_ipc: missing field {e}; build it with k2sys.engine.transport.shm.cuda_ipc_handle") from None


# ---------------------------------------------------------------- request + reader (server)

@dataclass(frozen=True)
class ShmUpdatePayload:
    """Body of POST /update_weights_from_shm (one bucket)."""

    entries: tuple[dict[str, Any], ...]
    transport: str = "shm"
    shm_name: Optional[str] = None
    shm_size: int = 0
    cuda_ipc: Optional[dict[str, Any]] = None
    weight_version: Optional[str] = None
    release: bool = True
    """Unmap the segment after this bucket (the client sets it on the last bucket of an update)."""

    FIELDS = ("entries", "transport", "shm_name", "shm_size", "cuda_ipc", "weight_version", "release")

    def __post_init__(self):
        if self.transport not in TRANSPORTS:
            raise ProtocolError(f"transport: {self.transport!r} must be one of {TRANSPORTS}")
        if not self.entries:
            raise ProtocolError("entries: empty; send at least one tensor")
        if self.transport == "shm":
            _path(self.shm_name)
            if not isinstance(self.shm_size, int) or self.shm_size <= 0:
                raise ProtocolError(f"shm_size: must be the segment's size in bytes (> 0), got {self.shm_size!r}")
        elif not isinstance(self.cuda_ipc, dict):
            raise ProtocolError("cuda_ipc: required for transport 'cuda_ipc' (k2sys.engine.transport.shm.cuda_ipc_handle)")

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if k == "entries" else v) for k in self.FIELDS if (v := getattr(self, k)) is not None}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> "ShmUpdatePayload":
        unknown = set(body) - set(cls.FIELDS)
        if unknown:
            raise ProtocolError(f"update_weights_from_shm: unknown fields {sorted(unknown)}; known: {list(cls.FIELDS)}")
        if not isinstance(body.get("entries"), list):
            raise ProtocolError("entries: required, a list of {name, dtype, shape, offset}")
        return cls(**{**body, "entries": tuple(body["entries"])})


class ShmReader:
    """The server side: read-only mappings of client segments, one per name, until released."""

    def __init__(self):
        self._maps: dict[str, tuple[int, mmap.mmap, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def _buffer(self, name: str, size: int) -> torch.Tensor:
        path = _path(name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ProtocolError(f"shm_name: segment {name} does not exist in {SHM_DIR}; the server must run on the "
                                f"client's host (same /dev/shm), else use transport 'http'") from None
        try:
            st = os.fstat(fd)
            hit = self._maps.get(name)
            if hit is not None and hit[0] == st.st_ino and hit[2].numel() >= size:
                return hit[2]
            self._drop(name)
            if st.st_size < size:
                raise ProtocolError(f"shm_size: {size} bytes but segment {name} holds {st.st_size}")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        with warnings.catch_warnings():  # read-only by design: the views are only copied from
            warnings.simplefilter("ignore", UserWarning)
            buf = torch.frombuffer(mm, dtype=torch.uint8)
        self._maps[name] = (st.st_ino, mm, buf)
        return buf

    def _drop(self, name: str) -> None:
        hit = self._maps.pop(name, None)
        if hit is not None:
            _, mm, buf = hit
            del buf, hit
            try:
                mm.close()
            except BufferError:  # a view is still referenced somewhere; freed with it
                pass

    def apply(self, payload: ShmUpdatePayload, update: Callable[..., Any]) -> int:
        """Hand the bucket's tensors (views of shared memory) to `update` (engine.update_weights,
        which copies them); returns the tensor count. The segment is unmapped when the payload
        says `release` or the update fails."""
        from k2sys.engine.transport.wire import BucketEntry, FlattenedBucket  # the same bucket format as HTTP

        with self._lock:
            release = payload.release
            try:
                if payload.transport == "shm":
                    buf = self._buffer(payload.shm_name, payload.shm_size)
                else:
                    buf = open_cuda_ipc(payload.cuda_ipc)
                try:
                    entries = [BucketEntry.from_json(e) for e in payload.entries]
                except (KeyError, TypeError, ValueError) as e:
                    raise ProtocolError(f"entries: each needs name, dtype, shape, offset ({e})") from None
                named = FlattenedBucket(buf, entries).unpack()
                update(named, weight_version=payload.weight_version)
                if buf.device.type == "cuda":
                    torch.cuda.current_stream(buf.device).synchronize()  # copies done before the client frees it
                return len(named)
            except BaseException:
                release = True
                raise
            finally:
                named = buf = None
                if release and payload.transport == "shm":
                    self._drop(payload.shm_name)

    def close(self) -> None:
        with self._lock:
            for name in list(self._maps):
                self._drop(name)

    @property
    def mapped(self) -> list[str]:
        return sorted(self._maps)
