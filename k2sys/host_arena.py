"""Host memory arena: CPU memory the colocated trainer and engine hand to each other, not to the OS.

On CPU the trainer's "device" state and the engine's weights and KV cache are all host memory.
Freeing it on every release and allocating it again on resume costs a page fault per 4 KiB page
on the first write after every switch, on both sides (docs/FACTS.md: a copy into fresh pages runs at
~a quarter of the speed of a copy into touched ones). The arena keeps released memory mapped and
touched and gives it to whichever side resumes next:

    release(storages)         each storage's memory -> the arena; the storage keeps its identity
                              (every view of it stays attached) and holds 0 bytes until resumed
    resume(storages, sizes)   each storage <- a range of parked memory: its own previous range when
                              that is free, else the best-fitting free range, else fresh memory
                              (which joins the arena when it is released)

Memory changes hands by swapping the storage's data pointer (torch's StorageImpl swap), never by
copying. A resumed storage is a slice of an arena chunk (the slice keeps the chunk alive) and is
not resizable, so a stray `resize_` raises instead of silently leaking the range. Storages on other
devices take the plain path (resize_ to 0 / to their size): on CUDA the caching allocator is the
in-process arena, and across processes the analogue is a virtual-memory remap (docs/benchmarks.md).

Parked memory is kept only while another side in this process can take it: with fewer than two
live users (a user is the object that releases or resumes: a StateOffloader, an engine), release
frees every chunk nobody leases, so an engine alone in a server process returns its memory to the
OS on release exactly as before.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

# torch >= 2.3 swaps a storage's data pointer in place (what share_memory_ does internally).
HAS_SWAP = hasattr(torch.UntypedStorage, "_swap_data_ptr_")


@dataclass(eq=False)
class _Chunk:
    """One block of parked memory (a released storage's allocation) and its free ranges."""

    holder: torch.UntypedStorage
    nbytes: int
    free: list[list[int]] = field(default_factory=list)  # sorted, disjoint, non-adjacent [start, end)
    leased: int = 0

    def claim(self, start: int, n: int, align: int) -> Optional[int]:
        """Take [start, start + n) rounded up to `align` (or to the end of its free range, whichever
        is first) out of the free ranges; returns the end taken, None when it is not wholly free."""
        i = bisect.bisect_right(self.free, start, key=lambda r: r[0]) - 1
        if i < 0 or self.free[i][1] < start + n:
            return None
        s, e = self.free.pop(i)
        end = min(start + (n + align - 1) // align * align, e)
        if end < e:
            self.free.insert(i, [end, e])
        if s < start:
            self.free.insert(i, [s, start])
        self.leased += end - start
        return end

    def give(self, start: int, end: int) -> None:
        """Return [start, end) to the free ranges, merged with its neighbours."""
        i = bisect.bisect_left(self.free, start, key=lambda r: r[0])
        if i > 0 and self.free[i - 1][1] == start:
            i -= 1
            self.free[i][1] = end
        else:
            self.free.insert(i, [start, end])
        if i + 1 < len(self.free) and self.free[i + 1][0] == self.free[i][1]:
            self.free[i][1] = self.free.pop(i + 1)[1]
        self.leased -= end - start


@dataclass
class ResumeReport:
    """Bytes a resume took from parked (touched) memory vs freshly allocated."""

    reused_bytes: int = 0
    fresh_bytes: int = 0
    storages: int = 0


class HostArena:
    """Parked CPU memory shared by the sides of one process (see the module doc)."""

    def __init__(self, align: int = 4096):
        if align <= 0 or align & (align - 1):
            raise ValueError(f"HostArena: align must be a power of two, got {align}")
        self.align = align
        self._chunks: list[_Chunk] = []
        self._leases: dict[int, tuple[_Chunk, int, int]] = {}  # data_ptr -> (chunk, start, end)
        self._home: dict[int, tuple[_Chunk, int]] = {}  # storage key -> (chunk, start) it last held
        self._users: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._lock = threading.RLock()  # re-entered by a user's finalizer during a garbage collection

    # ------------------------------------------------------------------ the two calls
    def release(self, storages: Sequence[torch.UntypedStorage], user: Any = None) -> int:
        """Hand each storage's memory to the arena (CPU) or free it (other devices); returns the
        bytes parked. Every storage ends with 0 bytes, its views attached."""
        cpu = self._split(storages, lambda s: s.resize_(0))
        parked = 0
        with self._lock:
            self._join(user)
            for s in cpu:  # check them all before moving any
                if s.nbytes() and s.data_ptr() not in self._leases and (not s.resizable() or s.is_shared()):
                    raise ValueError(f"HostArena.release: a {s.nbytes()}-byte storage whose memory belongs to "
                                     "something else (a slice, a file or shared-memory mapping) cannot be parked; "
                                     "release only storages torch allocated")
            for s in cpu:
                n = s.nbytes()
                if n == 0:  # already released
                    continue
                lease = self._leases.pop(s.data_ptr(), None)
                if lease is not None:
                    chunk, start, end = lease
                    s._swap_data_ptr_(torch.UntypedStorage(0))  # the slice (and its chunk reference) drops
                    chunk.give(start, end)
                else:
                    holder = torch.UntypedStorage(0)
                    s._swap_data_ptr_(holder)  # holder now owns the memory the storage had
                    chunk = _Chunk(holder, n, [[0, n]])
                    self._chunks.append(chunk)
                    self._home[self._key(s)] = (chunk, 0)
                parked += n
            if self._live_users() < 2:
                self._trim()  # nobody else in this process to hand it to: back to the OS
        return parked

    def resume(self, storages: Sequence[torch.UntypedStorage], sizes: Sequence[int],
               user: Any = None) -> ResumeReport:
        """Give each (released, 0-byte) storage `sizes[i]` bytes: parked memory where it fits, fresh
        memory otherwise (CPU); other devices are resized. Contents are undefined."""
        if len(storages) != len(sizes):
            raise ValueError(f"HostArena.resume: {len(storages)} storages but {len(sizes)} sizes")
        want = dict(zip((self._key(s) for s in storages), sizes))
        rep = ResumeReport(storages=len(storages))
        cpu = self._split(storages, lambda s: s.resize_(want[self._key(s)]))
        with self._lock:
            self._join(user)
            misses = []
            for s in cpu:
                n = want[self._key(s)]
                if s.nbytes() != 0:
                    raise ValueError(f"HostArena.resume: storage holds {s.nbytes()} bytes; resume only what "
                                     "release() emptied")
                if n == 0:
                    continue
                home = self._home.get(self._key(s))
                end = None if home is None or home[0].holder is None else home[0].claim(home[1], n, self.align)
                if end is not None:
                    self._lease(s, home[0], home[1], end, n)
                    rep.reused_bytes += n
                else:
                    misses.append(s)
            for s in sorted(misses, key=lambda s: -want[self._key(s)]):  # largest first: best fit
                n = want[self._key(s)]
                spot = self._best_fit(n)
                if spot is None:
                    s.resize_(n)  # fresh memory; it joins the arena when released
                    rep.fresh_bytes += n
                    continue
                chunk, start = spot
                self._lease(s, chunk, start, chunk.claim(start, n, self.align), n)
                rep.reused_bytes += n
        return rep

    def shared(self) -> bool:
        """Whether released memory is kept for another side of this process (two or more live users)."""
        with self._lock:
            return self._live_users() >= 2

    def trim(self) -> int:
        """Free every chunk nobody leases from (back to the OS); returns the bytes freed."""
        with self._lock:
            return self._trim()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"chunks": len(self._chunks), "bytes": sum(c.nbytes for c in self._chunks),
                    "leased_bytes": sum(c.leased for c in self._chunks), "leases": len(self._leases),
                    "users": self._live_users()}

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _key(s: torch.UntypedStorage) -> int:
        return s._cdata  # the StorageImpl: the same object for every Python wrapper of one storage

    @staticmethod
    def _split(storages: Sequence[torch.UntypedStorage], other) -> list[torch.UntypedStorage]:
        """The unique CPU storages (returned) when the swap is available; `other(s)` on the rest."""
        seen: dict[int, torch.UntypedStorage] = {}
        for s in storages:
            seen.setdefault(s._cdata, s)
        cpu = []
        for s in seen.values():
            if s.device.type == "cpu" and HAS_SWAP:
                cpu.append(s)
            else:
                other(s)
        return cpu

    def _join(self, user: Any) -> None:
        if user is not None and user not in self._users:
            self._users.add(user)
            weakref.finalize(user, self._user_gone)

    def _live_users(self) -> int:
        return sum(1 for _ in self._users)  # iteration skips a user whose finalizer is running

    def _user_gone(self) -> None:
        with self._lock:
            if self._live_users() < 2:
                self._trim()

    def _lease(self, s: torch.UntypedStorage, chunk: _Chunk, start: int, end: int, n: int) -> None:
        piece = chunk.holder[start:start + n]  # aliases the chunk and keeps it alive
        s._swap_data_ptr_(piece)
        self._leases[s.data_ptr()] = (chunk, start, end)
        self._home[self._key(s)] = (chunk, start)

    def _best_fit(self, n: int) -> Optional[tuple[_Chunk, int]]:
        best = None
        for c in self._chunks:
            for start, end in c.free:
                if end - start >= n and (best is None or end - start < best[2]):
                    best = (c, start, end - start)
                    if end - start == n:
                        return c, start
        return None if best is None else (best[0], best[1])

    def _trim(self) -> int:
        keep, freed = [], 0
        for c in self._chunks:
            if c.leased and torch._C._storage_Use_Count(c.holder._cdata) == 1:
                # every storage that leased from it died without a release: its leases are stale
                stale = [p for p, (ch, _, _) in self._leases.items() if ch is c]
                for p in stale:
                    _, start, end = self._leases.pop(p)
                    c.give(start, end)
            if c.leased == 0:
                freed += c.nbytes
                c.holder, c.free = None, []  # the memory goes back to the OS with the holder
            else:
                keep.append(c)
        self._chunks = keep
        if freed:
            self._home = {k: v for k, v in self._home.items() if v[0].holder is not None}
        return freed


_DEFAULT: Optional[HostArena] = None
_DEFAULT_LOCK = threading.Lock()


def host_arena() -> HostArena:
    """The process's arena, shared by every trainer and engine in it."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = HostArena()
        return _DEFAULT
