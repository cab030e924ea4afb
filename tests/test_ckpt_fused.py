"""The update's fused passes and its one-thread shared-memory schedule.

- ext.batched_strided_copy_crc_: copies equal to batched_strided_copy_ and a crc equal to crc32c of
  the whole region (gaps included), on the source side (verify + apply) and the destination side
  (pack); rows that do not tile the region are refused with nothing copied.
- fill_bucket(checksum=True): the packed bytes of fill_bucket and the crc of the payload.
- ShmRings.set_owners: every owner cycles through all of its slots; a slot is free only once every
  rank has applied the bucket that used it before.
- run_coop: two ranks (threads here, over a fake ring named as such) apply every bucket in order,
  stage each of their own before anyone applies it, never overwrite a slot still being read, and
  stay within the lookahead.
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest
import torch

from ckpt_fixtures import TINY, materialize, megatron_like_layout, random_hf_state
from k2sys import ext
from k2sys.ckpt import engine_tp_layout, plan_reshard
from k2sys.ckpt.apply import compile_buckets
from k2sys.ckpt.bucket import fill_bucket, interleave_owners
from k2sys.ckpt.schedule import run_coop
from k2sys.ckpt import shm_ring
from k2sys.ckpt.shm_ring import HEADER_BYTES, ShmRings
from k2sys.ckpt.types import UpdateError
from k2sys.ckpt.transport import payload_crc


def crc(t: torch.Tensor) -> int:
    return ext.crc32c_many([t.contiguous()], 1)[0]


def tp2_to_tp1(cap: int, seed: int = 0):
    """Buckets of a TP=2 trainer (both ranks' shards, random bytes, padding included) and the row
    tables that apply them into a TP=1 destination."""
    g = random_hf_state(TINY, seed=seed)
    sources = {r: megatron_like_layout(TINY, 2, r) for r in range(2)}
    dst = engine_tp_layout(TINY, 1, 0)
    plan = plan_reshard(sources, dst)
    buckets = interleave_owners({r: list(l.tensors.values()) for r, l in sources.items()}, cap)
    shards = {r: materialize(l, g) for r, l in sources.items()}
    bufs = []
    for b in buckets:
        buf = torch.randint(0, 256, (b.nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(b.index))
        fill_bucket(b, shards[b.owner], buf)
        bufs.append(buf)
    return buckets, compile_buckets(plan, buckets), bufs, dst, g


@pytest.mark.parametrize("cap,threads,chunk", [(4096, 1, 0), (4096, 2, 512), (1 << 20, 2, 0), (1 << 20, 1, 1000)])
def test_verify_and_apply_in_one_pass(cap, threads, chunk):
    buckets, comp, bufs, dst, g = tp2_to_tp1(cap)
    fused = {n: torch.zeros(s.shape, dtype=s.dtype) for n, s in dst.tensors.items()}
    plain = {n: torch.zeros(s.shape, dtype=s.dtype) for n, s in dst.tensors.items()}
    for b, c, buf in zip(buckets, comp, bufs):
        if not c.rows.shape[0]:
            continue
        for outs in (fused, plain):
            addrs = torch.tensor([outs[n].data_ptr() for n in c.dst_names], dtype=torch.int64)
            rows = c.absolute_rows(buf.data_ptr(), addrs)
            if outs is fused:
                got = ext.batched_strided_copy_crc_(rows, buf, True, threads, chunk)
                assert got == crc(buf), f"bucket {b.index}"
            else:
                ext.batched_strided_copy_(rows, threads=threads)
    for n in dst.tensors:
        assert torch.equal(fused[n].view(torch.uint8), plain[n].view(torch.uint8)), n
    assert all(torch.equal(fused[n], t) for n, t in materialize(dst, g).items())


def test_every_region_byte_is_hashed_gaps_included():
    region = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    out = torch.zeros(1 << 16, dtype=torch.uint8)
    # two rows reading [100, 20100) and [30000, 30000 + 64*256): the rest of the region is gaps
    rows = torch.tensor([[out.data_ptr(), region.data_ptr() + 100, 20000, 1, 1, 1, 0, 0, 0, 0, 0, 0],
                         [out.data_ptr() + 40000, region.data_ptr() + 30000, 256, 64, 1, 1, 300, 0, 0, 256, 0, 0]],
                        dtype=torch.int64)
    base = ext.batched_strided_copy_crc_(rows, region, True, 1, 4096)
    assert base == crc(region)
    for pos in (0, 99, 100, 20099, 20100, 29999, 30000 + 64 * 256, (1 << 16) - 1):  # edges of rows and gaps
        flipped = region.clone()
        flipped[pos] ^= 1
        assert ext.batched_strided_copy_crc_(rows.clone().index_put_((torch.tensor([0, 1]), torch.tensor([1, 1])),
                                                                     rows[:, 1] - region.data_ptr()
                                                                     + flipped.data_ptr()),
                                             flipped, True, 1, 4096) != base, pos
    assert torch.equal(out[:20000], region[100:20100])
    assert torch.equal(out[40000:40000 + 64 * 300].view(64, 300)[:, :256], region[30000:30000 + 64 * 256].view(64, 256))


def test_pack_hashes_what_it_wrote():
    g = random_hf_state(TINY, seed=5)
    lay = megatron_like_layout(TINY, 2, 1)
    tensors = materialize(lay, g)
    for cap in (4096, 1 << 20):
        for b in interleave_owners({1: list(lay.tensors.values())}, cap):
            want = torch.full((b.nbytes + 64,), 7, dtype=torch.uint8)
            got = torch.full((b.nbytes + 64,), 7, dtype=torch.uint8)
            assert fill_bucket(b, tensors, want, 2) is None  # not asked for: nothing hashed
            c = fill_bucket(b, tensors, got, 2, checksum=True)
            assert torch.equal(got, want)
            assert c == payload_crc(got, b.nbytes, 1) == crc(want[:b.nbytes])


def test_rows_that_do_not_tile_the_region_are_refused_untouched():
    region = torch.arange(4096, dtype=torch.int32).view(torch.uint8)  # 16 KiB
    out = torch.zeros(1 << 15, dtype=torch.uint8)
    p, o = region.data_ptr(), out.data_ptr()

    def refused(rows):
        t = torch.tensor(rows, dtype=torch.int64)
        before = out.clone()
        assert ext.batched_strided_copy_crc_(t, region, True, 1) is None
        assert torch.equal(out, before)

    refused([[o, p, 1024, 1, 1, 1, 0, 0, 0, 0, 0, 0], [o + 2048, p + 512, 1024, 1, 1, 1, 0, 0, 0, 0, 0, 0]])  # overlap
    refused([[o, p, 64, 8, 1, 1, 64, 0, 0, 128, 0, 0]])  # source strided (not packed): holes inside the row
    refused([[o, p + 16000, 1024, 1, 1, 1, 0, 0, 0, 0, 0, 0]])  # runs past the region
    refused([[o, p - 64, 128, 1, 1, 1, 0, 0, 0, 0, 0, 0]])  # starts before it
    with pytest.raises(ValueError, match="rows must be"):
        ext.batched_strided_copy_crc_(torch.zeros(1, 11, dtype=torch.int64), region, True)
    with pytest.raises(ValueError, match="region must be"):
        ext.batched_strided_copy_crc_(torch.zeros(1, 12, dtype=torch.int64), region.view(2, -1).t(), True)


# ------------------------------------------------------------------ rings and the one-thread schedule
def rings_for(world: int, depth: int, slot_bytes: int = 64):
    maps = [torch.zeros(HEADER_BYTES + depth * slot_bytes, dtype=torch.uint8) for _ in range(world)]
    return [ShmRings(r, world, depth, slot_bytes, maps) for r in range(world)], maps


def test_each_owner_cycles_through_all_its_slots():
    (r0, r1), _ = rings_for(2, 4)
    owners = [0, 1] * 6 + [0, 0, 1]
    for r in (r0, r1):
        r.set_owners(owners)
        r.begin()
    slot_of = {i: (r0.slot(o, i).data_ptr() - r0.maps[o].data_ptr() - HEADER_BYTES) // 64 for i, o in enumerate(owners)}
    assert [slot_of[i] for i, o in enumerate(owners) if o == 0] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [slot_of[i] for i, o in enumerate(owners) if o == 1] == [0, 1, 2, 3, 0, 1, 2]
    # rank 0's 5th bucket (index 8) reuses slot 0 of its 1st (index 0): free once both ranks applied 0
    assert r0.slot_free(6) and not r0.slot_free(8)
    r0.ack(0)
    assert not r0.slot_free(8)
    r1.ack(0)
    assert r0.slot_free(8) and not r0.slot_free(10)
    r0.publish(2)
    assert r1.published(0, 2) and not r1.published(0, 0) and not r1.published(1, 3)
    with pytest.raises(ValueError, match="outside the group"):
        r0.set_owners([0, 2])
    for r in (r0, r1):
        r.begin()  # a new epoch: last update's tags and counters count for nothing
    assert not r1.published(0, 2) and not r0.slot_free(8)


def test_waits_poll_busily_only_where_every_rank_has_a_core(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    (r0, _), _ = rings_for(2, 2)
    assert r0.spin_s == (shm_ring.SPIN_S if cores >= 2 else 0.0)
    many = ShmRings(0, cores + 1, 2, 64, [torch.zeros(HEADER_BYTES + 128, dtype=torch.uint8)] * (cores + 1))
    assert many.spin_s == 0.0
    # the busy phase yields the core on every poll, then the sleeping phase takes over
    yields, sleeps, polls = [], [], [0]
    monkeypatch.setattr(shm_ring.os, "sched_yield", lambda: yields.append(1))
    monkeypatch.setattr(shm_ring.time, "sleep", lambda s: sleeps.append(s))

    def ready():
        polls[0] += 1
        return polls[0] > 5

    r0.spin_s = 3600.0  # never leaves the busy phase here
    r0.wait_until(ready, "publish", 0, timeout_s=60)
    assert len(yields) == 5 and not sleeps
    r0.spin_s, polls[0] = 0.0, 0
    r0.wait_until(ready, "publish", 0, timeout_s=60)
    assert len(sleeps) == 5 and len(yields) == 5
    with pytest.raises(UpdateError, match="waited 0 s"):
        r0.wait_until(lambda: False, "publish", 0, timeout_s=0.0)


class FakeRing:
    """A test fake of the shared-memory rings between thread 'ranks': publish tags and applied
    counters in one dict, slot contents as the bucket index last packed there."""

    def __init__(self, world: int, depth: int, owners: list[int]):
        self.world, self.depth, self.owners = world, depth, owners
        self.lock = threading.Lock()
        self.published: set[int] = set()
        self.applied = [-1] * world
        self.slots: dict[tuple[int, int], int] = {}
        self.mine = {r: [i for i, o in enumerate(owners) if o == r] for r in range(world)}
        self.errors: list[str] = []

    def slot(self, i: int) -> tuple[int, int]:
        o = self.owners[i]
        return o, self.mine[o].index(i) % self.depth

    def can_stage(self, i: int) -> bool:
        k = self.mine[self.owners[i]].index(i) - self.depth
        with self.lock:
            return k < 0 or min(self.applied) >= self.mine[self.owners[i]][k]


@pytest.mark.parametrize("depth,lookahead,owners", [
    (2, 2, [0, 1] * 10), (1, 0, [0, 1] * 5), (3, 1, [0, 0, 1, 0, 1, 1, 1, 0, 0, 1, 0, 1]), (4, 5, [1] * 6 + [0] * 6)])
def test_coop_schedule_between_two_ranks(depth, lookahead, owners):
    ring = FakeRing(2, depth, owners)
    n = len(owners)
    logs: dict[int, list[tuple[str, int]]] = {0: [], 1: []}
    rng = random.Random(depth)

    def rank_main(rank: int) -> None:
        cursor = [0]

        def stage_publish(i):
            assert ring.owners[i] == rank
            if i > cursor[0] + lookahead:
                ring.errors.append(f"rank {rank} staged {i} with its apply cursor at {cursor[0]}")
            with ring.lock:
                prev = ring.slots.get(ring.slot(i))
                if prev is not None and min(ring.applied) < prev:
                    ring.errors.append(f"rank {rank} overwrote bucket {prev} (not applied everywhere) with {i}")
                ring.slots[ring.slot(i)] = i
            time.sleep(rng.random() * 1e-3)
            with ring.lock:
                ring.published.add(i)
            logs[rank].append(("stage", i))

        def ready(i):
            with ring.lock:
                return i in ring.published

        def apply(i):
            with ring.lock:
                if ring.slots.get(ring.slot(i)) != i:
                    ring.errors.append(f"rank {rank} applied {i} from a slot holding {ring.slots.get(ring.slot(i))}")
            time.sleep(rng.random() * 1e-3)
            with ring.lock:
                ring.applied[rank] = i
            logs[rank].append(("apply", i))

        def wait(pred, i):
            t0 = time.monotonic()
            while not pred():
                if time.monotonic() - t0 > 10:
                    raise TimeoutError(f"rank {rank} stuck before bucket {i}")
                time.sleep(1e-4)

        def before(i):
            cursor[0] = i

        run_coop(n, lambda i: owners[i] == rank, ring.can_stage, stage_publish, ready, apply, wait, before,
                 lookahead=lookahead)

    done = []

    def run(r):
        rank_main(r)
        done.append(r)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(done) == [0, 1] and not ring.errors, ring.errors
    for r in range(2):
        applied = [i for what, i in logs[r] if what == "apply"]
        assert applied == list(range(n))
        staged = [i for what, i in logs[r] if what == "stage"]
        assert staged == ring.mine[r]
        for i in staged:  # its own bucket staged before it applied it
            assert logs[r].index(("stage", i)) < logs[r].index(("apply", i))


def test_coop_schedule_raises_what_a_wait_raises():
    def wait(pred, i):
        raise RuntimeError(f"fake: peer died before bucket {i}")

    applied = []
    with pytest.raises(RuntimeError, match="before bucket 1"):
        run_coop(4, lambda i: i % 2 == 0, lambda i: True, lambda i: None, lambda i: i % 2 == 0, applied.append, wait)
    assert applied == [0]
    with pytest.raises(ValueError, match="lookahead"):
        run_coop(1, lambda i: True, lambda i: True, lambda i: None, lambda i: True, applied.append, wait, lookahead=-1)
