"""Megatron backend on one CPU rank: conversion, logits/logprobs vs the reference model, packed
sequences, expert-bias update, offload/onload, resume, Muon, CPU shims. k2_tiny, vocab 512, fp32."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

warnings.filterwarnings("ignore")

from k2sys.models import K2Config, build_model, k2_tiny, load_hf, save_hf  # noqa: E402
from k2sys.trainer import convert, naming  # noqa: E402
from k2sys.trainer.backend import BatchError, MegatronBackend, TrainerConfig  # noqa: E402
from k2sys.trainer.optim import OptimConfig, newton_schulz  # noqa: E402

VOCAB = 512


def _cfg() -> K2Config:
    return k2_tiny(VOCAB)


def _yarn_grouped_cfg() -> K2Config:
    # YaRN + group-limited routing (4 groups, keep 2, top-4 = 2 * topk_group) + routed scaling.
    return dataclasses.replace(
        k2_tiny(VOCAB), n_group=4, topk_group=2, num_experts_per_tok=4, routed_scaling_factor=2.5,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})


def _batch(seed: int, B: int = 2, T: int = 16):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, VOCAB, (B, T + 1), generator=g)
    return {"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": (torch.rand(B, T, generator=g) > 0.2).float()}


def _ref_logprobs(ref, tokens, labels):
    with torch.no_grad():
        return torch.log_softmax(ref(tokens).float(), -1).gather(-1, labels[..., None])[..., 0]


@pytest.fixture(scope="module")
def ref():
    return build_model(_cfg(), seed=0)


# ---- conversion ----------------------------------------------------------------------------
@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 1), (1, 2), (2, 4), (4, 8)])
def test_round_trip_is_bitwise(ref, tp, ep):
    hf = ref.state_dict()
    shards = {(t, e): naming.hf_to_megatron(hf, ref.config, tp, ep, t, e) for t in range(tp) for e in range(ep)}
    back = naming.megatron_to_hf(shards, ref.config, tp, ep)
    assert set(back) == set(hf)
    for k in hf:
        assert torch.equal(back[k], hf[k]), k
    # A real split happened: rank 0 holds a strict part of the vocab and of expert 0's gate/up only.
    local = shards[(0, 0)]
    assert local["embedding.word_embeddings.weight"].shape[0] == VOCAB // tp
    fc1 = local["decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"]
    I = ref.config.moe_intermediate_size
    assert torch.equal(fc1[: I // tp], hf["model.layers.1.mlp.experts.0.gate_proj.weight"][: I // tp])
    assert torch.equal(fc1[I // tp:], hf["model.layers.1.mlp.experts.0.up_proj.weight"][: I // tp])
    n_local = sum(".local_experts." in k and k.endswith("linear_fc2.weight") for k in local)
    assert n_local == (ref.config.num_hidden_layers - 1) * ref.config.n_routed_experts // ep


def test_replica_mismatch_is_an_error(ref):
    hf = ref.state_dict()
    shards = {(t, 0): naming.hf_to_megatron(hf, ref.config, 2, 1, t, 0) for t in range(2)}
    shards[(1, 0)]["decoder.final_layernorm.weight"] += 1
    with pytest.raises(ValueError, match="replicas of model.norm.weight differ"):
        naming.megatron_to_hf(shards, ref.config, 2, 1)


def test_convert_cli_round_trip_and_logits(ref, tmp_path):
    # One writer rank (this process); multi-rank writes and megatron loads: tests/test_convert_dist.py.
    from megatron.core import dist_checkpointing

    save_hf(ref, tmp_path / "hf")
    assert convert.main(["hf-to-megatron", str(tmp_path / "hf"), str(tmp_path / "mg")]) == 0
    assert dist_checkpointing.check_is_distributed_checkpoint(str(tmp_path / "mg"))
    assert convert.main(["megatron-to-hf", str(tmp_path / "mg"), str(tmp_path / "hf2")]) == 0
    a, b = load_hf(tmp_path / "hf"), load_hf(tmp_path / "hf2")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    be = MegatronBackend.from_hf(tmp_path / "hf2")
    ids = _batch(0)["tokens"]
    assert (be.logits(ids) - a(ids).detach()).abs().max() <= 1e-4
    # a converted checkpoint starts training directly (weights, fresh optimizer)
    be2 = MegatronBackend.from_checkpoint(tmp_path / "mg")
    assert torch.equal(be2.logits(ids), be.logits(ids)) and be2.step == 0
    assert be2.train_step(_batch(1)).loss > 0


def test_layout_matches_model(ref):
    be = MegatronBackend.from_model(ref)
    shards, layout = be.export_shards()
    local = be.local_state()
    assert set(layout.tensors) == set(local)
    for name, spec in layout.tensors.items():
        assert tuple(local[name].shape) == spec.shape, name
    assert set(layout.global_shapes()) == set(ref.state_dict())


# ---- model numerics --------------------------------------------------------------------------
def test_yarn_grouped_routing_logits_match_reference():
    cfg = _yarn_grouped_cfg()
    r = build_model(cfg, seed=3)
    with torch.no_grad():  # non-zero expert bias: routing must use it for choice, not for weights
        for i in range(1, cfg.num_hidden_layers):
            r.model.layers[i].mlp.gate.e_score_correction_bias.normal_(0, 0.05)
            r.model.layers[i].mlp.gate.weight.normal_(0, 0.5)
    be = MegatronBackend.from_model(r)
    ids = torch.randint(0, VOCAB, (2, 80), generator=torch.Generator().manual_seed(1))  # > original_max_pos
    assert (be.logits(ids) - r(ids).detach()).abs().max() <= 1e-4


def test_group_topk_other_than_twice_topk_group_is_supported():
    from k2sys.trainer.spec import check_supported

    # Once refused (megatron scores groups by top-(k // topk_group)); the trainer now routes with HF's
    # top-2 group scoring for any k (logits vs transformers: tests/test_trainer_group_routing.py).
    check_supported(dataclasses.replace(_yarn_grouped_cfg(), num_experts_per_tok=3))


def test_logprobs_match_reference(ref):
    be = MegatronBackend.from_model(ref)
    b = _batch(1)
    lp = be.logprobs(b)
    want = _ref_logprobs(ref, b["tokens"], b["labels"]) * b["loss_mask"]
    assert lp.shape == b["tokens"].shape
    assert (lp - want).abs().max() <= 1e-4


def test_packed_sequences_are_isolated(ref):
    be = MegatronBackend.from_model(ref)
    g = torch.Generator().manual_seed(5)
    lens = [5, 11, 7, 9]  # two rows of 16: [5, 11] and [7, 9]
    seqs = [torch.randint(0, VOCAB, (n + 1,), generator=g) for n in lens]
    tokens = torch.cat([s[:-1] for s in seqs]).view(2, 16)
    labels = torch.cat([s[1:] for s in seqs]).view(2, 16)
    pos = torch.cat([torch.arange(n) for n in lens]).view(2, 16)
    cu = torch.tensor([0, 5, 16, 23, 32], dtype=torch.int32)
    batch = {"tokens": tokens, "labels": labels, "loss_mask": torch.ones(2, 16), "position_ids": pos, "cu_seqlens": cu}
    packed = be.logprobs(batch).reshape(-1)
    alone = torch.cat([_ref_logprobs(ref, s[None, :-1], s[None, 1:])[0] for s in seqs])
    assert (packed - alone).abs().max() <= 1e-4
    # Without the boundaries the later sequences would see the earlier ones: a real difference.
    plain = be.logprobs({"tokens": tokens, "labels": labels}).reshape(-1)
    assert (plain - alone).abs().max() > 1e-3
    with pytest.raises(BatchError, match="position_ids"):
        be.logprobs({**batch, "position_ids": torch.arange(16).expand(2, 16)})
    with pytest.raises(BatchError, match="row end"):
        be.logprobs({**batch, "cu_seqlens": torch.tensor([0, 5, 23, 32])})
    r = be.train_step(batch)  # SFT step on the pack runs
    assert r.num_tokens == 32 and r.loss > 0


def test_expert_bias_follows_load(ref):
    rate = 0.01
    be = MegatronBackend.from_model(ref, train=TrainerConfig(bias_update_rate=rate, optim=OptimConfig(lr=0.0)))
    b = _batch(2, B=2, T=32)
    loads = {}
    hooks = [ref.model.layers[i].mlp.gate.register_forward_hook(
        lambda m, a, out, i=i: loads.__setitem__(i, torch.bincount(out[1].reshape(-1), minlength=8).float()))
        for i in range(1, 4)]
    ref(b["tokens"])
    for h in hooks:
        h.remove()
    be.train_step(b)
    for i in range(1, 4):
        bias = be.local_state()[f"decoder.layers.{i}.mlp.router.expert_bias"]
        want = rate * torch.sign(loads[i].mean() - loads[i])
        assert torch.allclose(bias, want), (i, bias, want)


# ---- optimizer -----------------------------------------------------------------------------
def test_newton_schulz_orthogonalises():
    g = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    o = newton_schulz(g, 5)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    sv = torch.linalg.svdvals(o)
    assert sv.min() > 0.5 and sv.max() < 1.3  # the quintic iteration lands near 1, not exactly
    assert (o - u @ vh).norm() / (u @ vh).norm() < 0.35
    assert newton_schulz(g.T, 5).allclose(o.T, atol=1e-5)


def test_muon_trains(ref):
    be = MegatronBackend.from_model(ref, train=TrainerConfig(optim=OptimConfig(name="muon", lr=0.02)))
    b = _batch(3)
    losses = [be.train_step(b).loss for _ in range(4)]
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="use_distributed_optimizer"):
        OptimConfig(name="muon", use_distributed_optimizer=True).validate()


# ---- ownership switching and checkpoints ----------------------------------------------------
def test_offload_onload_bit_exact(ref):
    mk = lambda: MegatronBackend.from_model(ref, train=TrainerConfig(optim=OptimConfig(lr=1e-2)))  # noqa: E731
    a, b = mk(), mk()
    for s in range(2):
        a.train_step(_batch(10 + s)), b.train_step(_batch(10 + s))
    before = [t.detach().clone() for t in a._state_tensors()]
    stats = a.offload()
    assert stats["bytes"] > 0 and stats["GBps"] > 0
    assert all(t.untyped_storage().nbytes() == 0 for t in a._state_tensors())  # freed
    with pytest.raises(RuntimeError, match="onload"):
        a.train_step(_batch(12))
    a.onload()
    after = a._state_tensors()
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    la = [a.train_step(_batch(12 + s)).loss for s in range(2)]
    lb = [b.train_step(_batch(12 + s)).loss for s in range(2)]
    assert la == lb


def test_save_resume_equals_uninterrupted(ref, tmp_path):
    train = TrainerConfig(optim=OptimConfig(lr=1e-2))
    a = MegatronBackend.from_model(ref, train=train)
    for s in range(2):
        a.train_step(_batch(20 + s))
    a.save(tmp_path / "ckpt")
    cont = [a.train_step(_batch(22 + s)).loss for s in range(2)]
    b = MegatronBackend.from_checkpoint(tmp_path / "ckpt")
    assert b.step == 2
    resumed = [b.train_step(_batch(22 + s)).loss for s in range(2)]
    assert resumed == cont
    convert.main(["megatron-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")])
    c = MegatronBackend.from_checkpoint(tmp_path / "ckpt")
    exported = load_hf(tmp_path / "hf").state_dict()
    for k, v in c.hf_state_dict().items():
        assert torch.equal(v, exported[k]), k


# ---- CPU shims ------------------------------------------------------------------------------
def test_each_cpu_shim_is_needed(ref):
    from megatron.core import parallel_state as ps

    from k2sys.trainer import cpu_compat
    from k2sys.trainer.parallel import ParallelConfig, init_parallel

    if not cpu_compat.needed():
        pytest.skip("CUDA present: shims are not applied")
    train = TrainerConfig(optim=OptimConfig(lr=1e-2, clip_grad=1e-3))  # clip_grad forces the clipping path

    def attempt():
        ps.destroy_model_parallel()
        init_parallel(ParallelConfig())
        be = MegatronBackend.from_model(ref, train=train)
        be.train_step(_batch(30))

    try:
        for name in cpu_compat.SHIM_NAMES:
            if name == "alltoall_splits":
                continue  # only bites with expert parallelism: test_trainer_parallel checks it with EP=2
            cpu_compat.apply_cpu_shims(disable=[name])
            with pytest.raises(Exception):
                attempt()
    finally:
        cpu_compat.apply_cpu_shims()
    attempt()
    assert torch.cuda.FloatTensor is not None and not hasattr(torch.cuda, "_k2sys")  # torch itself untouched
    import megatron.core.optimizer.optimizer as mopt

    assert isinstance(mopt.torch, cpu_compat.MegatronTorchView) and torch.zeros is not mopt.torch.zeros


def test_export_shards_while_offloaded_reads_the_host_copy():
    """The checkpoint engine reads weights from DRAM after offload: same bytes as before offload."""
    from k2sys.models import build_model, k2_tiny
    from k2sys.trainer.backend import MegatronBackend

    be = MegatronBackend.from_model(build_model(k2_tiny(vocab_size=128), seed=3))
    live, layout = be.export_shards()
    before = {k: v.clone() for k, v in live.items()}
    be.offload()
    host, layout2 = be.export_shards()
    assert layout2.tensors.keys() == layout.tensors.keys()
    for k, v in before.items():
        assert host[k].device.type == "cpu" and torch.equal(host[k], v), k
    be.onload()
    again, _ = be.export_shards()
    for k, v in before.items():
        assert torch.equal(again[k], v)
