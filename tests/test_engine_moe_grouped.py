"""The engine's routed experts as grouped GEMMs (k2sys.engine.core.moe) against the per-expert torch
reference they replaced (k2sys.models.moe_experts, the engine's moe_impl="loop") and against
transformers' DeepseekV3 router and experts (the independent check): random routing with experts
that get no token, every formulation (F.grouped_mm, the padded bmm, the per-pair GEMVs of small
batches), fp32 and bf16; and the engine's decode logits with moe_impl="grouped" vs "loop" and vs
the reference model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from k2sys.engine.core.config import EngineConfig, SamplingParams
from k2sys.engine.core.kv_cache import PagedLatentCache
from k2sys.engine.core.model_runner import MOE_IMPLS, ModelRunner
from k2sys.engine.core.moe import grouped_mm_works, grouped_moe, sort_by_expert
from k2sys.engine.core.scheduler import Request, Scheduler
from k2sys.models import build_model, k2_tiny, moe_experts, param_shapes, route
from k2sys.models.reference import MoE

CFG = dataclasses.replace(k2_tiny(vocab_size=256), hidden_size=32, moe_intermediate_size=16, n_routed_experts=8,
                          num_experts_per_tok=3, n_group=1, topk_group=1, initializer_range=0.2,
                          routed_scaling_factor=2.5, eos_token_id=None)
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 3e-2, "atol": 3e-2}}
DEAD = (1, 4, 6)  # experts the router bias keeps out of every top-k


def reference_moe(dtype: torch.dtype, seed: int = 0) -> MoE:
    """The reference MoE layer with random weights; experts DEAD never win a top-k slot."""
    g = torch.Generator().manual_seed(seed)
    m = MoE(CFG)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        m.gate.e_score_correction_bias[list(DEAD)] = -100.0
    m = m.to(dtype)
    m.gate.float()  # the router stays fp32, as in the checkpoint and the engine
    return m.eval()


def stacked(m: MoE) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's layout of the experts: w13 [E, 2I, D] (gate rows, then up rows), w2 [E, D, I]."""
    w13 = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in m.experts])
    w2 = torch.stack([e.down_proj.weight for e in m.experts])
    return w13.detach().contiguous(), w2.detach().contiguous()


def hf_experts(m: MoE, dtype: torch.dtype):
    """transformers' DeepseekV3 router (fp32) and routed experts holding the weights of m."""
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts, DeepseekV3TopkRouter

    hcfg = DeepseekV3Config(hidden_size=CFG.hidden_size, moe_intermediate_size=CFG.moe_intermediate_size,
                            n_routed_experts=CFG.n_routed_experts, num_experts_per_tok=CFG.num_experts_per_tok,
                            n_group=CFG.n_group, topk_group=CFG.topk_group, norm_topk_prob=CFG.norm_topk_prob,
                            routed_scaling_factor=CFG.routed_scaling_factor)
    router, experts = DeepseekV3TopkRouter(hcfg), DeepseekV3Experts(hcfg)
    w13, w2 = stacked(m)
    with torch.no_grad():
        router.weight.copy_(m.gate.weight)
        router.e_score_correction_bias.copy_(m.gate.e_score_correction_bias)
        experts.gate_up_proj.data = w13.clone()
        experts.down_proj.data = w2.clone()
    return router, experts.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 2, 5, 33])
def test_grouped_equals_loop_and_transformers(dtype, T):
    m = reference_moe(dtype)
    w13, w2 = stacked(m)
    x = torch.randn(T, CFG.hidden_size, generator=torch.Generator().manual_seed(T)).to(dtype)
    weights, ids = route(F.linear(x.float(), m.gate.weight), m.gate.e_score_correction_bias, CFG)
    used = set(ids.unique().tolist())
    assert not used & set(DEAD)  # the dead experts get zero tokens in every case
    router, experts = hf_experts(m, dtype)
    with torch.no_grad():
        _, hf_w, hf_ids = router(x)
        ref = experts(x, hf_ids, hf_w)
    # same experts per token (HF's order within a row is unspecified), same weights for them
    assert torch.equal(ids.sort(-1).values, hf_ids.sort(-1).values)
    torch.testing.assert_close(weights.gather(1, ids.argsort(-1)), hf_w.gather(1, hf_ids.argsort(-1)))
    experts13 = [lambda a, e=e: F.linear(a, w13[e]) for e in range(CFG.n_routed_experts)]
    experts2 = [lambda a, e=e: F.linear(a, w2[e]) for e in range(CFG.n_routed_experts)]
    loop = moe_experts(x, experts13, experts2, weights, ids)
    torch.testing.assert_close(moe_experts(x, w13, w2, weights, ids), loop, rtol=0, atol=0)  # tensors = callables
    # HF rounds each expert's weighted output to bf16 before summing: an error of the outputs' scale
    hf_tol = TOL[dtype] if dtype == torch.float32 else {"rtol": 3e-2, "atol": 1e-2 * float(ref.abs().max())}
    variants = {"auto": grouped_moe(x, w13, w2, weights, ids),
                "padded_bmm": grouped_moe(x, w13, w2, weights, ids, use_grouped_mm=False)}
    if grouped_mm_works(x.device, dtype):
        variants["grouped_mm"] = grouped_moe(x, w13, w2, weights, ids, use_grouped_mm=True)
    for name, out in variants.items():
        assert out.dtype == dtype and out.shape == x.shape, name
        torch.testing.assert_close(out.float(), loop.float(), **TOL[dtype], msg=f"{name} vs loop")
        torch.testing.assert_close(out.float(), ref.float(), **hf_tol, msg=f"{name} vs transformers")
    torch.testing.assert_close(loop.float(), ref.float(), **hf_tol)
    with torch.no_grad():  # the reference model's MoE layer is the same routed experts plus its shared expert
        torch.testing.assert_close((m(x) - m.shared_experts(x)).float(), loop.float(), **TOL[dtype])


def test_grouped_mm_runs_here_and_fp32_grouped_is_exact_vs_loop():
    """On CPU torch's grouped_mm serves both dtypes; in fp32 each group is the same GEMM as the loop's."""
    assert grouped_mm_works("cpu", torch.float32) and grouped_mm_works("cpu", torch.bfloat16)
    m = reference_moe(torch.float32)
    w13, w2 = stacked(m)
    x = torch.randn(16, CFG.hidden_size, generator=torch.Generator().manual_seed(1))
    weights, ids = route(F.linear(x, m.gate.weight), m.gate.e_score_correction_bias, CFG)
    loop = moe_experts(x, [lambda a, e=e: F.linear(a, w13[e]) for e in range(8)],
                       [lambda a, e=e: F.linear(a, w2[e]) for e in range(8)], weights, ids)
    assert torch.equal(grouped_moe(x, w13, w2, weights, ids, use_grouped_mm=True), loop)


def test_all_tokens_on_one_expert_and_sort_order():
    g = torch.Generator().manual_seed(2)
    E, D, I = 6, 8, 4
    w13, w2 = torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g)
    x = torch.randn(7, D, generator=g)
    ids = torch.tensor([[3, 5]] * 7)  # experts 0, 1, 2, 4 idle; 3 and 5 take every token
    weights = torch.rand(7, 2, generator=g)
    rows = sort_by_expert(ids, E)
    assert rows.counts.tolist() == [0, 0, 0, 7, 0, 7]
    assert rows.tok.tolist() == list(range(7)) * 2  # stable: tokens in order within an expert

    def expert(e, a):
        gg, u = (a @ w13[e].T).chunk(2, dim=-1)
        return (F.silu(gg) * u) @ w2[e].T
    want = weights[:, :1] * expert(3, x) + weights[:, 1:] * expert(5, x)
    for use in (None, True, False):
        torch.testing.assert_close(grouped_moe(x, w13, w2, weights, ids, use_grouped_mm=use), want)


# ---- the engine ----------------------------------------------------------------------------------
def decode_logits(state, dtype, impl: str, prompts: list[list[int]], new: int) -> list[torch.Tensor]:
    """Logits of every step (prefill, then batched decode) of the engine's runner + scheduler."""
    ecfg = EngineConfig(max_total_tokens=1024)
    runner = ModelRunner(CFG, state, dtype, "cpu", max_positions=256, moe_kernels="torch", moe_impl=impl)
    cache = PagedLatentCache(CFG.num_hidden_layers, ecfg.num_blocks, ecfg.block_size, CFG.kv_lora_rank,
                             CFG.qk_rope_head_dim, dtype)
    sched = Scheduler(ecfg, runner, cache, 256, None)
    logits = []
    forward = runner.forward_with_prompt_logprobs

    def keep(batch, c):  # record each step's logits (a wrapper on this instance only)
        out = forward(batch, c)
        logits.append(out[0].clone())
        return out
    runner.forward_with_prompt_logprobs = keep
    reqs = [Request(rid=str(i), input_ids=p, params=SamplingParams(max_new_tokens=new, temperature=0.0))
            for i, p in enumerate(prompts)]
    for r in reqs:
        sched.add(r)
    while sched.has_work():
        sched.step()
    outputs = [r.seqs[0].output_ids for r in reqs]
    assert all(len(o) == new for o in outputs)
    return logits, outputs


@pytest.fixture(scope="module")
def model():
    return build_model(dataclasses.replace(CFG, initializer_range=0.05), seed=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_logits_grouped_vs_loop(model, dtype):
    """Batch 1 (the per-pair GEMVs) and batch 5 (grouped GEMMs): the same logits as the loop path."""
    state = {k: v for k, v in model.state_dict().items() if k in param_shapes(CFG)}
    g = torch.Generator().manual_seed(5)
    for prompts in ([torch.randint(0, 256, (6,), generator=g).tolist()],
                    [torch.randint(0, 256, (3 + 4 * i,), generator=g).tolist() for i in range(5)]):
        got = {impl: decode_logits(state, dtype, impl, prompts, 6) for impl in MOE_IMPLS}
        (lg, out_g), (ll, out_l) = got["grouped"], got["loop"]
        assert len(lg) == len(ll) >= 6
        for a, b in zip(lg, ll):
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        if dtype == torch.float32:
            assert out_g == out_l


def test_decode_logits_match_reference_model(model):
    """Greedy decode through the grouped path: each step's logits equal the reference model run on the
    whole sequence so far (fp32)."""
    state = {k: v for k, v in model.state_dict().items() if k in param_shapes(CFG)}
    prompt = torch.randint(0, 256, (5,), generator=torch.Generator().manual_seed(6)).tolist()
    logits, outputs = decode_logits(state, torch.float32, "grouped", [prompt], 5)
    seq = prompt + outputs[0]
    with torch.no_grad():
        ref = model(torch.tensor([seq]))[0]  # [len, V]
    for step, lg in enumerate(logits):
        torch.testing.assert_close(lg[0], ref[len(prompt) - 1 + step], rtol=1e-4, atol=1e-4)


def test_set_moe_impl_packs_only_for_the_loop_and_rejects_unknown(model):
    state = {k: v for k, v in model.state_dict().items() if k in param_shapes(CFG)}
    runner = ModelRunner(CFG, state, torch.float32, "cpu", max_positions=64, moe_kernels="torch")
    assert runner.moe_impl == "grouped"
    grouped_bytes = runner.weight_bytes
    runner.set_moe_impl("loop")
    if runner.packed:  # oneDNN present: the loop keeps packed expert copies, the grouped path none
        assert runner.weight_bytes > grouped_bytes
        runner.set_moe_impl("grouped")
        assert runner.weight_bytes == grouped_bytes
    with pytest.raises(ValueError, match="moe_impl"):
        runner.set_moe_impl("fused")
    with pytest.raises(ValueError, match="moe_impl"):
        ModelRunner(CFG, state, torch.float32, "cpu", max_positions=64, moe_impl="nope")


def test_bench_decode_runs_and_its_rows_follow_the_bound_rule(tmp_path, monkeypatch):
    """benchmarks/bench_decode.py end to end on k2-tiny (one short round): every row kind, the
    batch-1 target on the grouped rows only, the bytes a batch-1 step reads."""
    import json
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_decode
    import common

    out = tmp_path / "decode.json"
    assert bench_decode.main(["--model", "k2-tiny", "--reps", "1", "--steps-b1", "1", "--steps-b32", "1",
                              "--json", str(out)]) == 0
    body = json.loads(out.read_text())
    rows = {r["name"]: r for r in body["results"]}
    common.validate_rows(body["results"])
    for t in common.thread_counts():
        r = rows[f"decode_b1_grouped_vs_roofline_x{t}"]
        assert r["kind"] == "bound" and r["target"] == 0.6 and r["threads"] == t and r["ratio"] > 0
        assert rows[f"decode_b1_loop_vs_roofline_x{t}"]["target"] is None
        assert rows[f"decode_b32_routed_experts_grouped_vs_loop_x{t}"]["kind"] == "peer"
        assert rows[f"decode_b32_routed_share_grouped_x{t}"]["kind"] == "diagnostic"
    # batch 1 reads: 1 embedding row, k of the E experts per MoE layer, every other weight whole
    cfg = k2_tiny()
    shapes = param_shapes(cfg)
    k, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    want = 0.0
    for name, shape in shapes.items():
        n = torch.Size(shape).numel()
        if ".mlp.experts." in name:  # one of E same-shaped expert tensors: k of them are read
            want += n * k / E
        elif name == "model.embed_tokens.weight":
            want += shape[1]
        else:
            want += n
    assert body["env"]["b1"]["read_bytes_per_step"] == want * 4  # fp32


def test_set_moe_impl_while_released_packs_at_the_next_update(model):
    state = {k: v for k, v in model.state_dict().items() if k in param_shapes(CFG)}
    runner = ModelRunner(CFG, state, torch.float32, "cpu", max_positions=64, moe_kernels="torch")
    runner.release_weights()
    runner.set_moe_impl("loop")  # nothing to pack from: no error
    runner.resume_weights()
    runner.load_weights(state)
    ref = ModelRunner(CFG, state, torch.float32, "cpu", max_positions=64, moe_kernels="torch", moe_impl="loop")
    assert runner.weight_bytes == ref.weight_bytes  # the loop's packed expert copies are back
