"""Apply step: turn a plan's copies for one bucket into a native strided-copy row table.

Rows are compiled once per (plan, buckets) with addresses *relative* to the bucket and to each
destination tensor; at apply time two vectorised adds make them absolute and one native call
(C++ threads on CPU, one kernel launch on CUDA) performs every copy of the bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from k2sys import ext
from k2sys.ckpt.bucket import FlattenedBucket
from k2sys.ckpt.plan import ReshardPlan
from k2sys.ckpt.types import Box, Bucket, CopyOp, TensorSpec


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def _nonunit(box: Box, strides: Sequence[int]) -> tuple[list[int], list[int], int]:
    """Sizes and strides of the box's non-unit dims, and its element offset."""
    sizes = [s for s in box.sizes if s != 1]
    st = [strides[d] for d, s in enumerate(box.sizes) if s != 1]
    return sizes, st, sum(o * s for o, s in zip(box.offsets, strides))


@dataclass(frozen=True)
class BucketApply:
    """The compiled copies of one bucket into this rank's destination tensors."""

    bucket: int
    rows: torch.Tensor          # int64 [n, 12], addresses relative (dst: to its tensor, src: to the bucket)
    dst_index: torch.Tensor     # int64 [n], index into `dst_names`
    dst_names: tuple[str, ...]  # the destination tensors this bucket writes into, in first-write order
    ops: tuple[CopyOp, ...]     # for the generic path and error messages
    nbytes: int

    def absolute_rows(self, bucket_addr: int, dst_addrs: torch.Tensor) -> torch.Tensor:
        """Rows with absolute addresses; dst_addrs[k] is the address of dst_names[k]."""
        rows = self.rows.clone()
        rows[:, 0] += dst_addrs[self.dst_index]
        rows[:, 1] += bucket_addr
        return rows


def compile_buckets(plan: ReshardPlan, buckets: Sequence[Bucket]) -> list[BucketApply]:
    """Per bucket, the row table of every plan op whose source tensor travels in it."""
    where: dict[tuple[int, str], tuple[int, int]] = {}
    for b in buckets:
        for e in b.entries:
            where[(b.owner, e.name)] = (b.index, e.offset)
    per_bucket: dict[int, list[CopyOp]] = {b.index: [] for b in buckets}
    for op in plan.ops:
        loc = where.get((op.src_rank, op.src_name))
        if loc is None:
            raise ValueError(f"compile_buckets: source {op.src_name} of rank {op.src_rank} (for {op.global_name}) "
                             f"is in no bucket; buckets and plan were built from different layouts")
        per_bucket[loc[0]].append(op)
    out = []
    for b in buckets:
        rows: list[list[int]] = []
        idx: list[int] = []
        dst_pos: dict[str, int] = {}
        nbytes = 0
        for op in per_bucket[b.index]:
            src_spec: TensorSpec = plan.src_specs[(op.src_rank, op.src_name)]
            dst_spec = plan.dst.tensors[op.dst_name]
            item = dst_spec.dtype.itemsize
            s_sizes, s_st, s_off = _nonunit(op.src_box, contiguous_strides(src_spec.shape))
            d_sizes, d_st, d_off = _nonunit(op.dst_box, contiguous_strides(dst_spec.shape))
            assert s_sizes == d_sizes, op  # guaranteed by CopyOp validation
            _, entry_off = where[(op.src_rank, op.src_name)]
            new = ext.strided_rows(d_sizes, d_st, s_st, item, d_off * item, entry_off + s_off * item)
            rows += new
            idx += [dst_pos.setdefault(op.dst_name, len(dst_pos))] * len(new)
            nbytes += op.dst_box.numel * item
        out.append(BucketApply(b.index, torch.tensor(rows, dtype=torch.int64).reshape(-1, ext.STRIDED_COLS),
                               torch.tensor(idx, dtype=torch.int64), tuple(dst_pos), tuple(per_bucket[b.index]),
                               nbytes))
    return out


def completions(plan: ReshardPlan, compiled: Sequence[BucketApply]) -> tuple[list[list[str]], list[str]]:
    """For each bucket, the destination tensors whose last write it carries (ready after it is
    applied), and the destination tensors no bucket writes (empty tensors: ready at once)."""
    last: dict[str, int] = {}
    for c in compiled:
        for n in c.dst_names:
            last[n] = c.bucket
    done: list[list[str]] = [[] for _ in compiled]
    pos = {c.bucket: k for k, c in enumerate(compiled)}
    for n, b in last.items():
        done[pos[b]].append(n)
    return done, [n for n in plan.dst.tensors if n not in last]


def bucket_views(bucket: Bucket, buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """Typed views of every entry of a packed bucket buffer (uint8, at least bucket.nbytes)."""
    return dict(FlattenedBucket.of(bucket, buf).unpack())


def op_slices(bucket: Bucket, buf: torch.Tensor, ops: Sequence[CopyOp]) -> dict[str, list[tuple[Box, torch.Tensor]]]:
    """The generic path: for each destination tensor, (dst box, source view shaped like the box)."""
    views = bucket_views(bucket, buf)
    out: dict[str, list[tuple[Box, torch.Tensor]]] = {}
    for op in ops:
        src = op.src_box.view(views[op.src_name]).reshape(op.dst_box.sizes)
        out.setdefault(op.dst_name, []).append((op.dst_box, src))
    return out
