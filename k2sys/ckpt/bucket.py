"""Bucketing: pack named tensors into broadcast buckets.

Rules: entries start at multiples of `align` bytes (256: NCCL/vector friendly, and the bucket
end keeps the 8-byte checksum trailer aligned); a bucket holds at most `cap_bytes` unless a
single tensor is larger, then that tensor travels alone; input order is kept, so every rank
computes identical buckets; every byte of every tensor is in exactly one bucket.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from k2sys.ckpt.types import Bucket, BucketEntry, TensorSpec


def align_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def plan_buckets(specs: Sequence[TensorSpec], cap_bytes: int, align: int = 256, owner: int = 0,
                 first_index: int = 0) -> list[Bucket]:
    """Greedy in-order packing of `specs` into buckets of at most cap_bytes (see module doc)."""
    if cap_bytes <= 0:
        raise ValueError(f"plan_buckets: cap_bytes must be > 0, got {cap_bytes}")
    if align <= 0 or align & (align - 1):
        raise ValueError(f"plan_buckets: align must be a power of two, got {align}")
    seen: set[str] = set()
    buckets: list[Bucket] = []
    cur: list[BucketEntry] = []
    used = 0

    def close() -> None:
        nonlocal cur, used
        if cur:
            buckets.append(Bucket(first_index + len(buckets), owner, tuple(cur), align_up(used, align)))
        cur, used = [], 0

    for s in specs:
        if s.name in seen:
            raise ValueError(f"plan_buckets: tensor {s.name} is listed twice")
        seen.add(s.name)
        off = align_up(used, align)
        if cur and off + s.nbytes > cap_bytes:
            close()
            off = 0
        cur.append(BucketEntry(s.name, off, s))
        used = off + s.nbytes
        if s.nbytes >= cap_bytes:  # oversize (or exactly full): it owns this bucket
            close()
    close()
    return buckets


def interleave_owners(per_owner: Mapping[int, Sequence[TensorSpec]], cap_bytes: int, align: int = 256) -> list[Bucket]:
    """Buckets of every owner rank, interleaved round-robin (r0, r1, ..., r0, r1 ...) so the
    staging work rotates over ranks; indices are global and identical on every rank."""
    lists = {r: plan_buckets(specs, cap_bytes, align, owner=r) for r, specs in sorted(per_owner.items())}
    out: list[Bucket] = []
    k = 0
    while any(k < len(v) for v in lists.values()):
        for r, v in lists.items():
            if k < len(v):
                b = v[k]
                out.append(Bucket(len(out), r, b.entries, b.nbytes))
        k += 1
    return out
