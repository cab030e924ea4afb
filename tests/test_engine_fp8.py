"""The native engine serving FP8 (EngineConfig.quantization="fp8", `k2sys serve --quantization fp8`).

A K2 model with hidden sizes >= 128 (real 128x128 blocks, partial edge blocks, fused weights whose
parts do and do not fill whole blocks) is quantized by a per-block formula written here with
torch's own float8 cast, never by the package's quantizer. Checked: the engine holds exactly the
release layout (X.weight float8 + X.weight_scale_inv) and nothing else in FP8; its logits equal a
full-precision engine on the dequantized weights; its distance from the unquantized model (the FP8
tolerance, printed); weight updates in bf16 land as exactly the quantized values, one quantize call
per bucket, all or nothing; and the server flag with the shared-memory update route."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import time

import httpx
import pytest
import torch

import k2sys.quant
from ckpt_fixtures import free_port
from k2sys.engine.core.config import EngineConfig, EngineError, RequestError, SamplingParams
from k2sys.engine.core.engine import NativeEngine
from k2sys.engine.core.kv_cache import PagedLatentCache
from k2sys.engine.core.model_runner import AttnGroup, ModelRunner, StepBatch
from k2sys.engine.transport.wire import FlattenedBucket
from k2sys.models import build_model, k2_tiny, param_shapes, save_hf

F8 = torch.float8_e4m3fn
# hidden 256 = two column blocks; q_lora 192 and dense FFN 320 leave partial row blocks inside fused
# weights (attn_in = q_a | kv_a, gate | up); expert FFN 128 fills whole blocks; kv_b has 32 columns.
CFG = dataclasses.replace(k2_tiny(vocab_size=512), hidden_size=256, intermediate_size=320, moe_intermediate_size=128,
                          q_lora_rank=192, initializer_range=0.05, eos_token_id=None)
LINEARS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
           "down_proj")


def quantized_by_release(name: str) -> bool:
    """Every attention / MLP Linear weight (dense, experts, shared); the router `mlp.gate` is not one."""
    parts = name.split(".")
    return parts[-1] == "weight" and parts[-2] in LINEARS


def formula_quant(w: torch.Tensor, b: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    R, C = w.shape
    q = torch.empty(R, C, dtype=F8)
    s = torch.empty(math.ceil(R / b), math.ceil(C / b))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * b:(i + 1) * b, j * b:(j + 1) * b]
            scale = blk.abs().max() / torch.tensor(448.0)
            s[i, j] = scale if scale != 0 else 1.0
            q[i * b:(i + 1) * b, j * b:(j + 1) * b] = (blk / s[i, j]).clamp(-448, 448).to(F8)
    return q, s


def formula_dequant(q: torch.Tensor, s: torch.Tensor, b: int = 128) -> torch.Tensor:
    R, C = q.shape
    return q.float() * s.repeat_interleave(b, 0).repeat_interleave(b, 1)[:R, :C]


def release_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for n, t in state.items():
        if quantized_by_release(n):
            out[n], out[n + "_scale_inv"] = formula_quant(t)
        else:
            out[n] = t
    return out


def dequantized(release: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: formula_dequant(t, release[n + "_scale_inv"]) if t.dtype == F8 else t
            for n, t in release.items() if not n.endswith("_scale_inv")}


def model_state(seed: int) -> dict[str, torch.Tensor]:
    names = param_shapes(CFG)
    return {n: t.detach().clone() for n, t in build_model(CFG, seed=seed).state_dict().items() if n in names}


@pytest.fixture(scope="module")
def state():
    return model_state(3)


@pytest.fixture(scope="module")
def release(state):
    return release_state(state)


def prefill_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    """Logits at every position of one sequence, prefilled in a single step."""
    T, bs = len(ids), 16
    nb = -(-T // bs)
    cache = PagedLatentCache(CFG.num_hidden_layers, nb, bs, CFG.kv_lora_rank, CFG.qk_rope_head_dim, runner.dtype)
    pos = torch.arange(T)
    group = AttnGroup(rows=pos[None], qpos=pos[None], block_tables=torch.arange(nb)[None], ctx_len=torch.tensor([T]),
                      valid=torch.ones(1, T, dtype=torch.bool))
    batch = StepBatch(input_ids=torch.tensor(ids), positions=pos, slots=pos, groups=[group], logit_rows=pos)
    return runner.forward(batch, cache).float()


def prompt(seed: int, n: int = 48) -> list[int]:
    return torch.randint(0, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def runner(state, dtype=torch.float32, **kw) -> ModelRunner:
    return ModelRunner(CFG, state, dtype, **kw)


# ---------------------------------------------------------------- storage

def test_storage_is_the_release_layout_and_stays_fp8(state, release):
    r = runner(state, quantization="fp8")
    expect_bytes = 0
    for name, shape in param_shapes(CFG).items():
        if quantized_by_release(name):
            q, s = r.params[name], r.params[name + "_scale_inv"]
            assert q.dtype == F8 and s.dtype == torch.float32, name
            assert torch.equal(q.view(torch.uint8), release[name].view(torch.uint8)), name
            assert torch.equal(s, release[name + "_scale_inv"]), name
            expect_bytes += q.numel() + 4 * s.numel()
        else:
            assert r.params[name].dtype != F8 and name + "_scale_inv" not in r.params, name
            assert torch.equal(r.params[name], state[name].to(r.params[name].dtype)), name
            expect_bytes += r.params[name].numel() * r.params[name].element_size()
    assert set(r.params) == set(release)
    packed = sum(lin.packed.numel() * lin.packed.element_size() for lin in r.linears if lin.packed is not None)
    assert r.weight_bytes - packed == expect_bytes  # resident weights: exactly the release bytes


def test_release_state_is_kept_as_is(state, release):
    """Weights already in FP8 (from_pretrained passes a release checkpoint raw) are not re-quantized."""
    odd = dict(release)
    name = "model.layers.2.mlp.experts.3.down_proj.weight"
    odd[name + "_scale_inv"] = release[name + "_scale_inv"] * 2  # not what a re-quantization would give
    r = runner(odd, quantization="fp8")
    assert torch.equal(r.params[name + "_scale_inv"], odd[name + "_scale_inv"])
    assert torch.equal(r.params[name].view(torch.uint8), odd[name].view(torch.uint8))


def test_unquantized_engine_refuses_fp8_weights(release):
    with pytest.raises(ValueError, match="quantization='fp8'"):
        runner(release)
    bad = dict(release)
    bad.pop("model.layers.0.self_attn.o_proj.weight_scale_inv")
    with pytest.raises(ValueError, match="o_proj.weight.*without"):
        runner(bad, quantization="fp8")


# ---------------------------------------------------------------- numerics

def test_fp8_logits_equal_the_dequantized_model(release):
    """The FP8 engine computes with exactly the release formula's weights (fp32 compute)."""
    fp8 = runner(release, quantization="fp8")
    ref = runner(dequantized(release))
    for seed in (1, 2):
        ids = prompt(seed)
        a, b = prefill_logits(fp8, ids), prefill_logits(ref, ids)
        assert (a - b).abs().max() < 1e-4
        assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_tolerance_vs_full_precision(state, dtype):
    """FP8 weights vs the unquantized model, same compute dtype: the measured tolerance."""
    full, fp8 = runner(state, dtype), runner(state, dtype, quantization="fp8")
    diffs, refs, agree, n = [], [], 0, 0
    for seed in range(4):
        ids = prompt(seed)
        a, b = prefill_logits(full, ids), prefill_logits(fp8, ids)
        diffs.append((a - b).flatten())
        refs.append(a.flatten())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0]
    d, ref = torch.cat(diffs), torch.cat(refs)
    max_abs, rel = float(d.abs().max()), float(d.norm() / ref.norm())
    print(f"\nfp8 vs {dtype}: max|logit diff| {max_abs:.4f}, logit range {float(ref.abs().max()):.3f}, "
          f"relative (Frobenius) {rel:.4f}, top-1 agreement {agree}/{n}")
    assert rel < 0.3 and agree > 0.6 * n


def test_engine_greedy_matches_dequantized_engine(release):
    prompts = [prompt(s, 20) for s in range(4)]
    sp = SamplingParams(temperature=0, max_new_tokens=24)
    with NativeEngine(release, CFG, EngineConfig(max_total_tokens=2048, quantization="fp8")) as e8, \
            NativeEngine(dequantized(release), CFG, EngineConfig(max_total_tokens=2048)) as e32:
        o8 = e8.generate_sglang(prompts, sp, return_logprob=True)
        o32 = e32.generate_sglang(prompts, sp, return_logprob=True)
        assert e8.memory_bytes()["weights"] < 0.3 * e32.memory_bytes()["weights"]
    for a, b in zip(o8, o32):
        assert a["output_ids"] == b["output_ids"]
        la = [x[0] for x in a["meta_info"]["output_token_logprobs"]]
        lb = [x[0] for x in b["meta_info"]["output_token_logprobs"]]
        assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4


def test_triton_fused_moe_reads_fp8_experts(state):
    """Routed experts through the Triton fused MoE's FP8 block-128 path (what CUDA runs; here the
    interpreter): the expert scales stack into the fused gate|up layout the kernel reads, and the
    logits match the per-expert dequantizing torch path within bf16 noise."""
    from k2sys import kernels

    if not kernels.KERNELS_INTERPRETED and not torch.cuda.is_available():
        pytest.skip("triton not importable in interpreter mode here")
    tri = runner(state, torch.bfloat16, quantization="fp8", moe_kernels="triton")
    ref = runner(state, torch.bfloat16, quantization="fp8", moe_kernels="torch")
    assert all(L.fused_ok for L in tri.layers if L.moe)
    ids = prompt(1, 6)  # few tokens: ~9 ms per interpreted program
    a, b = prefill_logits(tri, ids), prefill_logits(ref, ids)
    assert (a - b).abs().max() < 0.1 and torch.equal(a.argmax(-1), b.argmax(-1))


# ---------------------------------------------------------------- weight updates

def bf16_push(w: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """What a bf16 trainer sends an fp32 engine: linear weights in bf16, the rest in the engine dtype."""
    return [(n, t.bfloat16() if quantized_by_release(n) else t) for n, t in w.items()]


def test_update_lands_exactly_the_quantized_values(state, monkeypatch):
    calls = []
    real = k2sys.quant.quantize_fp8_blocks

    def counting(ws, *a, **kw):
        calls.append(len(ws))
        return real(ws, *a, **kw)

    new = model_state(8)
    pushed = bf16_push(new)
    half = len(pushed) // 2
    with NativeEngine(state, CFG, EngineConfig(max_total_tokens=2048, quantization="fp8")) as eng:
        monkeypatch.setattr(k2sys.quant, "quantize_fp8_blocks", counting)
        eng.begin_weight_update()
        eng.update_weights(pushed[:half])                                   # bucket 1: (name, tensor) pairs
        eng.update_weights([FlattenedBucket.pack(pushed[half:])], weight_version="v1")  # bucket 2: flattened
        assert eng.end_weight_update() == "v1"
        monkeypatch.undo()
        n_quant = [sum(quantized_by_release(n) for n, _ in b) for b in (pushed[:half], pushed[half:])]
        assert calls == n_quant  # one quantize call per bucket, covering all its linear weights
        p = eng.runner.params
        for name, t in pushed:
            if quantized_by_release(name):
                q, s = formula_quant(t)
                assert torch.equal(p[name].view(torch.uint8), q.view(torch.uint8)), name
                assert torch.equal(p[name + "_scale_inv"], s), name
            else:
                assert torch.equal(p[name], t), name
        assert eng.stats()["stale_tensors"] == 0
        sp = SamplingParams(temperature=0, max_new_tokens=12)
        got = eng.generate_sglang([prompt(5, 10)], sp)[0]["output_ids"]
    fresh = release_state({n: t.bfloat16() if quantized_by_release(n) else t for n, t in new.items()})
    with NativeEngine(fresh, CFG, EngineConfig(max_total_tokens=2048, quantization="fp8")) as ref:
        assert ref.generate_sglang([prompt(5, 10)], sp)[0]["output_ids"] == got


def snapshot(eng: NativeEngine) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in eng.runner.params.items()}


def assert_unchanged(eng: NativeEngine, before: dict[str, torch.Tensor]) -> None:
    for n, t in eng.runner.params.items():
        assert torch.equal(t.view(torch.uint8) if t.dtype == F8 else t,
                           before[n].view(torch.uint8) if t.dtype == F8 else before[n]), n


def test_update_is_all_or_nothing(state, release):
    new = dict(bf16_push(model_state(9)))
    o_proj = "model.layers.1.self_attn.o_proj.weight"
    with NativeEngine(state, CFG, EngineConfig(max_total_tokens=1024, quantization="fp8")) as eng:
        before = snapshot(eng)
        # a NaN in one tensor of a bucket: the error names it; the session applies nothing
        bad = dict(new)
        bad[o_proj] = bad[o_proj].clone()
        bad[o_proj][3, 7] = float("nan")
        eng.begin_weight_update()
        eng.update_weights([("model.norm.weight", new["model.norm.weight"])])
        with pytest.raises(RequestError, match=f"'{o_proj}' holds NaN or inf"):
            eng.update_weights(list(bad.items()))
        with pytest.raises(EngineError, match="weights unchanged"):
            eng.end_weight_update()
        assert_unchanged(eng, before)
        # an fp8 weight without its scales
        eng.begin_weight_update()
        eng.update_weights([(o_proj, release[o_proj])])
        with pytest.raises(EngineError, match="without .*o_proj.weight_scale_inv"):
            eng.end_weight_update()
        assert_unchanged(eng, before)
        # full precision and its scale_inv both sent: ambiguous, refused
        eng.begin_weight_update()
        eng.update_weights([(o_proj, new[o_proj])])
        with pytest.raises(RequestError, match="came in full precision"):
            eng.update_weights([(o_proj + "_scale_inv", release[o_proj + "_scale_inv"])])
        eng.abort_weight_update()
        eng.begin_weight_update()
        with pytest.raises(RequestError, match="together with"):
            eng.update_weights([(o_proj, new[o_proj]), (o_proj + "_scale_inv", release[o_proj + "_scale_inv"])])
        eng.abort_weight_update()
        # wrong shape / a dtype that cannot be quantized
        eng.begin_weight_update()
        with pytest.raises(RequestError, match="shape"):
            eng.update_weights([(o_proj, new[o_proj][:, :-1])])
        eng.abort_weight_update()
        eng.begin_weight_update()
        with pytest.raises(RequestError, match="float64 cannot be quantized"):
            eng.update_weights([(o_proj, new[o_proj].double())])
        eng.abort_weight_update()
        assert_unchanged(eng, before)
        # the release layout as a pair lands exactly as sent
        pair = release[o_proj + "_scale_inv"] * 0.5
        eng.begin_weight_update()
        eng.update_weights([(o_proj + "_scale_inv", pair), (o_proj, release[o_proj])])
        eng.end_weight_update()
        assert torch.equal(eng.runner.params[o_proj + "_scale_inv"], pair)
        assert torch.equal(eng.runner.params[o_proj].view(torch.uint8), release[o_proj].view(torch.uint8))


# ---------------------------------------------------------------- the server flag, shm route

def test_serve_fp8_update_over_shared_memory(state, tmp_path):
    from k2sys.engine.api.client import HTTPEngine

    model = build_model(CFG, seed=3)
    path = save_hf(model, tmp_path / "model")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "k2sys.engine.api.server", "--model", str(path), "--port", str(port),
                             "--quantization", "fp8", "--max-total-tokens", "1024"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(900):
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stdout.read().decode()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        info = httpx.get(url + "/get_server_info", timeout=10).json()
        assert info["quantization"] == "fp8"
        new = model_state(12)
        pushed = bf16_push(new)
        with HTTPEngine(url, shm_bucket_bytes=1 << 20) as c:
            o = "model.layers.0.self_attn.o_proj.weight"
            q0, _ = formula_quant(state[o])  # served from the fp32 checkpoint, quantized at start
            assert c.get_weights_by_name(o, truncate_size=1 << 20) == q0.float().flatten().tolist()
            c.begin_weight_update()
            c.update_weights(pushed, transport="shm")
            c.end_weight_update()
            for name in (o, "model.layers.2.mlp.experts.5.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"):
                q, s = formula_quant(new[name].bfloat16())
                assert c.get_weights_by_name(name, truncate_size=1 << 20) == q.float().flatten().tolist(), name
                assert c.get_weights_by_name(name + "_scale_inv", truncate_size=1 << 20) == s.flatten().tolist()
            assert c.get_weights_by_name("model.norm.weight", truncate_size=1 << 20) == \
                new["model.norm.weight"].tolist()
        out = httpx.post(url + "/generate", json={"input_ids": prompt(1, 8), "sampling_params": {
            "temperature": 0, "max_new_tokens": 4}}, timeout=60).json()
        assert len(out["output_ids"]) == 4
    finally:
        proc.terminate()
        proc.wait(30)
