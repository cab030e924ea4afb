"""moe_align_block_size and fused_moe (fwd, bwd, fp8), tile configs, and the k2sys.kernels dispatcher.

The Triton kernels run in the CPU interpreter (~9 ms per program instance), so shapes stay tiny
and tile configs are given explicitly (16x32x32) to keep the grids small.
"""

import json
import os

# triton picks interpreter or compiler when the kernel modules are imported: set it first.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

CUDA = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET", "0") != "0"
DEV = "cpu" if INTERP or not CUDA else "cuda"


@pytest.fixture(scope="module")
def kern():
    import k2sys.kernels as kern
    import k2sys_triton

    if not (k2sys_triton.KERNELS_INTERPRETED or CUDA):
        pytest.fail("k2sys_triton was imported before TRITON_INTERPRET=1 was set; run with TRITON_INTERPRET=1")
    return kern


@pytest.fixture(scope="module")
def small_cfg(kern):
    return kern.MoEKernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2)


def _routing(T, E, top_k, seed, experts=None):
    """Distinct experts per token drawn from `experts` (default all), and positive weights."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(experts if experts is not None else range(E))
    ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:top_k]] for _ in range(T)]).int()
    return torch.rand(T, top_k, generator=g) + 0.1, ids


def _problem(T, H, I, E, top_k, seed=0, experts=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    return (x, w13, w2, *_routing(T, E, top_k, seed + 1, experts))


# ---------------------------------------------------------------- align


@pytest.mark.parametrize("T,top_k,E,block_m", [(1, 1, 1, 16), (33, 2, 7, 16), (5, 4, 7, 16), (20, 8, 384, 16), (40, 3, 5, 64)])
def test_align_matches_reference_and_invariants(kern, T, top_k, E, block_m):
    _, ids = _routing(T, E, top_k, seed=T, experts=list(range(0, E, 2)) if E >= 2 * top_k else None)
    got = kern.moe_align_block_size(ids.to(DEV), block_m, E)
    ref = kern.moe_align_block_size_torch(ids, block_m, E)
    for a, b, name in zip(got, ref, got._fields):
        assert torch.equal(a.cpu(), b), name
    # Invariants from the definition, independent of either implementation.
    flat, P = ids.view(-1).long(), ids.numel()
    counts = torch.bincount(flat, minlength=E)
    padded = (counts + block_m - 1) // block_m * block_m
    assert ref.num_tokens_post_padded.item() == padded.sum().item()
    sorted_ids = ref.sorted_token_ids.long()
    live = sorted_ids[sorted_ids < P]
    assert sorted(live.tolist()) == list(range(P))  # every pair exactly once
    starts = torch.cat([torch.zeros(1, dtype=torch.long), padded.cumsum(0)])
    for e in range(E):
        seg = sorted_ids[starts[e] : starts[e + 1]]
        seg = seg[seg < P]
        assert torch.all(flat[seg] == e) and torch.all(seg.diff() > 0) and len(seg) == counts[e]
        assert torch.all(ref.expert_ids[starts[e] // block_m : starts[e + 1] // block_m] == e)
    assert torch.all(ref.expert_ids[padded.sum() // block_m :] == -1)


def test_align_drops_negative_ids_and_rejects_out_of_range(kern):
    ids = torch.tensor([[0, -1], [2, 0], [-1, -1]], dtype=torch.int32)
    got = kern.moe_align_block_size(ids, 16, 3)
    ref = kern.moe_align_block_size_torch(ids, 16, 3)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert got.num_tokens_post_padded.item() == 32
    assert got.sorted_token_ids[:2].tolist() == [0, 3] and got.sorted_token_ids[16].item() == 2
    with pytest.raises(ValueError, match="num_experts"):
        kern.moe_align_block_size(ids + 3, 16, 3)
    with pytest.raises(ValueError, match="block_m"):
        kern.moe_align_block_size(ids, 24, 3)


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize(
    "T,H,I,E,top_k,experts",
    [
        (33, 64, 32, 7, 2, [0, 1, 3, 4, 6]),  # T not a multiple of BLOCK_M; experts 2 and 5 idle
        (1, 64, 32, 7, 3, None),  # T = 1
        (9, 48, 24, 5, 1, None),  # top_k = 1; H, I not multiples of the tiles
    ],
)
def test_forward_fp32_matches_reference(kern, small_cfg, T, H, I, E, top_k, experts):
    x, w13, w2, w, ids = _problem(T, H, I, E, top_k, experts=experts)
    out = kern.fused_moe(*(t.to(DEV) for t in (x, w13, w2, w, ids)), config=small_cfg)
    ref = kern.fused_moe_torch(x, w13, w2, w, ids)
    assert out.dtype == torch.float32 and out.shape == (T, H)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_forward_half_precision(kern, small_cfg, dtype, tol):
    x, w13, w2, w, ids = _problem(17, 64, 32, 6, 2)
    out = kern.fused_moe(*(t.to(DEV, dtype) for t in (x, w13, w2)), w.to(DEV), ids.to(DEV), config=small_cfg)
    truth = kern.fused_moe_torch(*(t.to(dtype).float() for t in (x, w13, w2)), w, ids)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float().cpu(), truth, rtol=tol, atol=tol)


def test_reference_matches_hf_experts(kern):
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    x, w13, w2, w, ids = _problem(11, 24, 16, 5, 2)
    hf = DeepseekV3Experts(DeepseekV3Config(hidden_size=24, moe_intermediate_size=16, n_routed_experts=5))
    with torch.no_grad():
        hf.gate_up_proj.copy_(w13)
        hf.down_proj.copy_(w2)
        expected = hf(x, ids.long(), w)
    torch.testing.assert_close(kern.fused_moe_torch(x, w13, w2, w, ids), expected, rtol=1e-5, atol=1e-6)


def test_fp8_block_scaled_weights(kern, small_cfg):
    # H, I straddle the 128-wide scale blocks; the up half gets its own scale range.
    x, w13, w2, w, ids = _problem(5, 160, 144, 3, 2)
    w13[:, 144:] *= 4
    q13, s13 = kern.quantize_fp8_block(w13)
    q2, s2 = kern.quantize_fp8_block(w2)
    assert s13.shape == (3, 3, 2) and q13.dtype == torch.float8_e4m3fn
    deq = kern.dequantize_fp8_block(q13, s13)
    block_amax = s13.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :288, :160] * 448
    assert torch.all((deq - w13).abs() <= block_amax / 16 + 1e-6)  # e4m3: 3 mantissa bits
    out = kern.fused_moe(x.to(DEV, torch.float16), q13.to(DEV), q2.to(DEV), w.to(DEV), ids.to(DEV),
                         w13_scale=s13.to(DEV), w2_scale=s2.to(DEV), config=small_cfg)  # fmt: skip
    truth = kern.fused_moe_torch(x.half().float(), deq, kern.dequantize_fp8_block(q2, s2), w, ids)
    torch.testing.assert_close(out.float().cpu(), truth, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="inference-only"):
        kern.fused_moe(x.half().requires_grad_(), q13, q2, w, ids, w13_scale=s13, w2_scale=s2, config=small_cfg)
    with pytest.raises(ValueError, match="w13_scale"):
        kern.fused_moe(x.half(), q13, q2, w, ids, w13_scale=s13[:, :2], w2_scale=s2, config=small_cfg)


def test_fp8_weights_as_bits_for_gpus_without_fp8(kern, small_cfg):
    """Before sm_89 triton has no fp8 type: the kernel reads the weights' bits and decodes them
    in integer arithmetic. Same values as the native path, every e4m3fn code included."""
    from k2sys_triton.launch import collect_launches, override_arch

    x, w13, w2, w, ids = _problem(4, 64, 32, 2, 2)
    # Every one of the 256 e4m3fn codes except the two NaNs appears in the weights.
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]
    q13 = codes.repeat(2 * 64 * 64 // codes.numel() + 1)[: 2 * 64 * 64].view(2, 64, 64).view(torch.float8_e4m3fn)
    s13 = (torch.rand(2, 1, 1) + 0.5) / 448  # weights within +-1.5: fp16 activations stay finite
    q2, s2 = kern.quantize_fp8_block(w2)
    args = (x.to(DEV, torch.float16), q13.to(DEV), q2.to(DEV), w.to(DEV), ids.to(DEV))
    kw = dict(w13_scale=s13.to(DEV), w2_scale=s2.to(DEV), config=small_cfg)
    with collect_launches(arch=80) as launches:
        kern.fused_moe(*args, **kw)
    gemms = [ln for ln in launches if ln.kernel.__name__ == "_grouped_gemm_kernel"]
    assert len(gemms) == 2 and all(ln.bound()["FP8_BITS"] and ln.bound()["b_ptr"].dtype == torch.uint8 for ln in gemms)
    with collect_launches(arch=90) as launches:
        kern.fused_moe(*args, **kw)
    assert not any(ln.bound().get("FP8_BITS") for ln in launches)
    native = kern.fused_moe(*args, **kw)
    with override_arch(80):
        bits = kern.fused_moe(*args, **kw)
    torch.testing.assert_close(bits, native, rtol=0, atol=0)
    truth = kern.fused_moe_torch(x.half().float(), kern.dequantize_fp8_block(q13, s13),
                                 kern.dequantize_fp8_block(q2, s2), w, ids)
    torch.testing.assert_close(bits.float().cpu(), truth, rtol=1e-2, atol=2e-2)


# ---------------------------------------------------------------- backward


@pytest.mark.parametrize("T,top_k,experts", [(9, 2, [0, 1, 2, 4]), (4, 1, None)])
def test_backward_matches_torch_autograd(kern, small_cfg, T, top_k, experts):
    x, w13, w2, w, ids = _problem(T, 32, 16, 5, top_k, seed=7, experts=experts)
    dout = torch.randn(T, 32, generator=torch.Generator().manual_seed(9))
    ours = [t.to(DEV).detach().clone().requires_grad_() for t in (x, w13, w2, w)]
    out = kern.fused_moe(*ours[:3], ours[3], ids.to(DEV), config=small_cfg)
    out.backward(dout.to(DEV))
    refs = [t.detach().clone().requires_grad_() for t in (x, w13, w2, w)]
    kern.fused_moe_torch(*refs[:3], refs[3], ids).backward(dout)
    for name, a, b in zip(("hidden", "w13", "w2", "topk_weights"), ours, refs):
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert torch.all(ours[1].grad[3] == 0) if experts else True  # idle expert gets a zero gradient


def test_backward_bf16_and_partial_requires_grad(kern, small_cfg):
    x, w13, w2, w, ids = _problem(6, 32, 16, 4, 2, seed=11)
    xb = x.bfloat16().requires_grad_()
    out = kern.fused_moe(xb, w13.bfloat16(), w2.bfloat16(), w, ids, config=small_cfg)
    out.float().sum().backward()
    xr = x.bfloat16().float().requires_grad_()
    kern.fused_moe_torch(xr, w13.bfloat16().float(), w2.bfloat16().float(), w, ids).sum().backward()
    assert xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(xb.grad.float(), xr.grad, rtol=3e-2, atol=3e-2)


# ---------------------------------------------------------------- configs and dispatcher


def test_config_tables_roundtrip_and_fallback(kern, tmp_path):
    from k2sys_triton.configs import get_config, heuristic_config, save_config_table

    table = {1: kern.MoEKernelConfig(BLOCK_M=16), 512: kern.MoEKernelConfig(BLOCK_M=64, BLOCK_N=128)}
    path = save_config_table(table, 48, 256, "NVIDIA_H200", "bf16", {"by": "test"}, config_dir=tmp_path)
    import triton

    assert path.name == f"E=48,N=256,device_name=NVIDIA_H200,dtype=bf16,triton={triton.__version__}.json"
    body = json.loads(path.read_text())
    assert body["configs"]["512"]["BLOCK_N"] == 128 and body["format"] == "k2sys-moe-configs-v2"
    assert body["key"] == {"E": 48, "N": 256, "device_name": "NVIDIA_H200", "dtype": "bf16", "triton": triton.__version__}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    assert get_config(3, 48, 256, 8, "bf16", "NVIDIA_H200", tmp_path).BLOCK_M == 16
    assert get_config(400, 48, 256, 8, "bf16", "NVIDIA_H200", tmp_path).BLOCK_M == 64
    assert get_config(400, 48, 256, 8, "bf16", "NVIDIA_H100", tmp_path) == heuristic_config(400, 48, 8, "bf16")
    assert heuristic_config(1, 384, 8, "bf16").BLOCK_M == 16 and heuristic_config(8192, 48, 8, "bf16").BLOCK_M == 128
    with pytest.raises(ValueError, match="BLOCK_N"):
        kern.MoEKernelConfig(BLOCK_N=8)
    with pytest.raises(ValueError, match="unknown keys"):
        kern.MoEKernelConfig.from_dict({"BLOCK_M": 16, "block_n": 32})


def test_config_tables_are_versioned_and_fall_back_with_a_logged_reason(kern, tmp_path, caplog):
    import logging

    import triton

    from k2sys_triton.configs import find_config_table, get_config, heuristic_config, save_config_table

    tuned = {1: kern.MoEKernelConfig(BLOCK_M=16, BLOCK_N=32, num_stages=2)}
    heur = heuristic_config(3, 48, 8, "bf16")
    assert tuned[1] != heur

    def lookup(E, device="NVIDIA_H200"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="k2sys.kernels"):
            cfg = get_config(3, E, 256, 8, "bf16", device, tmp_path)
        return cfg, " ".join(r.getMessage() for r in caplog.records), [r.levelno for r in caplog.records]

    # Tuned under another triton release: not trusted, the heuristic runs and the reason is logged once.
    save_config_table(tuned, 48, 256, "NVIDIA_H200", "bf16", {}, config_dir=tmp_path, triton="0.0.1")
    cfg, msg, levels = lookup(48)
    assert cfg == heur and "triton 0.0.1 only" in msg and triton.__version__ in msg and levels == [logging.WARNING]
    assert lookup(48)[1] == ""  # logged once per key and reason
    # The same table for the running version is used (a new file in the folder is noticed).
    save_config_table(tuned, 48, 256, "NVIDIA_H200", "bf16", {}, config_dir=tmp_path)
    assert lookup(48)[0] == tuned[1]
    # Another device name is another key.
    cfg, msg, levels = lookup(48, "NVIDIA_A100-SXM4-80GB")
    assert cfg == heur and "no tuned table" in msg and levels == [logging.INFO]
    # An unversioned (v1) file and a malformed one: heuristic, with the reason naming the file.
    (tmp_path / "E=64,N=256,device_name=NVIDIA_H200,dtype=bf16.json").write_text('{"meta": {}, "configs": {}}')
    cfg, msg, levels = lookup(64)
    assert cfg == heuristic_config(3, 64, 8, "bf16") and "unversioned" in msg and levels == [logging.WARNING]
    bad = tmp_path / f"E=80,N=256,device_name=NVIDIA_H200,dtype=bf16,triton={triton.__version__}.json"
    bad.write_text('{"format": "k2sys-moe-configs-v2", "key": {}, "configs": {"1": {"BLOCK_M": 16}}}')
    cfg, msg, levels = lookup(80)
    assert cfg == heuristic_config(3, 80, 8, "bf16") and bad.name in msg and "does not match" in msg
    assert find_config_table(80, 256, "NVIDIA_H200", "bf16", tmp_path).table is None
    with pytest.raises(ValueError, match="does not match the file name"):
        from k2sys_triton.configs import load_config_table

        load_config_table(80, 256, "NVIDIA_H200", "bf16", tmp_path)


def test_dispatcher_and_argument_errors(kern):
    x, w13, w2, w, ids = _problem(5, 16, 8, 3, 2)
    assert not kern.uses_triton(x)  # CPU tensors: torch reference
    torch.testing.assert_close(kern.moe_forward(x, w13, w2, w, ids), kern.fused_moe_torch(x, w13, w2, w, ids))
    if not CUDA:
        with pytest.raises(RuntimeError, match="use_triton"):
            kern.moe_forward(x, w13, w2, w, ids, use_triton=True)
    with pytest.raises(ValueError, match="w2 must be"):
        kern.fused_moe_torch(x, w13, w2[:, :, :4], w, ids)
    with pytest.raises(ValueError, match="topk_weights"):
        kern.fused_moe(x, w13, w2, w[:, :1], ids)
    with pytest.raises(ValueError, match="must match hidden"):
        kern.fused_moe(x, w13.half(), w2.half(), w, ids)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERP, reason="needs CUDA and compiled triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_k2_tp8_shape(kern, dtype):
    T, H, I, E, k = 512, 7168, 256, 384, 8
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, H, device="cuda", generator=g, dtype=dtype)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) / I**0.5).to(dtype)
    w, ids = kern.k2_router_topk(torch.randn(T, E, device="cuda", generator=g), None, k, 1, 1, 2.827)
    truth = kern.fused_moe_torch(x.float(), w13.float(), w2.float(), w, ids)
    torch.testing.assert_close(kern.fused_moe(x, w13, w2, w, ids).float(), truth, rtol=3e-2, atol=3e-2)
    q13, s13 = kern.quantize_fp8_block(w13)
    q2, s2 = kern.quantize_fp8_block(w2)
    out8 = kern.fused_moe(x, q13, q2, w, ids, w13_scale=s13, w2_scale=s2)
    ref8 = kern.fused_moe_torch(x.float(), kern.dequantize_fp8_block(q13, s13), kern.dequantize_fp8_block(q2, s2), w, ids)
    torch.testing.assert_close(out8.float(), ref8, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or INTERP, reason="needs CUDA and compiled triton")
def test_gpu_backward(kern):
    T, H, I, E, k = 256, 1024, 256, 48, 8
    g = torch.Generator(device="cuda").manual_seed(0)
    ins = [torch.randn(T, H, device="cuda", generator=g), torch.randn(E, 2 * I, H, device="cuda", generator=g) / H**0.5,
           torch.randn(E, H, I, device="cuda", generator=g) / I**0.5]  # fmt: skip
    w, ids = kern.k2_router_topk(torch.randn(T, E, device="cuda", generator=g), None, k, 1, 1, 1.0)
    ours = [t.bfloat16().requires_grad_() for t in ins] + [w.clone().requires_grad_()]
    refs = [t.bfloat16().float().requires_grad_() for t in ins] + [w.clone().requires_grad_()]
    kern.fused_moe(*ours[:3], ours[3], ids).float().sum().backward()
    kern.fused_moe_torch(*refs[:3], refs[3], ids).sum().backward()
    for a, b in zip(ours, refs):
        torch.testing.assert_close(a.grad.float(), b.grad, rtol=5e-2, atol=5e-2)


def test_tuner_dry_run_writes_a_loadable_table(kern, tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import tune_moe
    from k2sys_triton.configs import load_config_table

    assert tune_moe.main(["--dry-run", "--out-dir", str(tmp_path), "--iters", "1"]) == 0
    table = load_config_table(5, 32, "cpu", "bf16", tmp_path)
    assert sorted(table) == [1, 9] and all(isinstance(c, kern.MoEKernelConfig) for c in table.values())
    sys.modules.pop("tune_moe", None)
