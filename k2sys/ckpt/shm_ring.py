"""Bucket rings in shared memory: the data path of a weight update between ranks on one host (CPU).

gloo moves a broadcast between processes on one host through TCP loopback: the sender's kernel
copies every byte into a socket buffer and every receiver's kernel copies it out again, on the
same cores that stage and apply the buckets (a 2-rank update on 2 cores spent ~60% of its time
there, docs/benchmarks.md). Here each rank owns a ring of `depth` bucket slots in a shared-memory
file that every rank of the group maps:

    owner     waits until every rank has applied the bucket that last used the slot, packs the bucket
              into its own slot (+ the crc32c trailer, hashed in the same pass), then publishes it (a
              tag in its ring header)
    receiver  waits for the tag, then verifies and applies straight from the owner's slot in one pass
              (each piece hashed, then copied from cache)
    everyone  acknowledges each applied bucket (a counter in its own ring header)

An owner's k-th bucket takes slot k % depth of its ring (set_owners), so each owner cycles through
all of its slots whatever the interleaving of owners. One thread per rank runs the update
(k2sys.ckpt.schedule.run_coop): it packs its next buckets between applies, so the processes of the
ranks overlap with each other rather than threads of one rank competing for the same core.

so a byte is written once on the way (the owner's pack) and read by each rank's apply: no copy in
transit. Tags and counters carry the update's epoch (every rank counts its updates alike), so a
value left by the previous update is never taken for this one. Waits poll busily for a moment
(SPIN_S, where each rank can have a core), then with a short backoff, and give up after the
update's timeout, naming the rank that did not answer: a dead peer ends the update on every rank,
as a failed collective does.

The files are created in /dev/shm with their full size reserved (posix_fallocate: a too-small
/dev/shm fails here, not with SIGBUS later), mapped by every rank, then unlinked by their owner
once every rank has mapped them: nothing is left behind when a process dies. GPU buckets keep
NCCL: this is the CPU path only (UpdateConfig.transport).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from typing import Optional

import torch

from k2sys import ext
from k2sys.ckpt.types import UpdateError

HEADER_BYTES = 4096  # tags (one int64 per slot) + the applied counter; slots start page-aligned
# A wait first polls busily (yielding the core to anything else runnable on it) for this long, then
# sleeps between polls with a growing pause. Sleeping at once cost each hand-off 0.1-0.3 ms (timer
# slack and wake-up on a VM): ~0.6 ms per bucket of a serial update, where every bucket waits
# twice (measured, 52 buckets of a 2-rank update). Only where every rank of the group can have its
# own core: with more ranks than cores a busy poll would take the time slice its peer needs.
SPIN_S = 2e-3
SHM_DIR = "/dev/shm"
_EPOCH_SHIFT = 32


def host_id() -> str:
    """Ranks with equal ids share this host's /dev/shm."""
    boot = ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        pass
    return f"{socket.gethostname()}/{boot}"


class ShmRings:
    """Every rank's ring of bucket slots, mapped in this process (create with `open_rings`)."""

    def __init__(self, rank: int, world: int, depth: int, slot_bytes: int, maps: list[torch.Tensor]):
        self.rank, self.world, self.depth, self.slot_bytes = rank, world, depth, slot_bytes
        self.maps = maps
        # [tags..., applied] as numpy views of the mappings: a tag read or write is one 8-byte load
        # or store (aligned, so atomic on the hosts this runs on) without a tensor op around it
        self.headers = [m[:HEADER_BYTES].view(torch.int64).numpy() for m in maps]
        self.epoch = 0
        self.peers: dict[int, tuple[int, str]] = {}  # rank -> (pid, start time) where visible from here
        self._owners: tuple[int, ...] = ()
        self._ordinal: list[int] = []  # bucket -> its index among its owner's buckets
        self._owned: list[int] = []  # this rank's buckets, in order
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        self.spin_s = SPIN_S if world <= cores else 0.0

    def set_owners(self, owners: "list[int] | tuple[int, ...]") -> None:
        """The owner of every bucket of the update, in bucket order (the same on every rank). A
        bucket's slot is its index among its owner's buckets modulo the depth, so every owner cycles
        through all `depth` slots of its ring whatever the interleaving of owners; without this,
        bucket i takes slot i % depth."""
        owners = tuple(int(o) for o in owners)
        if owners == self._owners:
            return
        bad = [o for o in owners if not 0 <= o < self.world]
        if bad:
            raise ValueError(f"ShmRings.set_owners: owner rank {bad[0]} outside the group of {self.world}")
        seen = [0] * self.world
        self._ordinal = []
        for o in owners:
            self._ordinal.append(seen[o])
            seen[o] += 1
        self._owned = [i for i, o in enumerate(owners) if o == self.rank]
        self._owners = owners

    def _index(self, bucket: int) -> int:
        k = self._ordinal[bucket] if bucket < len(self._ordinal) else bucket
        return k % self.depth

    def slot(self, owner: int, bucket: int) -> torch.Tensor:
        off = HEADER_BYTES + self._index(bucket) * self.slot_bytes
        return self.maps[owner][off:off + self.slot_bytes]

    def begin(self) -> None:
        """A new update: values of this epoch are the ones to wait for."""
        self.epoch += 1

    def _tag(self, bucket: int) -> int:
        return (self.epoch << _EPOCH_SHIFT) | (bucket + 1)

    def publish(self, bucket: int) -> None:
        """Bucket `bucket` is complete in this rank's slot (its bytes are visible before the tag)."""
        ext.require_cpp().store_fence()
        self.headers[self.rank][self._index(bucket)] = self._tag(bucket)

    def ack(self, bucket: int) -> None:
        """This rank has applied every bucket up to and including `bucket`."""
        self.headers[self.rank][self.depth] = self._tag(bucket)

    def _alive(self, rank: int) -> bool:
        peer = self.peers.get(rank)
        return peer is None or _proc_start(peer[0]) == peer[1]

    def _wait(self, ready, what: str, rank: Optional[int], bucket: int, timeout_s: float) -> None:
        """Poll `ready` (short backoff) until it holds. `rank` is the rank waited for (None: any
        peer); a dead one (or the timeout) raises UpdateError."""
        t0 = last_check = time.monotonic()
        spin_end = t0 + self.spin_s
        pause = 2e-5
        who = f"rank {rank}" if rank is not None else "a peer rank"
        while not ready():
            now = time.monotonic()
            if now - last_check > 0.05:
                last_check = now
                for r in ([rank] if rank is not None else [r for r in range(self.world) if r != self.rank]):
                    if not self._alive(r) and not ready():
                        raise UpdateError(f"weight update aborted: rank {self.rank} waited for {who} to {what} "
                                          f"bucket {bucket} (shared-memory transport), and rank {r}'s process "
                                          f"(pid {self.peers[r][0]}) has exited: a peer rank died",
                                          bucket=bucket, rank=r)
            if now - t0 > timeout_s:
                raise UpdateError(f"weight update aborted: rank {self.rank} waited {timeout_s:.0f} s for {who} "
                                  f"to {what} bucket {bucket} (shared-memory transport); a peer rank died or timed "
                                  "out", bucket=bucket, rank=rank)
            if now < spin_end:
                os.sched_yield()
                continue
            time.sleep(pause)
            pause = min(pause * 2, 2e-4)

    def published(self, owner: int, bucket: int) -> bool:
        """Rank `owner` has published `bucket` (of this update) in its slot."""
        return int(self.headers[owner][self._index(bucket)]) == self._tag(bucket)

    def _slot_need(self, bucket: int) -> int:
        """The bucket every rank must have applied before this rank packs `bucket` into its slot
        (the one `depth` places earlier in this rank's order; bucket - depth without set_owners)."""
        if self._owners:
            k = self._ordinal[bucket] - self.depth
            return self._owned[k] if k >= 0 else -1
        return bucket - self.depth

    def slot_free(self, bucket: int) -> bool:
        """This rank's slot for `bucket` is free: every rank has applied its previous bucket."""
        need = self._slot_need(bucket)
        if need < 0:
            return True
        want = self._tag(need)
        return all(int(h[self.depth]) >= want for h in self.headers)

    def wait_published(self, owner: int, bucket: int, timeout_s: float) -> None:
        self._wait(lambda: self.published(owner, bucket), "publish", owner, bucket, timeout_s)

    def wait_slot_free(self, bucket: int, timeout_s: float) -> None:
        """Every rank has applied the bucket that last used this rank's slot for `bucket`."""
        need = self._slot_need(bucket)
        if need < 0:
            return
        want = self._tag(need)
        for r in range(self.world):
            counter = self.headers[r]
            self._wait(lambda: int(counter[self.depth]) >= want, "apply", r, need, timeout_s)

    def wait_until(self, ready, what: str, bucket: int, timeout_s: float) -> None:
        """Poll `ready` as the other waits do, watching every peer."""
        self._wait(ready, what, None, bucket, timeout_s)

    def close(self) -> None:
        self.maps = self.headers = []


def _proc_start(pid: int) -> Optional[str]:
    """The start time of process `pid` as this process sees it (/proc/<pid>/stat field 22), or None
    where there is no such running process (an exited one, a zombie included)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] in ("Z", "X", "x"):
        return None
    return fields[19]


def _create(path: str, nbytes: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)  # ENOSPC now rather than SIGBUS on first touch
    finally:
        os.close(fd)


def open_rings(tr, depth: int, slot_bytes: int) -> tuple[Optional[ShmRings], str]:
    """Collective over the transport's group: every rank creates its ring and maps all of them.
    Returns (rings, "") on every rank, or (None, why) on every rank unless every rank is on this
    host and succeeded."""
    slot_bytes = (slot_bytes + 63) // 64 * 64
    nbytes = HEADER_BYTES + depth * slot_bytes
    path, err = None, None
    try:
        if not os.path.isdir(SHM_DIR):
            raise OSError(f"{SHM_DIR} is missing")
        path = os.path.join(SHM_DIR, f"k2sys-update-{uuid.uuid4().hex}-r{tr.rank}")
        _create(path, nbytes)
    except OSError as e:
        err, path = f"{type(e).__name__}: {e}", None
    token = int.from_bytes(os.urandom(7), "little")
    me = (host_id(), path, err, os.getpid(), _proc_start(os.getpid()), token)
    infos = tr.gather_objects(me)
    same_host = len({i[0] for i in infos}) == 1
    ok = same_host and all(i[1] is not None for i in infos)
    maps: list[torch.Tensor] = []
    if ok:
        try:
            for i in infos:
                if not os.path.isfile(i[1]) or os.path.getsize(i[1]) != nbytes:
                    raise OSError(f"{i[1]} is not visible here (another /dev/shm)")
            maps = [torch.from_file(i[1], shared=True, size=nbytes, dtype=torch.uint8) for i in infos]
            maps[tr.rank][HEADER_BYTES - 8:HEADER_BYTES].view(torch.int64)[0] = token
        except (OSError, RuntimeError) as e:
            err, maps = f"{type(e).__name__}: {e}", []
    tr.gather_objects(None)  # every rank has written its token
    if maps:  # the same memory on every rank: each peer's token reads back through its mapping
        seen = [int(m[HEADER_BYTES - 8:HEADER_BYTES].view(torch.int64)[0]) for m in maps]
        if seen != [i[5] for i in infos]:
            err, maps = "the ranks' shared-memory files are not the same memory", []
    mapped = tr.gather_objects(bool(maps))  # everyone has mapped (or failed) before anyone unlinks
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass
    if not same_host:
        return None, f"the ranks are on {len({i[0] for i in infos})} hosts"
    if not ok or not all(mapped):
        why = [f"rank {r}: {i[2]}" for r, i in enumerate(infos) if i[2]] or [err or "a rank could not map the rings"]
        return None, "; ".join(why)
    maps[tr.rank][:HEADER_BYTES].zero_()  # this rank's tags and counter (each rank writes only its own)
    tr.gather_objects(None)  # headers zeroed everywhere before the first update reads them
    rings = ShmRings(tr.rank, tr.world, depth, slot_bytes, maps)
    # peers whose process this one can see (same pid namespace: pid and start time agree) are
    # checked for exit while waiting, so a dead rank is reported at once instead of at the timeout
    rings.peers = {r: (i[3], i[4]) for r, i in enumerate(infos) if r != tr.rank and i[4] is not None
                   and _proc_start(i[3]) == i[4]}
    return rings, ""
