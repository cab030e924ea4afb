"""FP8 e4m3fn block quantization of whole buckets on CUDA (the release format of DeepSeek-V3 / Kimi-K2).

Same semantics as csrc/fp8_quant.h and k2sys.quant.fp8.quantize_fp8_block_reference, bit for bit:
  scale_inv[I, J] = amax(|w| over block (I, J)) / 448   (fp32; 1 where that is 0)
  q[i, j]         = e4m3fn(clamp(w[i, j] / scale_inv[i // BR, j // BC], -448, 448))  (round to nearest even)
The divisions use IEEE round-to-nearest (`div_rn`; Triton's plain `/` is an approximate division on
NVIDIA), so results equal the C++ and torch paths. A block holding a NaN or an infinity gets a NaN
scale and no quantized values: callers check the (small) scale tensors and name the tensor.

One launch quantizes every tensor of a bucket that shares a source dtype: the tensors' addresses
and sizes sit in an int64 table [n, 5] (src, q, scale_inv, rows, cols) and program (b, t) does
block b of tensor t (programs past a tensor's last block return at once). A program makes two
passes over its block in [TILE_R, BC] tiles (amax, then quantize), so registers stay bounded.
`dequant_fp8_kernel` is the inverse for one tensor: out = (float32(q) * scale_inv) in out's dtype.
"""

from __future__ import annotations

import torch

from ._interp import cdiv, check_launchable, tl, triton

__all__ = ["quantize_fp8_blocks_triton", "dequantize_fp8_block_triton", "quant_fp8_kernel", "dequant_fp8_kernel",
           "TABLE_COLS"]

TABLE_COLS = 5  # src address, q address, scale_inv address, rows, cols
_MAX_GRID_Y = 65535
_FP8_MAX = 448.0
_SRC = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def _e4m3fn_code(v):
    """e4m3fn bits (uint32 in [0, 255]) of finite fp32 v with |v| <= 448, round to nearest even,
    in integer arithmetic (the interpreter's float8 cast does not round to nearest even)."""
    b = v.to(tl.uint32, bitcast=True)
    sign = (b >> 24) & 0x80
    a = b & 0x7FFFFFFF
    # normal results (|v| >= 2^-6): rebias the exponent 127 -> 7, round 23 mantissa bits to 3
    r = a - (120 << 23)
    normal = (r + 0x7FFFF + ((r >> 20) & 1)) >> 20
    # subnormal results: round(|v| / 2^-9) = round(m * 2^(e - 141)) for mantissa m (with its
    # implicit bit) and biased exponent e <= 120, i.e. a right shift by 141 - e >= 21 with ties to
    # even; shifts past 31 (fp32 zeros and subnormals) round to 0 all the same.
    e = (a >> 23).to(tl.int32)
    m = (a & 0x7FFFFF) | 0x800000
    sh = tl.minimum(tl.maximum(141 - e, 1), 31).to(tl.uint32)
    qs = m >> sh
    rem = m & ((tl.full(m.shape, 1, tl.uint32) << sh) - 1)
    half = tl.full(m.shape, 1, tl.uint32) << (sh - 1)
    qs = qs + ((rem > half) | ((rem == half) & ((qs & 1) == 1))).to(tl.uint32)
    return sign | tl.where(a < (121 << 23), qs, normal)


@triton.jit
def _e4m3fn_value(code):
    """fp32 value of e4m3fn bits `code` (int32 in [0, 255]); 0x7f / 0xff are NaN."""
    neg = (code & 0x80) != 0
    e = (code >> 3) & 15
    m = code & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    v = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)  # subnormal: m * 2^-9
    v = tl.where(neg, -v, v)
    return tl.where((code & 0x7F) == 0x7F, float("nan"), v)


@triton.jit
def quant_fp8_kernel(
    table_ptr,
    SRC_DTYPE: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr, TILE_R: tl.constexpr,
):  # fmt: skip
    """Block b = program_id(0) of tensor t = program_id(1), addresses read from the table."""
    b = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    row = table_ptr + t * 5
    rows = tl.load(row + 3)
    cols = tl.load(row + 4)
    nbc = (cols + BC - 1) // BC
    if b >= ((rows + BR - 1) // BR) * nbc:
        return
    src = tl.load(row + 0).to(tl.pointer_type(SRC_DTYPE))
    q_out = tl.load(row + 1).to(tl.pointer_type(tl.uint8))
    s_out = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    I = b // nbc
    J = b % nbc
    offs_c = J * BC + tl.arange(0, BC)
    col_ok = offs_c < cols
    # pass 1: amax as an integer max over |x|'s fp32 bits (monotone for finite x; a key >= the
    # bits of +inf is an inf or a NaN), exact and NaN-proof.
    key = tl.zeros([TILE_R, BC], dtype=tl.int32)
    for r0 in range(0, BR, TILE_R):
        offs_r = I * BR + r0 + tl.arange(0, TILE_R)
        mask = (offs_r < rows)[:, None] & col_ok[None, :]
        x = tl.load(src + offs_r[:, None] * cols + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        key = tl.maximum(key, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
    kmax = tl.max(tl.max(key, axis=1), axis=0)
    if kmax >= 0x7F800000:
        tl.store(s_out + I * nbc + J, float("nan"))
        return
    scale = tl.math.div_rn(kmax.to(tl.float32, bitcast=True), 448.0)
    scale = tl.where(scale == 0.0, 1.0, scale)
    tl.store(s_out + I * nbc + J, scale)
    # pass 2: quantize (the tiles come back from L1/L2)
    for r0 in range(0, BR, TILE_R):
        offs_r = I * BR + r0 + tl.arange(0, TILE_R)
        mask = (offs_r < rows)[:, None] & col_ok[None, :]
        idx = offs_r[:, None] * cols + offs_c[None, :]
        x = tl.load(src + idx, mask=mask, other=0.0).to(tl.float32)
        v = tl.math.div_rn(x, tl.zeros_like(x) + scale)
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        tl.store(q_out + idx, _e4m3fn_code(v).to(tl.uint8), mask=mask)


@triton.jit
def dequant_fp8_kernel(
    q_ptr, s_ptr, out_ptr, rows, cols,
    OUT_BF16: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr, TILE_R: tl.constexpr,
):  # fmt: skip
    """out[i, j] = float32(q[i, j]) * s[i // BR, j // BC] in out's dtype (round to nearest even).
    q is read as uint8 bits; bf16 output is rounded in integers and stored as int16 bits."""
    I = tl.program_id(0)
    J = tl.program_id(1)
    nbc = tl.cdiv(cols, BC)
    s = tl.load(s_ptr + I * nbc + J)
    offs_c = J * BC + tl.arange(0, BC)
    col_ok = offs_c < cols
    for r0 in range(0, BR, TILE_R):
        offs_r = I * BR + r0 + tl.arange(0, TILE_R)
        mask = (offs_r < rows)[:, None] & col_ok[None, :]
        idx = offs_r[:, None].to(tl.int64) * cols + offs_c[None, :]
        code = tl.load(q_ptr + idx, mask=mask, other=0).to(tl.int32)
        y = _e4m3fn_value(code) * s
        if OUT_BF16:
            b = y.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            tl.store(out_ptr + idx, b.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
        else:
            tl.store(out_ptr + idx, y.to(out_ptr.dtype.element_ty), mask=mask)


def _tile_rows(br: int) -> int:
    return min(br, 32)


# 8 warps: at 4 the [32, 128] tile plus the integer e4m3 encode needs all 255 registers and spills
# (k2sys kernels compile, sm_80 and sm_90); at 8 it takes ~75.
QUANT_NUM_WARPS = 8


def _check_block(block: tuple[int, int]) -> tuple[int, int]:
    br, bc = (int(b) for b in block)
    for name, v in (("block[0]", br), ("block[1]", bc)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name}: the Triton kernels need a power of two >= 16, got {v}")
    return br, bc


def quantize_fp8_blocks_triton(weights: list[torch.Tensor], block: tuple[int, int] = (128, 128),
                               names: list[str] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(q float8_e4m3fn [R, C], scale_inv fp32 [ceil(R/BR), ceil(C/BC)])] for 2-D float tensors
    on one CUDA device (or CPU under TRITON_INTERPRET=1): one launch per source dtype.

    Raises ValueError naming the first tensor that holds a NaN or an infinity."""
    br, bc = _check_block(block)
    if not weights:
        return []
    check_launchable("quantize_fp8_blocks", *weights)
    outs, groups = [], {}
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.dtype not in _SRC:
            raise ValueError(f"quantize_fp8_blocks: tensor {_label(names, i)} must be a 2-D float32/bfloat16/"
                             f"float16 tensor, got {w.dtype} {tuple(w.shape)}")
        w = w.contiguous()
        R, C = w.shape
        q = torch.empty(R, C, dtype=torch.float8_e4m3fn, device=w.device)
        s = torch.empty(cdiv(R, br), cdiv(C, bc), dtype=torch.float32, device=w.device)
        outs.append((w, q, s))
        if w.numel():
            groups.setdefault(w.dtype, []).append(i)
    for dtype, idx in groups.items():
        for k in range(0, len(idx), _MAX_GRID_Y):  # grid axis 1 (tensors) is capped at 65535 on CUDA
            part = idx[k:k + _MAX_GRID_Y]
            table = torch.tensor([[outs[i][0].data_ptr(), outs[i][1].data_ptr(), outs[i][2].data_ptr(),
                                   *outs[i][0].shape] for i in part], dtype=torch.int64).to(weights[0].device)
            max_blocks = max(outs[i][2].numel() for i in part)
            quant_fp8_kernel[(max_blocks, len(part))](
                table, SRC_DTYPE=_tl_dtype(dtype), BR=br, BC=bc, TILE_R=_tile_rows(br), num_warps=QUANT_NUM_WARPS)
    bad = [i for i, (_, _, s) in enumerate(outs) if s.numel() and not bool(torch.isfinite(s).all())]
    if bad:
        raise ValueError(f"quantize_fp8_blocks: tensor {_label(names, bad[0])} holds NaN or inf values; "
                         "fp8 cannot represent them (check the trainer's weights)")
    return [(q, s) for _, q, s in outs]


def dequantize_fp8_block_triton(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
                                block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    br, bc = _check_block(block)
    check_launchable("dequantize_fp8_block", q, scale_inv)
    R, C = q.shape
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dequantize_fp8_block: dtype must be float32, float16 or bfloat16, got {dtype}")
    out = torch.empty(R, C, dtype=dtype, device=q.device)
    if q.numel():
        bf16 = dtype == torch.bfloat16
        dequant_fp8_kernel[(cdiv(R, br), cdiv(C, bc))](
            q.contiguous().view(torch.uint8), scale_inv.contiguous(), out.view(torch.int16) if bf16 else out, R, C,
            OUT_BF16=bf16, BR=br, BC=bc, TILE_R=_tile_rows(br), num_warps=4)
    return out


def _tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _label(names: list[str] | None, i: int) -> str:
    return repr(names[i]) if names is not None and i < len(names) else str(i)
