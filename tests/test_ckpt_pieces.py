"""Row pieces: tensors larger than the bucket cap cut along dim 0 (k2sys.ckpt.bucket.split_rows) and
plans rewritten to read from the pieces (k2sys.ckpt.plan.plan_on_pieces). Checked against the
whole-tensor plan and plain torch slicing (ckpt_fixtures.materialize), bitwise."""

from __future__ import annotations

import pytest
import torch

from ckpt_fixtures import TINY, materialize, megatron_like_layout, random_hf_state
from k2sys import ext
from k2sys.ckpt import Box, LayoutBuilder, engine_tp_layout, plan_reshard
from k2sys.ckpt.apply import compile_buckets
from k2sys.ckpt.bucket import PieceTensors, align_up, RowPiece, fill_bucket, interleave_owners, split_rows
from k2sys.ckpt.plan import plan_on_pieces
from k2sys.ckpt.types import TensorSpec


def spec(name, shape, dtype=torch.float32):
    return TensorSpec(name, tuple(shape), dtype)


@pytest.mark.parametrize("cap", [1, 7, 64, 100, 4096, 1 << 20])
def test_split_rows_covers_every_row_once_within_the_cap(cap):
    specs = [spec("a", (10, 3)), spec("b", (1, 50)), spec("c", (33,)), spec("d", ()), spec("e", (5, 2, 2), torch.int8),
             spec("f", (0, 4))]
    out, pieces = split_rows(specs, cap)
    by = {s.name: s for s in specs}
    rows: dict[str, list[tuple[int, int]]] = {}
    names = []
    for s in out:
        p = pieces.get(s.name)
        if p is None:  # kept whole: small enough, or nothing to cut along dim 0
            assert s == by[s.name] and (s.nbytes <= cap or not s.shape or s.shape[0] <= 1)
            names.append(s.name)
            continue
        src = by[p.tensor]
        assert s.name == f"{p.tensor}@rows[{p.r0}:{p.r1}]" and s.dtype == src.dtype
        assert s.shape == (p.r1 - p.r0,) + src.shape[1:]
        assert s.nbytes <= cap or p.r1 - p.r0 == 1  # a lone row may exceed the cap
        rows.setdefault(p.tensor, []).append((p.r0, p.r1))
        if p.tensor not in names:
            names.append(p.tensor)
    assert names == [s.name for s in specs]  # input order kept
    for t, rs in rows.items():
        assert rs[0][0] == 0 and rs[-1][1] == by[t].shape[0]
        assert all(a[1] == b[0] for a, b in zip(rs, rs[1:]))  # contiguous, in order, no overlap
        assert len(rs) > 1


def test_split_rows_refuses_a_name_that_collides_and_a_bad_cap():
    with pytest.raises(ValueError, match="collides"):
        split_rows([spec("w", (4, 4)), spec("w@rows[0:2]", (2, 4))], 32)
    with pytest.raises(ValueError, match="cap_bytes"):
        split_rows([spec("w", (4, 4))], 0)


def test_piece_tensors_are_row_views():
    t = torch.arange(12.0).view(6, 2)
    m = PieceTensors({"w": t, "v": torch.ones(1)}, {"w@rows[2:5]": RowPiece("w@rows[2:5]", "w", 2, 5)})
    assert torch.equal(m["w@rows[2:5]"], t[2:5]) and m["w@rows[2:5]"].data_ptr() == t[2].data_ptr()
    assert m["v"] is not None and len(m) == 3 and set(m) == {"w", "v", "w@rows[2:5]"}


def apply_all(sources, dst, shards, cap, pieces_too=True):
    """Bucket every owner's (split) tensors at `cap`, pack, and apply through the compiled rows."""
    plan = plan_reshard(sources, dst)
    per_owner, pieces = {}, {}
    for r, lay in sources.items():
        chosen = plan.sources_needed().get(r, [])
        specs = [s for n, s in lay.tensors.items() if n in chosen]
        per_owner[r], pieces[r] = split_rows(specs, cap) if pieces_too else (specs, {})
    plan = plan_on_pieces(plan, pieces)
    buckets = interleave_owners(per_owner, cap)
    out = {n: torch.full(s.shape, float("nan")).to(s.dtype) for n, s in dst.tensors.items()}
    for b, c in zip(buckets, compile_buckets(plan, buckets)):
        buf = torch.zeros(b.nbytes, dtype=torch.uint8)
        fill_bucket(b, PieceTensors(shards[b.owner], pieces[b.owner]), buf)
        if c.rows.shape[0]:
            addrs = torch.tensor([out[n].data_ptr() for n in c.dst_names], dtype=torch.int64)
            ext.batched_strided_copy_(c.absolute_rows(buf.data_ptr(), addrs))
    return out, buckets, pieces


@pytest.mark.parametrize("src_tp,dst_tp", [(2, 1), (2, 2), (1, 2), (4, 1)])
@pytest.mark.parametrize("cap", [64, 300, 1000, 1500])
def test_pieces_apply_bitwise_as_whole_tensors_do(src_tp, dst_tp, cap):
    g = random_hf_state(TINY, seed=src_tp * 10 + dst_tp)
    sources = {r: megatron_like_layout(TINY, src_tp, r) for r in range(src_tp)}
    shards = {r: materialize(lay, g) for r, lay in sources.items()}
    for rank in range(dst_tp):
        dst = engine_tp_layout(TINY, dst_tp, rank)
        want = materialize(dst, g)
        got, buckets, pieces = apply_all(sources, dst, shards, cap)
        biggest = max(sp.nbytes for lay in sources.values() for sp in lay.tensors.values())
        assert any(pieces.values()) == (biggest > cap)
        for b in buckets:  # every bucket within the cap (its end aligned to 256), unless it is one row
            assert b.nbytes <= align_up(cap, 256) or len(b.entries) == 1, (b.index, b.nbytes)
        for n in want:
            assert torch.equal(got[n].view(torch.uint8), want[n].view(torch.uint8)), (n, cap)
        whole, _, _ = apply_all(sources, dst, shards, cap, pieces_too=False)
        assert all(torch.equal(whole[n].view(torch.uint8), got[n].view(torch.uint8)) for n in want)


def stacked_layouts(E=5, I=6, H=4):
    """A trainer holding experts stacked [E, I, H] and an engine holding one [I, H] per expert, and
    the reverse: a source box whose dim 0 is 1 wide (one expert), and a destination box whose first
    dim is 1 wide while the source's rows are not."""
    stacked, split = LayoutBuilder("stacked", torch.float32), LayoutBuilder("per-expert", torch.float32)
    stacked.tensor("w", (E, I, H))
    for e in range(E):
        g = f"experts.{e}.w"
        stacked.piece(g, (I, H), Box.full((I, H)), "w", Box((e, 0, 0), (1, I, H)))
        split.full(g, (I, H), f"e{e}")
    return stacked.build(), split.build()


@pytest.mark.parametrize("cap", [4, 20, 50, 96, 200])
@pytest.mark.parametrize("direction", ["stacked_to_split", "split_to_stacked"])
def test_pieces_of_stacked_experts_both_ways(cap, direction):
    stacked, split = stacked_layouts()
    src, dst = (stacked, split) if direction == "stacked_to_split" else (split, stacked)
    g = {f"experts.{e}.w": torch.randn(6, 4, generator=torch.Generator().manual_seed(e)) for e in range(5)}
    got, _, pieces = apply_all({0: src}, dst, {0: materialize(src, g)}, cap)
    assert bool(pieces[0]) == (max(sp.nbytes for sp in src.tensors.values()) > cap)
    want = materialize(dst, g)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_a_plan_without_pieces_is_returned_as_is():
    sources = {r: megatron_like_layout(TINY, 2, r) for r in range(2)}
    plan = plan_reshard(sources, engine_tp_layout(TINY, 1, 0))
    assert plan_on_pieces(plan, {0: {}, 1: {}}) is plan


@pytest.mark.parametrize("tp,ep,te", [(2, 1, False), (1, 2, True), (2, 2, False)])
@pytest.mark.parametrize("cap", [64, 700])
def test_pieces_of_real_megatron_layouts_into_engine_layouts(tp, ep, te, cap):
    """The trainer's own Megatron layouts (k2sys.trainer.naming, local and TE specs, EP) into the
    SGLang-like engine layouts (TP and EP), every source tensor over the cap cut into rows."""
    from k2sys.ckpt.layout import engine_layout
    from k2sys.trainer.naming import megatron_layout

    g = random_hf_state(TINY, seed=tp * 7 + ep, dtype=torch.float32)
    grid = [(t, e) for t in range(tp) for e in range(ep)]
    sources = {i: megatron_layout(TINY, tp, ep, t, e, torch.float32, te) for i, (t, e) in enumerate(grid)}
    shards = {i: materialize(lay, g) for i, lay in sources.items()}
    for dst_tp, dst_ep in ((1, 1), (2, 2)):
        for rank in range(dst_tp):
            dst = engine_layout(TINY, dst_tp, dst_ep, rank, torch.float32)
            got, _, pieces = apply_all(sources, dst, shards, cap)
            assert any(pieces.values())
            want = materialize(dst, g)
            assert all(torch.equal(got[n], want[n]) for n in want), (dst_tp, dst_ep, rank)
