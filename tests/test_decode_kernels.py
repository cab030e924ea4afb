"""The C++ decode kernels (csrc/gemv.cpp) against torch: GEMV, the routed experts' GEMV pairs, RMSNorm
and the K2 router; and the native engine's decode with them against the same runner on torch ops."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from k2sys import ext
from k2sys.models.moe import moe_experts, route_topk

pytestmark = pytest.mark.skipif(not ext.HAS_CPP, reason="k2sys._C not built")


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 7), (4, 16), (5, 17), (37, 515), (1024, 512), (4099, 129)])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_gemv_matches_linear(rows, cols, threads):
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(cols, generator=g)
    b = torch.randn(rows, generator=g)
    ref = F.linear(x.double(), w.double(), b.double()).float()
    out = ext.gemv(w, x, b, threads=threads)
    assert out.shape == (rows,)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * cols ** 0.5)
    out2 = ext.gemv(w, x[None], threads=threads)  # a [1, K] row, no bias
    assert out2.shape == (1, rows)
    torch.testing.assert_close(out2[0], F.linear(x.double(), w.double()).float(), rtol=1e-5, atol=1e-5 * cols ** 0.5)


def test_gemv_large_matrix_split_over_threads_and_strided_rows():
    """A matrix big enough to be split over the pool (>= 256 KiB per task), and a row-strided view."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(8192, 640, generator=g)
    w = base[:, 64:576]  # row stride 640, 512 columns
    x = torch.randn(512, generator=g)
    ref = (w.double() @ x.double()).float()
    for t in (1, 2, 3):
        torch.testing.assert_close(ext.gemv(w, x, threads=t), ref, rtol=1e-5, atol=1e-4)
    out = torch.empty(8192)
    assert ext.gemv(w, x, out=out) is out


def test_gemv_rejects_what_it_cannot_read():
    w, x = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match="fp32 CPU"):
        ext.gemv(w.double(), x.double())
    with pytest.raises(ValueError, match="unit column stride"):
        ext.gemv(w.t(), torch.randn(4))
    with pytest.raises(ValueError, match=r"x must be a contiguous \[8\]"):
        ext.gemv(w, torch.randn(2, 8))
    with pytest.raises(ValueError, match="bias must be"):
        ext.gemv(w, x, bias=torch.randn(3))


_ISA_CHECK = """
import sys, torch, torch.nn.functional as F
from k2sys import _C, ext
want = sys.argv[1]
cpu = open("/proc/cpuinfo").read().split()
have = {"avx512f": "avx512f" in cpu, "avx2_fma": "avx2" in cpu and "fma" in cpu, "generic": True}
order = ["avx512f", "avx2_fma", "generic"]
expect = next(i for i in order[order.index(want):] if have[i])
assert _C.gemv_isa() == expect, (_C.gemv_isa(), expect)
g = torch.Generator().manual_seed(7)
for rows, cols in [(1, 1), (3, 15), (2, 16), (5, 17), (7, 31), (3, 33), (6, 63), (4, 64), (9, 65), (2, 100), (33, 1031)]:
    base = torch.randn(rows, cols + 3, generator=g)
    w, x, b = base[:, 1:cols + 1], torch.randn(cols, generator=g), torch.randn(rows, generator=g)
    ref = F.linear(x.double(), w.double(), b.double()).float()
    torch.testing.assert_close(ext.gemv(w, x, b), ref, rtol=1e-5, atol=1e-5 * cols ** 0.5)
    torch.testing.assert_close(ext.gemv(w, x, b, threads=2), ref, rtol=1e-5, atol=1e-5 * cols ** 0.5)
print("isa", _C.gemv_isa())
"""


@pytest.mark.parametrize("isa", ["avx512f", "avx2_fma", "generic"])
def test_every_gemv_kernel_the_cpu_has_matches_linear(isa):
    """K2SYS_GEMV_ISA caps the kernel picked at load: each kernel this CPU can run (AVX-512F, AVX2/FMA, the
    portable one) on column counts around its vector widths and tails, row-strided, 1 and 2 threads."""
    env = dict(os.environ, K2SYS_GEMV_ISA=isa)
    res = subprocess.run([sys.executable, "-c", _ISA_CHECK, isa], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "isa " in res.stdout


def test_gemv_isa_cap_rejects_unknown_value():
    env = dict(os.environ, K2SYS_GEMV_ISA="sse9")
    code = "import torch; from k2sys import _C; _C.gemv_isa()"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "K2SYS_GEMV_ISA must be avx512f, avx2_fma or generic" in res.stderr


@pytest.mark.parametrize("T,k,E,D,inter", [(1, 4, 16, 512, 256), (3, 2, 8, 64, 48), (5, 8, 32, 100, 36),
                                           (32, 4, 16, 512, 256), (40, 3, 5, 77, 19), (64, 8, 8, 33, 40)])
@pytest.mark.parametrize("threads", [1, 2])
def test_moe_pairs_matches_reference(T, k, E, D, inter, threads):
    """Pairs grouped by expert: one GEMV per lone pair, several tokens of an expert through one pass over
    its weights (1 to 8 at a time; T=64 k=8 E=8 gives ~64 tokens per expert), odd widths, skipped ids."""
    g = torch.Generator().manual_seed(T * 31 + E)
    x = torch.randn(T, D, generator=g)
    w13 = torch.randn(E, 2 * inter, D, generator=g) / D ** 0.5
    w2 = torch.randn(E, D, inter, generator=g) / inter ** 0.5
    ids = torch.randint(0, E, (T, k), generator=g)
    ids[0, -1] = ids[0, 0]  # the same expert twice for one token
    if T > 1:
        ids[1, 0] = -1  # an expert on another rank: contributes nothing
    weights = torch.rand(T, k, generator=g)
    ref = moe_experts(x.double(), w13.double(), w2.double(), weights.double(), ids).float()
    out = ext.moe_pairs(x, w13, w2, weights, ids, threads=threads)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_moe_pairs_checks_layout_and_ids():
    x, w13, w2 = torch.randn(1, 8), torch.randn(4, 6, 8), torch.randn(4, 8, 3)
    ids, wt = torch.tensor([[1, 2]]), torch.rand(1, 2)
    with pytest.raises(ValueError, match="w2 must be"):
        ext.moe_pairs(x, w13, torch.randn(4, 8, 4), wt, ids)
    with pytest.raises(ValueError, match="ids and weights"):
        ext.moe_pairs(x, w13, w2, torch.rand(1, 3), ids)
    with pytest.raises(ValueError, match="out of range"):
        ext.moe_pairs(x, w13, w2, wt, torch.tensor([[1, 4]]))


def test_rms_norm_matches_torch_on_strided_rows():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(7, 300, generator=g)
    x = a[:, 20:277]  # row stride 300, 257 columns (not a multiple of 8)
    w = torch.randn(257, generator=g)
    ref = F.rms_norm(x.double(), (257,), w.double(), 1e-6).float()
    torch.testing.assert_close(ext.rms_norm(x, w, 1e-6), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unit column stride"):
        ext.rms_norm(a.t(), torch.randn(7), 1e-6)


def test_route_topk_matches_torch_router_with_ties_and_groups():
    """Same ids (ties to the lower index, descending order) and weights as k2sys.models.moe.route_topk
    on random logits, rounded logits (many ties), with and without bias and group limiting."""
    g = torch.Generator().manual_seed(3)
    for trial in range(200):
        n_group = [1, 2, 4, 8][trial % 4]
        E = n_group * int(torch.randint(2, 9, (1,), generator=g))
        topk_group = max(1, n_group // 2)
        k = min(int(torch.randint(1, 7, (1,), generator=g)), topk_group * (E // n_group))
        T = int(torch.randint(1, 6, (1,), generator=g))
        logits = torch.randn(T, E, generator=g)
        if trial % 3 == 0:
            logits = logits.round()
        bias = (torch.randn(E, generator=g) * 0.1).round(decimals=trial % 2) if trial % 2 else None
        norm = trial % 5 != 0
        w_ref, i_ref = route_topk(logits, bias, k, n_group, topk_group, 2.5, norm)
        w, i = ext.route_topk(logits, bias, k, n_group, topk_group, 2.5, norm)
        assert torch.equal(i, i_ref), (trial, i, i_ref)
        torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ctx_len,threads", [(1, 1), (37, 1), (200, 2), (1400, 2)])
def test_mla_decode_matches_torch(ctx_len, threads):
    """The fused absorbed MLA attention of one token over a paged cache (shuffled blocks, a partial last
    block, strided query and kv_b views as the engine passes them) against the formula in torch, float64."""
    g = torch.Generator().manual_seed(ctx_len)
    H, N, C, R, V, bs = 4, 24, 40, 12, 20, 16
    nb = -(-ctx_len // bs)
    cache = torch.randn(96, bs, C + R, generator=g)
    blocks = torch.randperm(96, generator=g)[:nb].contiguous()
    q = torch.randn(1, H, N + R, generator=g)
    q_nope, q_rope = q[0, :, :N], torch.randn(1, H + 1, R, generator=g)[0, :H]
    kvb = torch.randn(H, N + V, C, generator=g) / C ** 0.5
    w_uk, w_uv = kvb[:, :N], kvb[:, N:]
    scale = 0.37
    kv = cache[blocks].reshape(-1, C + R)[:ctx_len].double()
    q_lat = torch.einsum("hn,hnc->hc", q_nope.double(), w_uk.double())
    s = scale * (q_lat @ kv[:, :C].T + q_rope.double() @ kv[:, C:].T)
    ref = torch.einsum("hvc,hc->hv", w_uv.double(), s.softmax(-1) @ kv[:, :C]).float()
    o = torch.empty(H, V)
    ext._C.mla_decode_f32_ptr(o.data_ptr(), q_nope.data_ptr(), q_nope.stride(0), q_rope.data_ptr(), q_rope.stride(0),
                              w_uk.data_ptr(), w_uk.stride(0), w_uv.data_ptr(), w_uv.stride(0), cache.data_ptr(),
                              blocks.data_ptr(), 96, bs, ctx_len, H, N, C, R, V, scale, threads)
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-5)
    bad = blocks.clone()
    bad[0] = 96
    with pytest.raises(ValueError, match="block id out of range"):
        ext._C.mla_decode_f32_ptr(o.data_ptr(), q_nope.data_ptr(), q_nope.stride(0), q_rope.data_ptr(), q_rope.stride(0),
                                  w_uk.data_ptr(), w_uk.stride(0), w_uv.data_ptr(), w_uv.stride(0), cache.data_ptr(),
                                  bad.data_ptr(), 96, bs, ctx_len, H, N, C, R, V, scale, threads)


def _decode_runner(cfg, total_tokens: int):
    """The native engine's runner and latent cache for cfg's random model (seed 0) with non-trivial
    norms and biases (a model at init has ones and zeros), fp32 on the CPU: (runner, cache, config)."""
    from k2sys.engine.core import model_runner as mr
    from k2sys.engine.core.config import EngineConfig
    from k2sys.engine.core.kv_cache import PagedLatentCache
    from k2sys.models import build_model, param_shapes

    state = {k: v for k, v in build_model(cfg, seed=0).state_dict().items() if k in param_shapes(cfg)}
    g = torch.Generator().manual_seed(3)
    for name, t in state.items():
        if name.endswith("norm.weight") or name.endswith(".bias") or name.endswith("correction_bias"):
            t.add_(0.1 * torch.randn(t.shape, generator=g))
    ecfg = EngineConfig(max_total_tokens=total_tokens, max_num_batched_tokens=1024)
    runner = mr.ModelRunner(cfg, state, torch.float32, "cpu", max_positions=cfg.max_position_embeddings,
                            moe_kernels="torch")
    cache = PagedLatentCache(cfg.num_hidden_layers, ecfg.num_blocks, ecfg.block_size, cfg.kv_lora_rank,
                             cfg.qk_rope_head_dim, torch.float32)
    return runner, cache, ecfg


def _capture_logits(runner, want) -> list[torch.Tensor]:
    """Wrap the runner's forward so the logits of every step whose batch passes want(batch) are kept
    (in order) in the returned list."""
    logits: list[torch.Tensor] = []
    forward = runner.forward_with_prompt_logprobs

    def keep(batch, cache_):
        out = forward(batch, cache_)
        if want(batch):
            logits.append(out[0].clone())
        return out

    runner.forward_with_prompt_logprobs = keep
    return logits


def _engine_decode(cfg, steps: int, fused: bool = True, prompt=(5, 9, 2, 11, 3, 7)) -> tuple[list[int], torch.Tensor]:
    """Greedy decode of one request through the native engine's scheduler and runner: (tokens, the
    logits of the batch-1 decode steps)."""
    from k2sys.engine.core.config import SamplingParams
    from k2sys.engine.core.scheduler import Request, Scheduler

    runner, cache, ecfg = _decode_runner(cfg, 2048)
    runner.fused_decode = fused
    logits = _capture_logits(runner, lambda batch: True)
    sched = Scheduler(ecfg, runner, cache, cfg.max_position_embeddings, None)
    req = Request(rid="r", input_ids=list(prompt),
                  params=SamplingParams(max_new_tokens=steps, temperature=0.0, ignore_eos=True))
    sched.add(req)
    for _ in range(steps + 1):
        sched.step()
    return list(req.seqs[0].output_ids), torch.cat(logits[1:])  # logits[1:]: the decode steps (batch 1)


class _Counting:
    """The real k2sys._C, counting which kernels are called."""

    def __init__(self):
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        fn = getattr(ext._C, name)

        def call(*a):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*a)
        return call


@pytest.mark.parametrize("fused", [True, False])
def test_engine_decode_with_cpp_kernels_matches_torch_ops(monkeypatch, fused):
    """The native engine's runner at batch 1 on the C++ kernels against the same runner with the C++ core
    hidden (torch ops throughout): same greedy tokens, logits within fp32 noise. fused: every layer in one
    decode_layers_f32 call per step; else the per-op path (C++ GEMV, routed experts, RMSNorm, router, MLA)."""
    from k2sys.engine.core import model_runner as mr
    from k2sys.engine.core import moe as emoe
    from k2sys.models import preset

    cfg = preset("k2-tiny", eos_token_id=None)
    counting = _Counting()
    monkeypatch.setattr(mr, "_C", counting)
    monkeypatch.setattr(emoe, "_C", counting)
    toks, logits = _engine_decode(cfg, 12, fused=fused)
    calls = counting.calls
    if fused:
        assert calls.get("decode_layers_f32_ptr", 0) == logits.shape[0] >= 11, calls  # every decode step
        n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        # per-op kernels: only the prefill's routed experts (one C++ call per MoE layer); no decode step's
        assert "mla_decode_f32_ptr" not in calls and calls.get("moe_pairs_f32_ptr", 0) == n_moe, calls
    else:
        assert "decode_layers_f32_ptr" not in calls, calls
        for kernel in ("gemv_f32_ptr", "moe_pairs_f32_ptr", "rms_norm_f32_ptr", "route_topk_f32_ptr",
                       "mla_decode_f32_ptr"):
            assert calls.get(kernel, 0) >= 12, (kernel, calls)
    monkeypatch.setattr(mr, "_C", None)
    monkeypatch.setattr(emoe, "_C", None)
    toks_ref, logits_ref = _engine_decode(cfg, 12)
    assert toks == toks_ref
    assert logits.shape == logits_ref.shape and logits.shape[0] >= 11
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["no_q_lora", "no_shared_half_split_bias", "dense_only_one_group",
                                     "top1_unnormalized"])
def test_fused_decode_matches_per_op_path_across_configs(monkeypatch, variant):
    """The fused C++ decode stack against the engine's torch path on model shapes the tiny preset does
    not have: no q_lora (q_proj), no shared experts with half-split RoPE and attention biases, all dense
    layers, top-1 routing without normalization; a 40-token decode crosses cache blocks."""
    import dataclasses

    from k2sys.engine.core import model_runner as mr
    from k2sys.engine.core import moe as emoe
    from k2sys.models import preset

    base = preset("k2-tiny", eos_token_id=None)
    changes = {"no_q_lora": dict(q_lora_rank=None),
               "no_shared_half_split_bias": dict(n_shared_experts=0, rope_interleave=False, attention_bias=True),
               "dense_only_one_group": dict(first_k_dense_replace=base.num_hidden_layers, n_group=1, topk_group=1),
               "top1_unnormalized": dict(num_experts_per_tok=1, norm_topk_prob=False, n_group=1, topk_group=1,
                                         routed_scaling_factor=1.7)}[variant]
    cfg = dataclasses.replace(base, **changes)
    counting = _Counting()
    monkeypatch.setattr(mr, "_C", counting)
    toks, logits = _engine_decode(cfg, 40, prompt=(4, 8, 15, 16, 23, 42, 7))
    assert counting.calls.get("decode_layers_f32_ptr", 0) == logits.shape[0] >= 39, counting.calls
    monkeypatch.setattr(mr, "_C", None)
    monkeypatch.setattr(emoe, "_C", None)
    toks_ref, logits_ref = _engine_decode(cfg, 40, prompt=(4, 8, 15, 16, 23, 42, 7))
    assert toks == toks_ref
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)


def _engine_decode_many(cfg, prompts, steps: int, max_batch: int, every_step: bool = False):
    """Greedy decode of several requests at once through the native scheduler and runner (the runner's
    fused_max_batch set to max_batch): (tokens per request, logits of the steps where every request
    decodes, stacked)."""
    from k2sys.engine.core.config import SamplingParams
    from k2sys.engine.core.scheduler import Request, Scheduler

    runner, cache, ecfg = _decode_runner(cfg, 4096)
    runner.fused_max_batch = max_batch
    logits = _capture_logits(runner, lambda batch: every_step or (
        batch.input_ids.shape[0] == len(prompts) and all(gr.rows.shape[1] == 1 for gr in batch.groups)))
    sched = Scheduler(ecfg, runner, cache, cfg.max_position_embeddings, None)
    reqs = [Request(rid=f"r{i}", input_ids=list(p),
                    params=SamplingParams(max_new_tokens=steps, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(prompts)]
    for r in reqs:
        sched.add(r)
    for _ in range(steps + 2):
        sched.step()
    if every_step:
        return [list(r.seqs[0].output_ids) for r in reqs], torch.cat(logits)
    return [list(r.seqs[0].output_ids) for r in reqs], torch.stack(logits) if logits else None


@pytest.mark.parametrize("variant", ["tiny", "no_q_lora_half_split"])
def test_fused_decode_of_several_tokens_matches_per_op_and_batch_one(monkeypatch, variant):
    """Decode steps of 5 requests (contexts of different lengths, crossing cache blocks) through
    decode_tokens_f32 (one C++ call per step for every token) against the torch path with the C++ core
    hidden, and each request decoded alone (batch 1): same greedy tokens, logits within fp32 noise.
    With fused_max_batch=1 the same steps take the per-op path."""
    import dataclasses

    from k2sys.engine.core import model_runner as mr
    from k2sys.engine.core import moe as emoe
    from k2sys.models import preset

    cfg = preset("k2-tiny", eos_token_id=None)
    if variant != "tiny":
        cfg = dataclasses.replace(cfg, q_lora_rank=None, rope_interleave=False, attention_bias=True)
    prompts = [(5, 9, 2), tuple(range(3, 40)), (11, 3, 7, 1, 8), tuple(range(50, 67)), (4,)]
    counting = _Counting()
    monkeypatch.setattr(mr, "_C", counting)
    toks, logits = _engine_decode_many(cfg, prompts, 24, max_batch=8)
    assert counting.calls.get("decode_tokens_f32_ptr", 0) == logits.shape[0] >= 20, counting.calls
    per_op = _Counting()
    monkeypatch.setattr(mr, "_C", per_op)
    toks_off, logits_off = _engine_decode_many(cfg, prompts, 24, max_batch=1)
    assert "decode_tokens_f32_ptr" not in per_op.calls and per_op.calls.get("rms_norm_f32_ptr", 0) > 0
    assert toks_off == toks
    torch.testing.assert_close(logits_off, logits, rtol=1e-4, atol=1e-4)
    for p, want in zip(prompts, toks):  # each alone: batch-1 fused steps
        alone, _ = _engine_decode_many(cfg, [p], 24, max_batch=8)
        assert alone == [want]
    monkeypatch.setattr(mr, "_C", None)
    monkeypatch.setattr(emoe, "_C", None)
    toks_ref, logits_ref = _engine_decode_many(cfg, prompts, 24, max_batch=8)
    assert toks_ref == toks
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)


def test_fused_batch_limit_follows_the_cache():
    """fused_max_batch: FUSED_MAX_BATCH where the decoder layers fit in half the last-level cache."""
    from k2sys.engine.core import model_runner as mr
    from k2sys.models import build_model, param_shapes, preset

    cfg = preset("k2-tiny")
    state = {k: v for k, v in build_model(cfg, seed=0).state_dict().items() if k in param_shapes(cfg)}
    stack = sum(t.numel() * 4 for n, t in state.items() if ".layers." in n)
    for llc, want in ((4 * stack, mr.FUSED_MAX_BATCH), (stack, 1)):
        mr_llc = llc
        orig = mr.last_level_cache_bytes
        try:
            mr.last_level_cache_bytes = lambda default=0, v=mr_llc: v
            runner = mr.ModelRunner(cfg, state, torch.float32, "cpu", max_positions=64, moe_kernels="torch")
        finally:
            mr.last_level_cache_bytes = orig
        assert runner.fused_max_batch == want
    assert mr.last_level_cache_bytes() > 0


def test_padded_prefill_attends_sequence_by_sequence(monkeypatch):
    """A prefill group of prompts of very different lengths (padding > PAD_WASTE) attends one sequence
    at a time (exact-size GEMMs, _seq_plan), a group of equal ones stays padded; either way the logits
    of every step (prefill and decode) and the greedy tokens equal the padded batch's."""
    from k2sys.engine.core import model_runner as mr
    from k2sys.models import preset

    cfg = preset("k2-tiny", eos_token_id=None)
    prompts = [(5, 9, 2), tuple(range(3, 70)), (11, 3, 7, 1, 8), tuple(range(50, 90))]
    plans = []
    orig = mr.ModelRunner._seq_plan

    def spy(self, g, block_size, dtype):
        plan = orig(self, g, block_size, dtype)
        plans.append((tuple(g.rows.shape), plan is not None))
        return plan

    monkeypatch.setattr(mr.ModelRunner, "_seq_plan", spy)
    toks, logits = _engine_decode_many(cfg, prompts, 6, max_batch=1, every_step=True)
    assert ((4, 67), True) in plans, plans  # the prefill of all four: padded to 67 of 115 real queries
    monkeypatch.setattr(mr, "PAD_WASTE", float("inf"))
    plans.clear()
    toks_pad, logits_pad = _engine_decode_many(cfg, prompts, 6, max_batch=1, every_step=True)
    assert not any(p for _, p in plans)
    assert toks == toks_pad
    torch.testing.assert_close(logits, logits_pad, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(mr, "PAD_WASTE", 1.25)
    plans.clear()
    _engine_decode_many(cfg, [tuple(range(3, 30)), tuple(range(40, 67))], 2, max_batch=1, every_step=True)
    assert ((2, 27), False) in plans, plans  # equal prompts: no padding, the batch stays one GEMM


def test_seq_plan_only_takes_the_scheduler_layout():
    """_seq_plan splits a padded prefill group only when its rows, validity and query positions are the
    scheduler's layout (each sequence's queries on consecutive rows, its last positions before ctx_len);
    any other group keeps the padded batch, which reads them as given."""
    from k2sys.engine.core import model_runner as mr
    from k2sys.models import build_model, param_shapes, preset

    cfg = preset("k2-tiny")
    state = {k: v for k, v in build_model(cfg, seed=0).state_dict().items() if k in param_shapes(cfg)}
    runner = mr.ModelRunner(cfg, state, torch.float32, "cpu", max_positions=256, moe_kernels="torch")
    ctx = [40, 9]  # sequence 0: 2 new queries over 40 positions; sequence 1: a 9-token prompt
    rows = torch.tensor([[0, 1] + [1] * 7, list(range(2, 11))])
    qpos = torch.tensor([[38, 39] + [0] * 7, list(range(9))])
    valid = torch.tensor([[True, True] + [False] * 7, [True] * 9])
    tables = torch.tensor([[3, 4, 5], [6, 0, 0]])

    def group(r=rows, q=qpos, v=valid):
        return mr.AttnGroup(rows=r, qpos=q, block_tables=tables, ctx_len=torch.tensor(ctx), valid=v)

    plan = runner._seq_plan(group(), 16, torch.float32)
    assert [(r0, k, c, b.tolist(), tuple(m.shape)) for r0, k, c, b, m in plan] == \
        [(0, 2, 40, [3, 4, 5], (2 * runner.H, 40)), (2, 9, 9, [6], (9 * runner.H, 9))]
    m = plan[0][4].view(2, runner.H, 40)[:, 0]
    assert torch.isinf(m[0, 39]) and m[0, 38] == 0 and m[1, 39] == 0  # causal within the new queries
    assert runner._seq_plan(group(q=qpos + torch.tensor([[1], [0]])), 16, torch.float32) is None
    assert runner._seq_plan(group(r=rows.flip(0)), 16, torch.float32) is None
    assert runner._seq_plan(group(v=valid.flip(1)), 16, torch.float32) is None
    mr_waste = mr.PAD_WASTE
    try:
        mr.PAD_WASTE = 100.0  # padding within the allowance: the padded batch
        assert runner._seq_plan(group(), 16, torch.float32) is None
    finally:
        mr.PAD_WASTE = mr_waste
