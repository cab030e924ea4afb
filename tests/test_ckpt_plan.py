"""Pure planners of the checkpoint engine, table-style: bucketing, layouts, reshard plans."""

import pytest
import torch

from ckpt_fixtures import TINY, materialize, megatron_like_layout, random_hf_state
from k2sys.ckpt import (Box, CopyOp, Layout, LayoutBuilder, Piece, PlanError, ReshardPlan, TensorSpec,
                        engine_tp_layout, hf_layout, hf_param_shapes, plan_buckets, plan_reshard, validate_plan)
from k2sys.ckpt.apply import compile_buckets
from k2sys.ckpt.bucket import interleave_owners
from k2sys.ckpt.startup import CheckpointTensor, assign_readers
from k2sys import ext


def spec(name, n, dtype=torch.float32):
    return TensorSpec(name, (n,), dtype)


@pytest.mark.parametrize("sizes,cap,expect_groups", [
    ([10, 10, 10], 1024, [["t0", "t1", "t2"]]),
    ([100, 100], 128, [["t0"], ["t1"]]),              # 400 B each > 128: own buckets
    ([60, 1, 60], 512, [["t0", "t1"], ["t2"]]),       # 240 -> 256 aligned; +4 -> 512; 3rd does not fit
    ([64, 0, 64], 512, [["t0", "t1", "t2"]]),         # empty tensor keeps its place
    ([7, 300, 7], 256, [["t0"], ["t1"], ["t2"]]),     # oversize in the middle closes both sides
])
def test_buckets_table(sizes, cap, expect_groups):
    specs = [spec(f"t{i}", n) for i, n in enumerate(sizes)]
    buckets = plan_buckets(specs, cap)
    assert [[e.name for e in b.entries] for b in buckets] == expect_groups
    seen = {}
    for b in buckets:
        assert b.nbytes % 256 == 0
        for e in b.entries:
            assert e.offset % 256 == 0
            seen[e.name] = seen.get(e.name, 0) + e.nbytes
        if len(b.entries) > 1:
            assert b.entries[-1].offset + b.entries[-1].nbytes <= cap
    assert seen == {s.name: s.nbytes for s in specs}  # every byte exactly once
    assert plan_buckets(specs, cap) == buckets        # deterministic


def test_bucket_errors_and_interleave():
    with pytest.raises(ValueError, match="twice"):
        plan_buckets([spec("a", 1), spec("a", 1)], 1024)
    with pytest.raises(ValueError, match="power of two"):
        plan_buckets([spec("a", 1)], 1024, align=100)
    bs = interleave_owners({0: [spec("a", 300), spec("b", 300)], 1: [spec("c", 300)]}, 1024)
    assert [(b.index, b.owner, b.entries[0].name) for b in bs] == [(0, 0, "a"), (1, 1, "c"), (2, 0, "b")]


def test_one_layout_and_one_packer_for_every_bucket():
    """FlattenedBucket.pack, shared-memory segments and the update pipeline share bucket_of /
    plan_buckets (layout) and fill_bucket (copy): offsets aligned, bytes exact, dtypes mixed."""
    from k2sys.ckpt.bucket import BucketFormatError, FlattenedBucket, bucket_of, fill_bucket
    from k2sys.engine.transport.shm import ALIGN, ShmSegment, split_buckets

    g = torch.Generator().manual_seed(0)
    named = [("a", torch.randn(3, 5, generator=g, dtype=torch.float32).to(torch.bfloat16)),
             ("b", torch.randint(-9, 9, (7,), generator=g, dtype=torch.int64)),
             ("empty", torch.empty(0, 4)), ("c", torch.randn(65, generator=g)),
             ("d", torch.randn(2, 3, generator=g).t())]  # non-contiguous source
    b = bucket_of(named, 64)
    assert [e.name for e in b.entries] == [n for n, _ in named]
    assert all(e.offset % 64 == 0 for e in b.entries) and b.nbytes % 64 == 0
    assert b.nbytes == sum(-(-t.numel() * t.element_size() // 64) * 64 for _, t in named)
    fb = FlattenedBucket.pack(named)
    assert fb.entries == b.entries
    for (n, t), (m, v) in zip(named, fb.unpack()):
        assert n == m and v.dtype == t.dtype and torch.equal(v, t)
    buf = torch.zeros(b.nbytes, dtype=torch.uint8)
    fill_bucket(b, dict(named), buf, threads=2)
    assert torch.equal(buf, fb.buffer)
    with pytest.raises(BucketFormatError, match="duplicate name 'a'"):
        bucket_of(named + [("a", torch.zeros(1))])
    with pytest.raises(BucketFormatError, match="entries\\['b'\\]"):
        fill_bucket(b, {**dict(named), "b": torch.zeros(7, dtype=torch.int32)}, buf)
    with ShmSegment(b.nbytes) as seg:
        entries = seg.write(named)
        assert entries == [e.to_json() for e in bucket_of(named, ALIGN).entries]
        for e, (_, t) in zip(bucket_of(named, ALIGN).entries, named):
            got = seg.tensor[e.offset:e.end].view(t.dtype).view(t.shape) if e.nbytes else t
            assert torch.equal(got, t)
    groups = split_buckets(named, cap_bytes=128)
    assert [n for grp in groups for n, _ in grp] == [n for n, _ in named]
    assert all(sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN for _, t in grp) <= 128 or len(grp) == 1
               for grp in groups)


def test_hf_shapes_match_transformers_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DeepseekV3Config(**TINY, num_key_value_heads=4, tie_word_embeddings=False)
    with torch.device("meta"):
        model = transformers.DeepseekV3ForCausalLM(cfg)
    ours = hf_param_shapes(TINY)
    # transformers fuses experts in memory (docs/FACTS.md); compare everything else name by name.
    theirs = {n: tuple(p.shape) for n, p in model.state_dict().items() if ".mlp.experts." not in n}
    assert {n: s for n, s in ours.items() if ".mlp.experts." not in n} == theirs
    assert ours["model.layers.1.mlp.experts.3.down_proj.weight"] == (32, 8)


@pytest.mark.parametrize("src_tp,dst_tp", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (2, 4)])
def test_reshard_between_tp_sizes_is_exact(src_tp, dst_tp):
    g = random_hf_state(TINY, seed=src_tp * 10 + dst_tp)
    sources = {r: megatron_like_layout(TINY, src_tp, r) for r in range(src_tp)}
    src_tensors = {r: materialize(sources[r], g) for r in sources}
    for dst_rank in range(dst_tp):
        dst = engine_tp_layout(TINY, dst_tp, dst_rank)
        plan = plan_reshard(sources, dst)
        out = {n: torch.zeros(s.shape, dtype=s.dtype) for n, s in dst.tensors.items()}
        for op in plan.ops:  # apply with plain torch: checks the plan, not the native copy
            src = op.src_box.view(src_tensors[op.src_rank][op.src_name])
            op.dst_box.view(out[op.dst_name]).copy_(src.reshape(op.dst_box.sizes))
        expect = materialize(dst, g)
        assert all(torch.equal(out[n], expect[n]) for n in expect)
        # Replicated tensors are read from exactly one rank.
        assert len({(op.src_rank, op.src_name) for op in plan.ops if op.global_name == "model.norm.weight"}) == 1


def test_engine_layout_fusions_by_hand():
    g = random_hf_state(TINY, seed=5)
    w = materialize(engine_tp_layout(TINY, 2, 1), g)
    p = "model.layers.1.mlp.experts."
    gate, up, down = (g[f"{p}2.{k}_proj.weight"] for k in ("gate", "up", "down"))
    assert torch.equal(w[p + "w13_weight"][2], torch.cat([gate[4:8], up[4:8]]))
    assert torch.equal(w[p + "w2_weight"][2], down[:, 4:8])
    d = "model.layers.0.mlp."
    assert torch.equal(w[d + "gate_up_proj.weight"], torch.cat([g[d + "gate_proj.weight"][12:], g[d + "up_proj.weight"][12:]]))
    a = "model.layers.0.self_attn."
    assert torch.equal(w[a + "o_proj.weight"], g[a + "o_proj.weight"][:, 16:])
    assert torch.equal(w[a + "kv_b_proj.weight"], g[a + "kv_b_proj.weight"][32:])


def test_apply_rows_match_plan_on_odd_sizes():
    # Odd shapes, a float64 tensor, a 0-d tensor: rows compiled from buckets equal torch slicing.
    shapes = {"a": (7, 13), "b": (5,), "c": (3, 1, 9), "d": ()}
    dtypes = {"a": torch.float16, "b": torch.float64, "c": torch.bfloat16, "d": torch.float32}
    gen = torch.Generator().manual_seed(0)
    g = {n: torch.randn(s, generator=gen).to(dtypes[n]) for n, s in shapes.items()}
    srcs = {}
    for r in range(2):  # rank r holds a row band of "a" (4 + 3 rows), and all else replicated
        b = LayoutBuilder(f"src{r}", torch.float32)
        rows = (0, 4) if r == 0 else (4, 3)
        b.tensor("a_part", (rows[1], 13), torch.float16)
        b.piece("a", (7, 13), Box((rows[0], 0), (rows[1], 13)), "a_part", Box.full((rows[1], 13)))
        for n in ("b", "c", "d"):
            b.full(n, shapes[n], dtype=dtypes[n])
        srcs[r] = b.build()
    dst = hf_layout(shapes, dtypes)
    plan = plan_reshard(srcs, dst)
    per_owner = {r: [s for n, s in lay.tensors.items() if (r, n) in plan.src_specs] for r, lay in srcs.items()}
    buckets = interleave_owners(per_owner, 300)
    out = {n: torch.zeros(s, dtype=dtypes[n]) for n, s in shapes.items()}
    for b, comp in zip(buckets, compile_buckets(plan, buckets)):
        addrs = torch.tensor([out[n].data_ptr() for n in comp.dst_names], dtype=torch.int64)  # this bucket's targets
        buf = torch.zeros(b.nbytes, dtype=torch.uint8)
        for e in b.entries:
            lay = srcs[b.owner]
            src = materialize(lay, g)[e.name]
            buf[e.offset:e.offset + e.nbytes].copy_(src.reshape(-1).view(torch.uint8))
        if comp.rows.shape[0]:
            ext.batched_strided_copy_(comp.absolute_rows(buf.data_ptr(), addrs))
    assert all(torch.equal(out[n], g[n]) for n in shapes)


def _plan(ops, dst_shapes, src_shapes, dtype=torch.float32, src_dtype=None):
    dst = hf_layout(dst_shapes, dtype)
    specs = {(0, n): TensorSpec(n, s, src_dtype or dtype) for n, s in src_shapes.items()}
    return ReshardPlan(tuple(ops), dst, specs)


def op(src, sbox, dst, dbox):
    return CopyOp(dst, 0, src, Box(*sbox), dst, Box(*dbox))


@pytest.mark.parametrize("ops,match", [
    ([op("w", ((0, 0), (2, 4)), "x", ((0, 0), (2, 4)))], "x.*writes 8 of 12.*gap"),
    ([op("w", ((0, 0), (2, 4)), "x", ((0, 0), (2, 4))), op("w", ((1, 0), (2, 4)), "x", ((1, 0), (2, 4)))], "x.*overlap"),
    ([op("w", ((0, 0), (3, 4)), "x", ((1, 0), (3, 4)))], "outside destination x"),
    ([op("w", ((2, 0), (3, 4)), "x", ((0, 0), (3, 4)))], "outside source w"),
    ([op("nope", ((0, 0), (3, 4)), "x", ((0, 0), (3, 4)))], "source tensor nope"),
])
def test_bad_plans_are_rejected_naming_the_tensor(ops, match):
    with pytest.raises(PlanError, match=match):
        validate_plan(_plan(ops, {"x": (3, 4)}, {"w": (4, 4)}))


def test_dtype_and_shape_disagreement_named():
    with pytest.raises(PlanError, match="x: dtype torch.float16 of source w"):
        validate_plan(_plan([op("w", ((0, 0), (3, 4)), "x", ((0, 0), (3, 4)))], {"x": (3, 4)}, {"w": (3, 4)},
                            src_dtype=torch.float16))
    src = hf_layout({"x": (3, 5)})
    with pytest.raises(PlanError, match=r"global tensor x has shape \(3, 5\)"):
        plan_reshard(src, hf_layout({"x": (3, 4)}))
    with pytest.raises(PlanError, match="needs global tensor y"):
        plan_reshard(hf_layout({"x": (3, 4)}), hf_layout({"x": (3, 4), "y": (2,)}))


def test_layout_validation_messages():
    with pytest.raises(PlanError, match="embed_tokens.weight dim 0: size 64 is not divisible by 5 ranks"):
        engine_tp_layout(TINY, 5, 0)
    with pytest.raises(PlanError, match="lacks field 'hidden_size'"):
        hf_param_shapes({})
    with pytest.raises(ValueError, match="does not fit global tensor w"):
        Piece("w", (2,), Box((0,), (3,)), "l", Box((0,), (3,)))
    b1 = Box((0, 0), (2, 2))
    with pytest.raises(PlanError, match="box .* does not fit local tensor l"):
        Layout({"l": TensorSpec("l", (1, 2), torch.float32)}, (Piece("w", (2, 2), b1, "l", b1),))
    # Partially overlapping, non-replica sources are ambiguous.
    s0 = Layout({"a": TensorSpec("a", (3,), torch.float32)}, (Piece("w", (4,), Box((0,), (3,)), "a", Box((0,), (3,))),))
    s1 = Layout({"b": TensorSpec("b", (2,), torch.float32)}, (Piece("w", (4,), Box((2,), (2,)), "b", Box((0,), (2,))),))
    with pytest.raises(PlanError, match="global tensor w: source pieces .* overlap"):
        plan_reshard({0: s0, 1: s1}, hf_layout({"w": (4,)}, torch.float32))


def test_assign_readers_disjoint_and_balanced():
    idx = [CheckpointTensor(f"f{i // 3}", TensorSpec(f"t{i}", (n,), torch.float32))
           for i, n in enumerate([5, 1, 9, 4, 4, 2, 7, 3])]
    for world in (1, 2, 3, 8, 10):
        parts = assign_readers(idx, world)
        names = [t.spec.name for p in parts for t in p]
        assert names == [t.spec.name for t in idx]  # each once, in order
    parts = assign_readers(idx, 2)
    sizes = [sum(t.spec.nbytes for t in p) for p in parts]
    assert abs(sizes[0] - sizes[1]) <= 9 * 4


def test_single_process_update_round_trips_through_the_engine_layout():
    """World size 1 (colocated on one process): the direct path copies plan slices straight into
    the receiver; HF -> engine layout (fused w13, TP=1) -> HF is bitwise."""
    import torch

    from k2sys.ckpt import TensorSink, engine_tp_layout, hf_layout, update_weights
    from k2sys.ckpt.pipeline import TrainerShards
    from k2sys.models import k2_tiny, param_shapes

    cfg = k2_tiny(vocab_size=64)
    shapes = param_shapes(cfg)
    g = torch.Generator().manual_seed(0)
    hf = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    src = hf_layout(shapes, torch.float32)
    eng = TensorSink(engine_tp_layout(cfg, 1, 0, torch.float32))
    rep = update_weights(TrainerShards(layout=src, tensors=hf), eng)
    assert rep.mode == "local" and rep.bytes_applied == sum(t.numel() * 4 for t in hf.values())
    back = TensorSink(src)
    update_weights(TrainerShards(layout=eng.layout, tensors=eng.weights), back)
    assert back.weights.keys() == hf.keys()
    for k, v in hf.items():
        assert torch.equal(back.weights[k], v), k
