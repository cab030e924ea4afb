"""FP8 e4m3fn block quantization: the C++ thread-pool kernel and the Triton kernel (interpreter, and
compiled for sm_90) are bitwise equal to the torch reference, which itself matches a per-block
formula written here with torch's own float8 cast; edge blocks, zero blocks, fp8 boundaries, every
e4m3fn code and its rounding midpoints, NaN/inf errors naming the tensor, dequantization by the
release formula, and the release's choice of quantized tensor names."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (CPU tests)

import math

import pytest
import torch

from k2sys import ext
from k2sys.quant import (dequantize_fp8_block, is_fp8_weight_name, quantize_fp8_block, quantize_fp8_block_reference,
                         quantize_fp8_blocks, quantize_fp8_state, scale_inv_name)
from k2sys.quant.fp8 import triton_available

F8 = torch.float8_e4m3fn
SHAPES = [(200, 300), (1, 1), (128, 129), (129, 128), (256, 256), (3, 700)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
needs_triton = pytest.mark.skipif(not triton_available(torch.device("cpu")),
                                  reason="triton not installed (or TRITON_INTERPRET set too late)")


def formula_quant(w: torch.Tensor, b: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The release formula block by block: scale = amax / 448 (1 if 0), q = fp8(clamp(w / scale))."""
    w = w.float()
    R, C = w.shape
    nr, nc = math.ceil(R / b), math.ceil(C / b)
    q = torch.empty(R, C, dtype=F8)
    s = torch.empty(nr, nc)
    for i in range(nr):
        for j in range(nc):
            blk = w[i * b:(i + 1) * b, j * b:(j + 1) * b]
            scale = blk.abs().max() / torch.tensor(448.0)
            if scale == 0:
                scale = torch.tensor(1.0)
            s[i, j] = scale
            q[i * b:(i + 1) * b, j * b:(j + 1) * b] = (blk / scale).clamp(-448, 448).to(F8)
    return q, s


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == F8 else t.view(torch.int32)


def assert_bitwise(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor], what: str) -> None:
    (q, s), (q0, s0) = got, want
    assert q.dtype == F8 and s.dtype == torch.float32, what
    assert q.shape == q0.shape and s.shape == s0.shape, what
    assert torch.equal(bits(s), bits(s0)), f"{what}: scales differ"
    diff = (bits(q).int() != bits(q0).int()).nonzero()
    assert diff.numel() == 0, f"{what}: {diff.shape[0]} fp8 codes differ, first at {diff[0].tolist()}"


def weight(shape, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * torch.logspace(-4, 1, shape[1])[None, :]  # blocks of varied range
    return w.to(dtype)


def boundary_values() -> torch.Tensor:
    """Every finite e4m3fn value, the midpoints between neighbours and one fp32 ulp either side of
    each midpoint (the round-to-nearest-even decisions), values in the subnormal range and below it."""
    codes = torch.arange(256, dtype=torch.uint8).view(F8).float()
    vals = codes[torch.isfinite(codes)].unique()                     # -448 .. 448
    mids = (vals[:-1] + vals[1:]) / 2                                 # exact in fp32
    up = torch.nextafter(mids, torch.full_like(mids, math.inf))
    down = torch.nextafter(mids, torch.full_like(mids, -math.inf))
    tiny = torch.tensor([2.0 ** -10, 2.0 ** -11, 3 * 2.0 ** -11, 1e-30, 1e-40, -1e-40, 0.0, -0.0, 2.0 ** -149])
    return torch.cat([vals, mids, up, down, tiny, -tiny])


# ---------------------------------------------------------------- the reference itself

@pytest.mark.parametrize("shape", [(200, 300), (128, 129), (1, 1)])
def test_reference_matches_the_formula(shape):
    w = weight(shape, torch.float32, 1)
    assert_bitwise(quantize_fp8_block_reference(w), formula_quant(w), "reference")


def test_boundary_values_round_like_torch_cast():
    """With amax = 448 the scale is exactly 1, so q is the fp8 cast of each value itself."""
    v = boundary_values()
    w = torch.cat([v, torch.tensor([448.0])])
    w = torch.nn.functional.pad(w, (0, -w.numel() % 128)).view(-1, 128)  # rows of 128: one block column
    w[:, 0] = 448.0  # every block holds 448
    q, s = quantize_fp8_block(w)
    assert torch.equal(s, torch.ones_like(s))
    assert torch.equal(bits(q), bits(w.to(F8)))  # torch's own RNE cast
    assert_bitwise((q, s), quantize_fp8_block_reference(w), "cpp")


# ---------------------------------------------------------------- C++

needs_cpp = pytest.mark.skipif(not ext.HAS_CPP, reason="k2sys._C not built")


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpp_bitwise_equals_reference(shape, dtype):
    w = weight(shape, dtype, hash((shape, str(dtype))) % 1000)
    assert_bitwise(quantize_fp8_block(w, backend="cpp", threads=2), quantize_fp8_block_reference(w), f"cpp {shape}")


@needs_cpp
def test_cpp_special_blocks():
    """Zero blocks (scale 1), blocks whose amax / 448 underflows to 0 (scale 1, q 0), subnormal
    scales, a block whose amax element divides to just above 448 (clamped), and -0.0."""
    w = torch.randn(300, 260) * 0.02
    w[:128, :128] = 0.0
    w[128:256, :128] = 0.0
    w[130, 5] = 1e-44                       # amax / 448 == 0 in fp32
    w[:128, 128:256] *= 1e-38               # subnormal scales
    w[256:, 256:] = 0.0
    w[256:, 256] = -0.0
    for amax in torch.rand(64) * 10 + 0.1:  # amax / (amax / 448) rounds to 448 +- an ulp: clamp
        blk = torch.randn(128, 4)
        blk[0, 0] = amax
        blk = blk.clamp(-amax, amax)
        assert_bitwise(quantize_fp8_block(blk, backend="cpp"), quantize_fp8_block_reference(blk), f"amax {amax}")
    q, s = quantize_fp8_block(w, backend="cpp")
    assert_bitwise((q, s), quantize_fp8_block_reference(w), "special")
    assert_bitwise((q, s), formula_quant(w), "special vs formula")
    assert s[0, 0] == 1 and s[1, 0] == 1 and s[2, 2] == 1
    assert 0 < s[0, 1] < torch.finfo(torch.float32).tiny  # subnormal scale kept


@needs_cpp
def test_cpp_bucket_one_call_many_tensors_and_threads():
    ws = [weight(s, d, i) for i, (s, d) in enumerate(zip(SHAPES * 3, DTYPES * 6))]
    ws.append(torch.empty(0, 5))
    outs1 = quantize_fp8_blocks(ws, threads=1)
    outs4 = quantize_fp8_blocks(ws, threads=4)
    for i, w in enumerate(ws):
        ref = quantize_fp8_block_reference(w)
        assert_bitwise(outs1[i], ref, f"tensor {i} (1 thread)")
        assert_bitwise(outs4[i], ref, f"tensor {i} (4 threads)")
    big = weight((1024, 1536), torch.bfloat16, 5)  # > the serial threshold: runs on the pool
    assert_bitwise(quantize_fp8_blocks([big], threads=2)[0], quantize_fp8_block_reference(big), "pool")


@needs_cpp
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_names_the_tensor(bad):
    ws = [torch.randn(40, 300), torch.randn(256, 200)]
    ws[1][200, 150] = bad
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj.weight' holds NaN or inf"):
        quantize_fp8_blocks(ws, names=["a.weight", "model.layers.0.mlp.down_proj.weight"])
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_fp8_block_reference(ws[1])


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp8_block(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="float64.*cast it explicitly"):
        quantize_fp8_block(torch.randn(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="2 names for 1 tensors"):
        quantize_fp8_blocks([torch.randn(4, 4)], names=["a", "b"])
    with pytest.raises(ValueError, match="backend"):
        quantize_fp8_block(torch.randn(4, 4), backend="fast")


# ---------------------------------------------------------------- Triton

@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_bitwise_equals_reference(dtype):
    """One launch per source dtype over a bucket of odd shapes (interpreter: ~9 ms per block)."""
    shapes = [(200, 300), (1, 1), (128, 129), (129, 17)]
    ws = [weight(s, dtype, i) for i, s in enumerate(shapes)]
    ws[1].zero_()
    for i, got in enumerate(quantize_fp8_blocks(ws, backend="triton")):
        assert_bitwise(got, quantize_fp8_block_reference(ws[i]), f"triton {shapes[i]} {dtype}")


@needs_triton
def test_triton_boundaries_zero_blocks_and_nan():
    v = boundary_values()
    w = torch.nn.functional.pad(torch.cat([v, torch.tensor([448.0])]), (0, -(v.numel() + 1) % 128)).view(-1, 128)
    w[:, 0] = 448.0
    special = torch.randn(130, 140) * 0.02
    special[:128, :128] = 0.0
    special[5, 5] = 1e-44
    special[128:, 128:] *= 1e-38
    got = quantize_fp8_blocks([w, special], backend="triton")
    assert_bitwise(got[0], quantize_fp8_block_reference(w), "triton boundaries")
    assert torch.equal(bits(got[0][0]), bits(w.to(F8)))
    assert_bitwise(got[1], quantize_fp8_block_reference(special), "triton special blocks")
    bad = torch.randn(20, 20)
    bad[3, 4] = math.nan
    with pytest.raises(ValueError, match="'x.weight' holds NaN or inf"):
        quantize_fp8_blocks([torch.randn(8, 8), bad], names=["ok.weight", "x.weight"], backend="triton")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_dequant_matches_formula(dtype):
    from k2sys_triton.fp8_quant import dequantize_fp8_block_triton

    q = torch.arange(256, dtype=torch.uint8).repeat(130 * 2)[:130 * 257].view(130, 257).view(F8)
    s = torch.rand(2, 3) * 1e-2 + 1e-4
    out = dequantize_fp8_block_triton(q, s, dtype)
    want = dequantize_fp8_block(q, s, dtype)
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out.nan_to_num(), want.nan_to_num())


_COMPILE_SM90 = r"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from k2sys_triton.fp8_quant import dequant_fp8_kernel, quant_fp8_kernel

target = GPUTarget("cuda", 90, 32)
for name, dt in (("fp32", tl.float32), ("bf16", tl.bfloat16), ("fp16", tl.float16)):
    k = triton.compile(triton.compiler.ASTSource(
        fn=quant_fp8_kernel, signature={"table_ptr": "*i64", "SRC_DTYPE": "constexpr", "BR": "constexpr",
                                        "BC": "constexpr", "TILE_R": "constexpr"},
        constexprs={"SRC_DTYPE": dt, "BR": 128, "BC": 128, "TILE_R": 32}), target=target)
    ptx = k.asm["ptx"]
    assert k.asm["cubin"], name
    # IEEE round-to-nearest division (Triton's plain `/` is approximate on NVIDIA), no flush to zero
    assert "div.rn.f32" in ptx and "div.approx" not in ptx and "div.full" not in ptx and ".ftz" not in ptx, name
    print(name, "shared", k.metadata.shared)
for bf16 in (True, False):
    k = triton.compile(triton.compiler.ASTSource(
        fn=dequant_fp8_kernel, signature={"q_ptr": "*u8", "s_ptr": "*fp32", "out_ptr": "*i16" if bf16 else "*fp16",
                                          "rows": "i32", "cols": "i32", "OUT_BF16": "constexpr", "BR": "constexpr",
                                          "BC": "constexpr", "TILE_R": "constexpr"},
        constexprs={"OUT_BF16": bf16, "BR": 128, "BC": 128, "TILE_R": 32}), target=target)
    assert k.asm["cubin"]
print("compiled")
"""


@needs_triton
def test_triton_kernels_compile_for_hopper():
    """The real compiler for sm_90 (what the interpreter never checks), in a process without
    TRITON_INTERPRET: the kernels build to cubin and divide with IEEE rounding."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    r = subprocess.run([sys.executable, "-c", _COMPILE_SM90], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


# ---------------------------------------------------------------- dequantize, names, states

@pytest.mark.parametrize("shape", [(200, 300), (256, 128), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_the_release_formula(shape, dtype):
    g = torch.Generator().manual_seed(3)
    q = (torch.randn(*shape, generator=g) * 100).clamp(-448, 448).to(F8)
    s = torch.rand(math.ceil(shape[0] / 128), math.ceil(shape[1] / 128), generator=g)
    want = torch.empty(shape)
    for i in range(shape[0]):
        for j in range(shape[1]):
            want[i, j] = q[i, j].float() * s[i // 128, j // 128]
    got = dequantize_fp8_block(q, s, dtype)
    assert got.dtype == dtype and torch.equal(got, want.to(dtype))
    with pytest.raises(ValueError, match="scale_inv must be float32 of shape"):
        dequantize_fp8_block(q, s[:, :1] if s.shape[1] > 1 else s[:0])


def test_round_trip_error_is_within_fp8_precision():
    """e4m3 keeps 3 mantissa bits: |error| <= 2^-4 |w| for normal codes and <= 2^-10 * scale (half
    the 2^-9 subnormal step, in units of the block scale) below."""
    w = weight((300, 400), torch.float32, 9)
    q, s = quantize_fp8_block(w)
    back = dequantize_fp8_block(q, s)
    scale = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :400]
    err = (back - w).abs()
    assert bool((err <= torch.maximum(w.abs() * 2.0 ** -4, scale * 2.0 ** -10)).all())
    assert err.max() > 0


def test_release_names():
    yes = ["model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.q_b_proj.weight",
           "model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.kv_a_proj_with_mqa.weight",
           "model.layers.3.self_attn.kv_b_proj.weight", "model.layers.3.self_attn.o_proj.weight",
           "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
           "model.layers.0.mlp.down_proj.weight", "model.layers.5.mlp.experts.17.gate_proj.weight",
           "model.layers.5.mlp.experts.0.down_proj.weight", "model.layers.5.mlp.shared_experts.up_proj.weight"]
    no = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
          "model.layers.0.post_attention_layernorm.weight", "model.layers.0.self_attn.q_a_layernorm.weight",
          "model.layers.0.self_attn.kv_a_layernorm.weight", "model.layers.5.mlp.gate.weight",
          "model.layers.5.mlp.gate.e_score_correction_bias", "model.layers.0.self_attn.o_proj.bias",
          "model.layers.0.self_attn.q_a_proj.weight_scale_inv"]
    assert all(is_fp8_weight_name(n) for n in yes)
    assert not any(is_fp8_weight_name(n) for n in no)
    assert scale_inv_name(yes[0]) == yes[0] + "_scale_inv"


def test_quantize_state_keeps_release_entries_and_quantizes_the_rest():
    a = "model.layers.0.self_attn.o_proj.weight"
    b = "model.layers.1.mlp.experts.0.up_proj.weight"
    w = {a: torch.randn(130, 140), b: torch.randn(64, 130).bfloat16(), "model.norm.weight": torch.ones(130)}
    qb, sb = formula_quant(w[b])
    out = quantize_fp8_state({a: w[a], b: qb, b + "_scale_inv": sb * 2, "model.norm.weight": w["model.norm.weight"]})
    assert_bitwise((out[a], out[a + "_scale_inv"]), formula_quant(w[a]), "quantized")
    assert out[b] is qb and torch.equal(out[b + "_scale_inv"], sb * 2)  # kept as given
    assert out["model.norm.weight"] is w["model.norm.weight"]
    with pytest.raises(ValueError, match="without 'model.layers.1.mlp.experts.0.up_proj.weight_scale_inv'"):
        quantize_fp8_state({b: qb})
    with pytest.raises(ValueError, match="keeps full precision"):
        quantize_fp8_state({"lm_head.weight": qb})
