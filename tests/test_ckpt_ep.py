"""Expert-parallel engine layouts: pure plan checks by hand, then a 2-rank gloo update from a
TP2/EP2 trainer into an engine at TP2/EP2, bitwise, pipelined and serial, checksums on."""

import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ckpt_fixtures import TINY, free_port, materialize, megatron_like_layout, random_hf_state
from k2sys.ckpt import TensorSink, PlanError, TrainerShards, UpdateConfig, engine_layout, engine_tp_layout, \
    plan_reshard, update_weights

WORLD = 2


def test_ep_layout_by_hand():
    g = random_hf_state(TINY, seed=3)
    p, a = "model.layers.1.mlp.experts.", "model.layers.1.self_attn."
    gate = lambda e: g[f"{p}{e}.gate_proj.weight"]  # noqa: E731
    up = lambda e: g[f"{p}{e}.up_proj.weight"]  # noqa: E731
    down = lambda e: g[f"{p}{e}.down_proj.weight"]  # noqa: E731
    # TP2/EP2: rank 1 holds experts 2, 3 whole (moe tp = 1); attention is still TP2.
    w = materialize(engine_layout(TINY, 2, 2, 1), g)
    assert w[p + "w13_weight"].shape == (2, 16, 32) and w[p + "w2_weight"].shape == (2, 32, 8)
    assert torch.equal(w[p + "w13_weight"][1], torch.cat([gate(3), up(3)]))
    assert torch.equal(w[p + "w2_weight"][0], down(2))
    assert torch.equal(w[a + "o_proj.weight"], g[a + "o_proj.weight"][:, 16:])
    s = "model.layers.1.mlp.shared_experts."
    assert torch.equal(w[s + "gate_up_proj.weight"], torch.cat([g[s + "gate_proj.weight"][4:], g[s + "up_proj.weight"][4:]]))
    # TP4/EP2: rank 3 = expert group 1, MoE-TP rank 1 -> experts 2, 3, intermediate rows 4:8.
    w = materialize(engine_layout(TINY, 4, 2, 3), g)
    assert w[p + "w13_weight"].shape == (2, 8, 32)
    assert torch.equal(w[p + "w13_weight"][0], torch.cat([gate(2)[4:], up(2)[4:]]))
    assert torch.equal(w[p + "w2_weight"][1], down(3)[:, 4:])
    # EP1 is the TP layout.
    assert engine_layout(TINY, 2, 1, 1).fingerprint == engine_tp_layout(TINY, 2, 1).fingerprint


@pytest.mark.parametrize("tp,ep,match", [(4, 3, "ep_size=3 must divide tp_size=4"), (2, 2, "rank 2 must be in"),
                                         (8, 8, "n_routed_experts.*not divisible by 8")])
def test_ep_layout_errors(tp, ep, match):
    with pytest.raises(PlanError, match=match):
        engine_layout(TINY, tp, ep, 2)


@pytest.mark.parametrize("dst_tp,dst_ep", [(2, 2), (4, 2), (4, 4), (1, 1)])
def test_plan_tp2ep2_trainer_to_ep_engine_exact(dst_tp, dst_ep):
    g = random_hf_state(TINY, seed=dst_tp + dst_ep)
    sources = {r: megatron_like_layout(TINY, 2, r) for r in range(2)}
    src = {r: materialize(sources[r], g) for r in sources}
    for rank in range(dst_tp):
        dst = engine_layout(TINY, dst_tp, dst_ep, rank)
        plan = plan_reshard(sources, dst)
        out = {n: torch.zeros(s.shape, dtype=s.dtype) for n, s in dst.tensors.items()}
        for op in plan.ops:  # plain torch apply: checks the plan alone
            op.dst_box.view(out[op.dst_name]).copy_(op.src_box.view(src[op.src_rank][op.src_name]).reshape(op.dst_box.sizes))
        expect = materialize(dst, g)
        assert all(torch.equal(out[n], expect[n]) for n in expect)
        if dst_ep == 2 and dst_tp == 2:  # EP groups line up with the trainer's: experts never cross ranks
            assert {op.src_rank for op in plan.ops if ".mlp.experts." in op.global_name} == {rank}


def bitwise_equal(got, expect):
    return set(got) == set(expect) and all(torch.equal(got[n].view(-1).view(torch.uint8),
                                                       expect[n].view(-1).view(torch.uint8)) for n in expect)


def worker(rank: int, port: int, out_dir: str) -> None:
    res = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=60))
        g = random_hf_state(TINY, seed=9)
        src = megatron_like_layout(TINY, 2, rank)
        shards = TrainerShards(src, materialize(src, g))
        dst = engine_layout(TINY, 2, 2, rank)
        for pipeline in (True, False):
            r = TensorSink(dst)
            rep = update_weights(shards, r, config=UpdateConfig(bucket_bytes=4096, pipeline=pipeline, checksum=True))
            res[pipeline] = (bitwise_equal(r.weights, materialize(dst, g)), rep.mode, rep.n_buckets)
        dist.destroy_process_group()
    except Exception:
        res["error"] = traceback.format_exc()
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


def test_gloo_tp2ep2_to_engine_ep2_bitwise(tmp_path):
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        if p.is_alive():
            p.kill()
            pytest.fail("a rank hung")
    for r in range(WORLD):
        res = torch.load(os.path.join(tmp_path, f"rank{r}.pt"))
        assert "error" not in res, res.get("error")
        assert res[True][:2] == (True, "coop") and res[False][:2] == (True, "serial") and res[True][2] > 2
