"""Reshard plans: the box-intersection copies that turn source layouts into a destination layout.

    sources {rank: Layout}  --select replicas-->  one owner per local tensor
        --intersect global boxes per global tensor-->  CopyOp list  --validate-->  ReshardPlan

A plan is pure data, deterministic for equal inputs, so every rank computes the same one
without talking to the others. Validation rejects anything that would silently produce wrong
weights (overlapping writes, uncovered bytes, dtype/shape disagreement), naming the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

from k2sys.ckpt.layout import Layout
from k2sys.ckpt.types import Box, CopyOp, Piece, PlanError, TensorSpec

if TYPE_CHECKING:
    from k2sys.ckpt.bucket import RowPiece


def find_overlap(boxes: Sequence[Box]) -> Optional[tuple[int, int]]:
    """Indices of two overlapping boxes, or None. Sweep on dim 0, pairwise only among the active."""
    if not boxes:
        return None
    if boxes[0].ndim == 0:
        return (0, 1) if len(boxes) > 1 else None
    order = sorted(range(len(boxes)), key=lambda i: boxes[i].offsets[0])
    active: list[int] = []
    for i in order:
        start = boxes[i].offsets[0]
        active = [j for j in active if boxes[j].ends[0] > start]
        for j in active:
            if boxes[i].intersect(boxes[j]) is not None:
                return (j, i)
        active.append(i)
    return None


@dataclass(frozen=True)
class ReshardPlan:
    """Copies that fill every local tensor of `dst` from the selected source tensors."""

    ops: tuple[CopyOp, ...]
    dst: Layout
    src_specs: Mapping[tuple[int, str], TensorSpec]
    """(rank, local name) -> spec of each source tensor the plan reads."""

    @property
    def nbytes(self) -> int:
        return sum(op.dst_box.numel * self.dst.tensors[op.dst_name].dtype.itemsize for op in self.ops)

    def sources_needed(self) -> dict[int, list[str]]:
        out: dict[int, set[str]] = {}
        for op in self.ops:
            out.setdefault(op.src_rank, set()).add(op.src_name)
        return {r: sorted(v) for r, v in sorted(out.items())}


def _signature(layout: Layout, local: str, pieces: list[Piece]) -> tuple:
    spec = layout.tensors[local]
    return (spec.shape, str(spec.dtype), tuple(sorted((p.global_name, p.global_box.offsets, p.global_box.sizes,
                                                        p.local_box.offsets, p.local_box.sizes) for p in pieces)))


def select_sources(sources: Mapping[int, Layout]) -> dict[tuple[int, str], list[Piece]]:
    """One owner per distinct source local tensor: replicas (same pieces on several ranks) are
    read from one rank only, spreading bytes over ranks (least-loaded first, ties to lower rank).
    Returns {(rank, local name): its pieces}."""
    groups: dict[tuple, list[tuple[int, str]]] = {}
    sig_pieces: dict[tuple, list[Piece]] = {}
    nbytes: dict[tuple, int] = {}
    for rank in sorted(sources):
        lay = sources[rank]
        per_local: dict[str, list[Piece]] = {}
        for p in lay.pieces:
            per_local.setdefault(p.local_name, []).append(p)
        for local, pieces in per_local.items():
            sig = _signature(lay, local, pieces)
            groups.setdefault(sig, []).append((rank, local))
            sig_pieces[sig] = pieces
            nbytes[sig] = lay.tensors[local].nbytes
    load = {r: 0 for r in sources}
    chosen: dict[tuple[int, str], list[Piece]] = {}
    # Largest first makes the greedy balance tight; the order is a pure function of the inputs.
    for sig in sorted(groups, key=lambda s: (-nbytes[s], groups[s][0])):
        rank, local = min(groups[sig], key=lambda rl: (load[rl[0]], rl[0]))
        load[rank] += nbytes[sig]
        chosen[(rank, local)] = sig_pieces[sig]
    return chosen


def plan_reshard(sources: Union[Layout, Mapping[int, Layout]], dst: Layout) -> ReshardPlan:
    """The copies that build every local tensor of `dst` from `sources` ({rank: Layout})."""
    if isinstance(sources, Layout):
        sources = {0: sources}
    chosen = select_sources(sources)
    by_global: dict[str, list[tuple[int, str, Piece]]] = {}
    for (rank, local), pieces in chosen.items():
        for p in pieces:
            by_global.setdefault(p.global_name, []).append((rank, local, p))
    # Distinct (non-replica) source pieces of one global tensor must not overlap: else two
    # ranks claim different bytes for the same weights and the plan cannot pick one.
    for gname, lst in by_global.items():
        hit = find_overlap([p.global_box for _, _, p in lst])
        if hit is not None:
            a, b = lst[hit[0]], lst[hit[1]]
            raise PlanError(f"global tensor {gname}: source pieces {a[2].global_box} (rank {a[0]} {a[1]}) and "
                            f"{b[2].global_box} (rank {b[0]} {b[1]}) overlap but are not replicas of one tensor")
    ops: list[CopyOp] = []
    for dp in dst.pieces:
        srcs = by_global.get(dp.global_name)
        if not srcs:
            raise PlanError(f"destination tensor {dp.local_name} needs global tensor {dp.global_name}, "
                            f"which no source layout holds")
        for rank, local, sp in srcs:
            if sp.global_shape != dp.global_shape:
                raise PlanError(f"global tensor {dp.global_name} has shape {sp.global_shape} in the source "
                                f"(rank {rank} {local}) but {dp.global_shape} in the destination {dp.local_name}")
            sub = sp.global_box.intersect(dp.global_box)
            if sub is None:
                continue
            ops.append(CopyOp(dp.global_name, rank, local, sp.to_local(sub), dp.local_name, dp.to_local(sub)))
    src_specs = {(r, l): sources[r].tensors[l] for (r, l) in chosen}
    plan = ReshardPlan(tuple(ops), dst, src_specs)
    validate_plan(plan)
    return plan


def validate_plan(plan: ReshardPlan) -> None:
    """Raise PlanError (naming the tensor) unless every op is in bounds and dtype-consistent and
    the ops cover every destination tensor exactly once (no overlap, no gap)."""
    per_dst: dict[str, list[CopyOp]] = {name: [] for name in plan.dst.tensors}
    for op in plan.ops:
        src = plan.src_specs.get((op.src_rank, op.src_name))
        if src is None:
            raise PlanError(f"copy of {op.global_name}: source tensor {op.src_name} on rank {op.src_rank} is unknown")
        dst = plan.dst.tensors.get(op.dst_name)
        if dst is None:
            raise PlanError(f"copy of {op.global_name}: destination tensor {op.dst_name} is not in the layout")
        if src.dtype != dst.dtype:
            raise PlanError(f"copy of {op.global_name}: dtype {src.dtype} of source {op.src_name} differs from "
                            f"{dst.dtype} of destination {op.dst_name}; cast in the source layout first")
        if not op.src_box.fits_in(src.shape):
            raise PlanError(f"copy of {op.global_name}: box {op.src_box} is outside source {op.src_name} {src.shape}")
        if not op.dst_box.fits_in(dst.shape):
            raise PlanError(f"copy of {op.global_name}: box {op.dst_box} is outside destination "
                            f"{op.dst_name} {dst.shape}")
        per_dst[op.dst_name].append(op)
    for name, ops in per_dst.items():
        spec = plan.dst.tensors[name]
        hit = find_overlap([op.dst_box for op in ops])
        if hit is not None:
            a, b = ops[hit[0]], ops[hit[1]]
            raise PlanError(f"destination tensor {name}: copies of {a.global_name} {a.dst_box} and "
                            f"{b.global_name} {b.dst_box} overlap")
        covered = sum(op.dst_box.numel for op in ops)
        if covered != spec.numel:
            raise PlanError(f"destination tensor {name} {spec.shape}: the plan writes {covered} of {spec.numel} "
                            f"elements; a source piece is missing (gap in coverage)")


def plan_on_pieces(plan: ReshardPlan, pieces: Mapping[int, Mapping[str, "RowPiece"]]) -> ReshardPlan:
    """The same copies read from row pieces (k2sys.ckpt.bucket.split_rows) instead of whole source
    tensors: pieces[rank] maps piece names to RowPieces of that rank's tensors. Each op whose source
    tensor was cut is cut at the piece boundaries along the source's dim 0; where that dim is wider
    than 1 in the op's box, it is the box's first such dim, so the destination box is cut along its
    first dim wider than 1 by the same rows (boxes pair their non-unit dims in order, CopyOp)."""
    by_tensor: dict[tuple[int, str], list["RowPiece"]] = {}
    for rank, ps in pieces.items():
        for p in ps.values():
            by_tensor.setdefault((rank, p.tensor), []).append(p)
    if not by_tensor:
        return plan
    ops: list[CopyOp] = []
    src_specs = dict(plan.src_specs)
    for key, ps in by_tensor.items():
        spec = src_specs.get(key)
        if spec is None:
            continue
        for p in ps:
            src_specs[(key[0], p.name)] = TensorSpec(p.name, (p.r1 - p.r0,) + tuple(spec.shape[1:]), spec.dtype)
    for op in plan.ops:
        ps = by_tensor.get((op.src_rank, op.src_name))
        if not ps:
            ops.append(op)
            continue
        lo, n = op.src_box.offsets[0], op.src_box.sizes[0]
        k = next((d for d, size in enumerate(op.dst_box.sizes) if size != 1), None)
        for p in ps:
            a, b = max(lo, p.r0), min(lo + n, p.r1)
            if a >= b:
                continue
            src = Box((a - p.r0,) + op.src_box.offsets[1:], (b - a,) + op.src_box.sizes[1:])
            dst = op.dst_box
            if n != 1:  # the source's rows are the destination's first non-unit dim
                offs, sizes = list(dst.offsets), list(dst.sizes)
                offs[k] += a - lo
                sizes[k] = b - a
                dst = Box(tuple(offs), tuple(sizes))
            ops.append(CopyOp(op.global_name, op.src_rank, p.name, src, op.dst_name, dst))
    out = ReshardPlan(tuple(ops), plan.dst, src_specs)
    validate_plan(out)
    return out
