"""Peer load: a restarted inference replica takes the current weights from one healthy peer.

    restarted replica: load_from_peer(sink, link)           healthy peer: serve_peer(layout, tensors, link)
        (nothing else of the job takes part)                  (in a thread: the peer keeps serving)
      rendezvous: a TCPStore at `link` + a 2-member gloo group, its own, not a sub-group of the
        job's default group, so no collective over the other replicas is needed to create it
      hello:   layout fingerprints and the peer's weight version must agree
      buckets: pack(i+1) || send(i)  ->  recv(i+1) || verify crc32c + apply(i) into staging
      bye:     the peer's version after the last send; changed -> the snapshot may be torn: abort
      commit (the replica adopts the peer's version) | abort + UpdateError naming the bucket
    (the sink API of k2sys.ckpt.sink: begin -> target -> ready -> commit | abort)

Both sides hold the same layout (a replica restarts with its old parallel config), so a bucket
entry is a whole destination tensor: no reshard plan, one batched copy per bucket.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.distributed as dist

from k2sys import ext
from k2sys.ckpt.apply import bucket_views
from k2sys.ckpt.bucket import fill_bucket, plan_buckets
from k2sys.ckpt.layout import Layout
from k2sys.ckpt.sink import WeightSink
from k2sys.ckpt.transport import TRAILER_BYTES, payload_crc, read_trailer, write_trailer
from k2sys.ckpt.types import UpdateConfig, UpdateError

log = logging.getLogger("k2sys.ckpt")

PEER, RESTARTED = 0, 1


@dataclass(frozen=True)
class PeerLink:
    """Where the pair meets: the healthy peer hosts a TCPStore at host:port."""

    host: str
    port: int

    def __post_init__(self):
        if not self.host:
            raise ValueError("PeerLink.host must be the healthy peer's address, e.g. '10.0.0.5'")
        if not 0 < self.port < 65536:
            raise ValueError(f"PeerLink.port must be in 1..65535, got {self.port}")


@dataclass
class PeerReport:
    wall_s: float = 0.0
    bytes: int = 0
    n_buckets: int = 0
    version: int = 0


class _Pair:
    """A 2-rank gloo group of its own (store + ProcessGroupGloo), used by object methods only."""

    def __init__(self, link: PeerLink, rank: int, timeout_s: float):
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.rank = rank
        try:
            self.store = dist.TCPStore(link.host, link.port, 2, rank == PEER, self.timeout, wait_for_workers=False)
            self.pg = dist.ProcessGroupGloo(dist.PrefixStore("k2sys-peer", self.store), rank, 2, self.timeout)
        except Exception as e:
            raise UpdateError(f"peer load: cannot meet the {'restarted replica' if rank == PEER else 'healthy peer'} "
                              f"at {link.host}:{link.port} within {timeout_s:.0f} s ({e})") from e

    def put(self, key: str, obj) -> None:
        self.store.set(key, json.dumps(obj))

    def get(self, key: str):
        try:
            return json.loads(self.store.get(key))
        except Exception as e:
            raise UpdateError(f"peer load: the other side did not send '{key}' within "
                              f"{self.timeout.total_seconds():.0f} s ({e}); it died or timed out") from e

    def wait(self, work, what: str) -> None:
        try:
            work.wait(self.timeout)
        except Exception as e:
            raise UpdateError(f"peer load aborted: {what} failed ({type(e).__name__}: {str(e).strip()[:200]}); "
                              f"the other side died or timed out", bucket=None, rank=1 - self.rank) from e


def _plan(layout: Layout, cfg: UpdateConfig):
    buckets = plan_buckets(list(layout.tensors.values()), cfg.bucket_bytes)
    slot = max((b.nbytes for b in buckets), default=0) + TRAILER_BYTES
    return buckets, [torch.empty(slot, dtype=torch.uint8) for _ in range(min(2, len(buckets)))]


def serve_peer(layout: Layout, tensors: Mapping[str, torch.Tensor], link: PeerLink, *,
               version: Callable[[], int] = lambda: 0, config: Optional[UpdateConfig] = None) -> PeerReport:
    """The healthy side: send `tensors` (this replica's live weights, named as in `layout`) to one
    restarted replica. Reads only; call it from a thread and keep serving. `version()` is read
    before and after, so the restarted side can refuse a snapshot torn by a concurrent update."""
    cfg = config or UpdateConfig()
    t0 = time.perf_counter()
    pair = _Pair(link, PEER, cfg.timeout_s)
    v0 = version()
    pair.put("hello", {"fingerprint": layout.fingerprint, "name": layout.name, "version": v0,
                       "bucket_bytes": cfg.bucket_bytes, "checksum": cfg.checksum})
    ack = pair.get("ack")
    if not ack.get("ok"):
        raise UpdateError(f"peer load refused by the restarted replica: {ack.get('reason')}")
    buckets, bufs = _plan(layout, cfg)
    rep = PeerReport(n_buckets=len(buckets), version=v0)
    pending = None
    for b in buckets:  # pack(i) overlaps send(i-1); two buffers (one when there is one bucket)
        buf = bufs[b.index % len(bufs)]
        fill_bucket(b, tensors, buf, cfg.copy_threads)
        write_trailer(buf, b.nbytes, payload_crc(buf, b.nbytes, cfg.copy_threads) if cfg.checksum else 0)
        if pending is not None:
            pair.wait(pending, f"send of bucket {b.index - 1}")
        pending = pair.pg.send([buf[:b.nbytes + TRAILER_BYTES]], RESTARTED, b.index)
        rep.bytes += b.nbytes
    if pending is not None:
        pair.wait(pending, f"send of bucket {len(buckets) - 1}")
    pair.put("bye", {"version": version()})
    pair.get("done")  # keep the store up until the restarted side has read "bye"
    rep.wall_s = time.perf_counter() - t0
    return rep


def load_from_peer(sink: WeightSink, link: PeerLink, *, config: Optional[UpdateConfig] = None) -> PeerReport:
    """The restarted side: fill `sink` (a sink with a fixed `layout`, e.g. TensorSink) with the
    peer's current weights (begin -> target/ready per bucket -> commit; abort and UpdateError on
    any failure, the sink's previous state kept)."""
    cfg = config or UpdateConfig()
    t0 = time.perf_counter()
    pair = _Pair(link, RESTARTED, cfg.timeout_s)
    layout = sink.layout
    try:
        hello = pair.get("hello")
        if hello["fingerprint"] != layout.fingerprint or hello["bucket_bytes"] != cfg.bucket_bytes:
            reason = (f"layouts or bucket sizes differ: peer {hello['name']!r} ({hello['bucket_bytes']} B buckets) vs "
                      f"restarted {layout.name!r} ({cfg.bucket_bytes} B); load from a replica with the same "
                      f"parallel config and UpdateConfig.bucket_bytes")
            pair.put("ack", {"ok": False, "reason": reason})
            raise UpdateError(f"peer load: {reason}")
        pair.put("ack", {"ok": True})
        buckets, bufs = _plan(layout, cfg)
        rep = PeerReport(n_buckets=len(buckets))
        sink.begin()
        try:
            def recv(i: int):
                b = buckets[i]
                return pair.pg.recv([bufs[i % len(bufs)][:b.nbytes + TRAILER_BYTES]], PEER, b.index)

            work = recv(0) if buckets else None
            for i, b in enumerate(buckets):  # recv(i+1) overlaps verify + apply(i)
                pair.wait(work, f"receive of bucket {i}")
                work = recv(i + 1) if i + 1 < len(buckets) else None
                buf = bufs[i % len(bufs)]
                if hello["checksum"]:
                    got, want = payload_crc(buf, b.nbytes, cfg.copy_threads), read_trailer(buf, b.nbytes)
                    if got != want:
                        raise UpdateError(f"peer load aborted: bucket {i} checksum mismatch (crc32c {got:#010x} != "
                                          f"sent {want:#010x}, {b.nbytes} bytes)", bucket=i, rank=PEER)
                views = bucket_views(b, buf)
                pairs = [(sink.target(e.name), views[e.name]) for e in b.entries]
                pairs = [(d, s) for d, s in pairs if s.numel()]
                if pairs and all(d.device.type == "cpu" for d, _ in pairs):
                    ext.batched_host_copy([d for d, _ in pairs], [s for _, s in pairs], cfg.copy_threads)
                else:
                    for d, s in pairs:
                        d.copy_(s)
                sink.ready([e.name for e in b.entries])
                rep.bytes += b.nbytes
            bye = pair.get("bye")
            if bye["version"] != hello["version"]:
                raise UpdateError(f"peer load aborted: the peer's weights changed during the transfer (version "
                                  f"{hello['version']} -> {bye['version']}); retry to get a consistent snapshot")
        except BaseException:
            sink.abort()
            raise
        sink.commit()
        rep.version = hello["version"]
        if isinstance(getattr(sink, "version", None), int):
            sink.version = rep.version  # the replica now serves the peer's weights
    finally:
        try:
            pair.put("done", {})
        except Exception:  # the peer is gone; nothing to release
            pass
    rep.wall_s = time.perf_counter() - t0
    return rep
