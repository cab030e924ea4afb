"""Fused MoE (grouped GEMMs over align-to-block pairs): forward and backward.

  out[t] = sum_j w[t, j] * W2[e] (silu(G[e] x[t]) * (U[e] x[t])),  e = ids[t, j]
  with G[e] = w13[e, :I] and U[e] = w13[e, I:] (the SGLang/vLLM layout; HF `gate_up_proj`).

Legend: T tokens, H hidden, I expert intermediate, E local experts, K = top_k, P = T*K pairs.
  hidden [T, H]   w13 [E, 2I, H]   w2 [E, H, I]   topk_weights [T, K]   topk_ids [T, K]

Forward (2 launches after align):
  GEMM1 + SiLU-and-mul epilogue: act[p] = silu(G x) * (U x)     [P, I]   (+ pre-activations
                                                                          [P, 2I] when training)
  GEMM2 with routing weight:      y[p] = w[p] * W2 act[p]        [P, H] -> sum over K -> [T, H]
Backward (`FusedMoEFunction`, 4 launches; elementwise parts in torch, fp32):
  dA = W2^T dout[t]       (grouped GEMM)   dw[p] = <dA, act>    da = w * dA
  dgu = [da * u * silu'(g), da * silu(g)]
  dx  = sum_j W13^T dgu   (grouped GEMM)
  dW2[e]  = sum_p (w dout)^T act   dW13[e] = sum_p dgu^T x   (grouped weight-gradient kernel)

fp32 accumulation everywhere; fp32 inputs use IEEE dot (no tf32). FP8 e4m3 weights with
128x128 block scales are dequantized tile by tile in the GEMM loop (weight-only, activations
stay bf16/fp16): inference only.

The torch reference is `k2sys.kernels.fused_moe_torch` (this package imports nothing from k2sys;
the formula is defined once, in k2sys.models.moe).
"""

from __future__ import annotations

import torch

from ._interp import cdiv, check_launchable, tl, triton, upcast_flag
from .align import MoEAlignment, _align
from .align import _check as _check_align
from .configs import FP8_NATIVE_ARCH, MoEKernelConfig, device_name, dtype_key, get_config
from .fp8 import FP8_BLOCK, FP8_DTYPE, check_fp8_scale
from .launch import launch, target_arch

__all__ = ["fused_moe", "FusedMoEFunction", "check_moe_args"]


@triton.jit
def _e4m3fn_bits_to_f32(bits):
    """fp32 values of float8_e4m3fn bit patterns (uint8), in integer arithmetic: GPUs before sm_89
    have no fp8 types in triton ("fp8e4nv not supported in this architecture")."""
    code = bits.to(tl.int32)
    e = (code >> 3) & 15
    m = code & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    v = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)  # subnormals: m * 2^-9
    v = tl.where((code & 0x80) != 0, -v, v)
    return tl.where((code & 0x7F) == 0x7F, float("nan"), v)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, preact_ptr, scale_ptr, topk_w_ptr,
    sorted_ids_ptr, expert_ids_ptr, ntpp_ptr,
    N, K, P, EM,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, stride_pm,
    stride_se, stride_sn, stride_sk,
    A_DIV: tl.constexpr,  # A row of pair p is p // A_DIV (top_k when A is per token)
    FUSE_SILU: tl.constexpr,  # B rows [n] (gate) and [N + n] (up); C = silu(gate) * up
    STORE_PREACT: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    FP8_W: tl.constexpr,
    FP8_BITS: tl.constexpr,  # fp8 weights passed as uint8 bit patterns, decoded in integer arithmetic
    SCALE_BLOCK: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """C[p, n] = sum_k A[p // A_DIV, k] * B[e(p), n, k] for the pairs of one row block."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(EM, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_size
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size
    if pid_m * BLOCK_M >= tl.load(ntpp_ptr):
        return
    e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
    row_ok = pair < P
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (pair // A_DIV)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + e * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if FUSE_SILU:
            b_up = tl.load(b_ptrs + N * stride_bn, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        if FP8_W:
            s_ptrs = scale_ptr + e * stride_se + ((kb * BLOCK_K) // SCALE_BLOCK) * stride_sk
            s = tl.load(s_ptrs + (offs_n // SCALE_BLOCK) * stride_sn, mask=col_ok, other=0.0)
            if FP8_BITS:
                b = (_e4m3fn_bits_to_f32(b) * s[None, :]).to(a.dtype)
            else:
                b = (b.to(tl.float32) * s[None, :]).to(a.dtype)
            if FUSE_SILU:
                s_up = tl.load(s_ptrs + ((offs_n + N) // SCALE_BLOCK) * stride_sn, mask=col_ok, other=0.0)
                if FP8_BITS:
                    b_up = (_e4m3fn_bits_to_f32(b_up) * s_up[None, :]).to(a.dtype)
                else:
                    b_up = (b_up.to(tl.float32) * s_up[None, :]).to(a.dtype)
        elif UPCAST:
            b = b.to(tl.float32)
            if FUSE_SILU:
                b_up = b_up.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if FUSE_SILU:
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    mask = row_ok[:, None] & col_ok[None, :]
    if FUSE_SILU:
        if STORE_PREACT:
            p_ptrs = preact_ptr + pair[:, None] * stride_pm + offs_n[None, :]
            tl.store(p_ptrs, acc.to(preact_ptr.dtype.element_ty), mask=mask)
            tl.store(p_ptrs + N, acc_up.to(preact_ptr.dtype.element_ty), mask=mask)
        acc = acc * tl.sigmoid(acc) * acc_up
    if MUL_WEIGHT:
        w = tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    tl.store(c_ptr + pair[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_wgrad_kernel(
    x_ptr, y_ptr, c_ptr, xscale_ptr, sorted_ids_ptr, offsets_ptr,
    N, K, P,
    stride_xm, stride_xn, stride_ym, stride_yk, stride_ce, stride_cn, stride_ck,
    X_DIV: tl.constexpr, Y_DIV: tl.constexpr, SCALE_X: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C[e, n, k] = sum over pairs p of expert e of (s[p] X[p // X_DIV, n]) * Y[p // Y_DIV, k]."""
    e = tl.program_id(1)
    pid = tl.program_id(0)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    offs_n = (pid // num_pid_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = (pid % num_pid_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    k_ok = offs_k < K
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + offs_m, mask=offs_m < end, other=P).to(tl.int64)
        ok = pair < P
        xt = tl.load(x_ptr + (pair // X_DIV)[None, :] * stride_xm + offs_n[:, None] * stride_xn,
                     mask=ok[None, :] & n_ok[:, None], other=0.0)  # fmt: skip
        y = tl.load(y_ptr + (pair // Y_DIV)[:, None] * stride_ym + offs_k[None, :] * stride_yk,
                    mask=ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        if UPCAST:
            y = y.to(tl.float32)
            xt = xt.to(tl.float32)
        if SCALE_X:
            s = tl.load(xscale_ptr + pair, mask=ok, other=0.0).to(tl.float32)
            xt = (xt.to(tl.float32) * s[None, :]).to(y.dtype)
        acc = tl.dot(xt, y, acc, input_precision=PRECISION)
    c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + offs_n[:, None] * stride_cn + offs_k[None, :] * stride_ck
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


def check_moe_args(hidden, w13, w2, topk_weights, topk_ids, w13_scale=None, w2_scale=None) -> None:
    """Raise ValueError naming the bad argument and the fix."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)} (flatten batch dims first)")
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    T, H = hidden.shape
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w13 must be [E, 2I, H] and w2 [E, H, I], got {tuple(w13.shape)} and {tuple(w2.shape)}")
    E, I2, H13 = w13.shape
    if H13 != H or I2 % 2:
        raise ValueError(f"w13 must be [E, 2I, H={H}] (gate rows then up rows), got {tuple(w13.shape)}")
    if tuple(w2.shape) != (E, H, I2 // 2):
        raise ValueError(f"w2 must be [E={E}, H={H}, I={I2 // 2}] to match w13, got {tuple(w2.shape)}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape) or topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(
            f"topk_weights and topk_ids must both be [T={T}, top_k], got {tuple(topk_weights.shape)} "
            f"and {tuple(topk_ids.shape)}"
        )
    fp8 = w13.dtype == FP8_DTYPE
    if fp8 != (w2.dtype == FP8_DTYPE) or fp8 != (w13_scale is not None) or fp8 != (w2_scale is not None):
        raise ValueError(
            "fp8 weights need both w13 and w2 in float8_e4m3fn with w13_scale and w2_scale "
            f"(got w13 {w13.dtype}, w2 {w2.dtype}, scales given: {w13_scale is not None}, {w2_scale is not None})"
        )
    if fp8:
        if hidden.dtype == torch.float32:
            raise ValueError("fp8 weights pair with bf16 or fp16 activations; cast hidden to bfloat16")
        check_fp8_scale("w13", w13, w13_scale)
        check_fp8_scale("w2", w2, w2_scale)
    elif w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        raise ValueError(f"w13/w2 dtype ({w13.dtype}/{w2.dtype}) must match hidden ({hidden.dtype}) or be fp8")


def _launch_gemm(a, b, c, align, P, top_k_div, cfg, *, fuse_silu=False, preact=None, weights=None,
                 scale=None, b_strides=None, upcast=False):  # fmt: skip
    """C[p] = A[p // top_k_div] @ B[e]^T with B viewed as [E, N, K] through b_strides."""
    N = c.shape[1]
    K = a.shape[1]
    EM = align.sorted_token_ids.numel()
    arch = target_arch(b.device)
    fp8_bits = scale is not None and arch is not None and arch < FP8_NATIVE_ARCH
    if fp8_bits:
        b = b.view(torch.uint8)  # same strides; the kernel decodes the bits itself
    stride_be, stride_bn, stride_bk = b_strides or b.stride()
    s_strides = scale.stride() if scale is not None else (0, 0, 0)
    grid = (cdiv(EM, cfg.BLOCK_M) * cdiv(N, cfg.BLOCK_N),)
    launch(
        _grouped_gemm_kernel, grid,
        a, b, c, preact if preact is not None else c, scale if scale is not None else c,
        weights if weights is not None else c,
        align.sorted_token_ids, align.expert_ids, align.num_tokens_post_padded,
        N, K, P, EM,
        a.stride(0), a.stride(1), stride_be, stride_bn, stride_bk, c.stride(0), c.stride(1),
        preact.stride(0) if preact is not None else 0, *s_strides,
        A_DIV=top_k_div, FUSE_SILU=fuse_silu, STORE_PREACT=preact is not None, MUL_WEIGHT=weights is not None,
        FP8_W=scale is not None, FP8_BITS=fp8_bits, SCALE_BLOCK=FP8_BLOCK, UPCAST=upcast,
        PRECISION="ieee" if a.dtype == torch.float32 and not upcast else "tf32",
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def _launch_wgrad(x, y, c, align, P, x_div, y_div, cfg, *, x_scale=None, upcast=False):
    """C[e] = sum over e's pairs of (x_scale * X[p // x_div])^T Y[p // y_div]; C is [E, N, K]."""
    E, N, K = c.shape
    grid = (cdiv(N, cfg.BLOCK_N) * cdiv(K, cfg.BLOCK_K), E)
    launch(
        _grouped_wgrad_kernel, grid,
        x, y, c, x_scale if x_scale is not None else c, align.sorted_token_ids, align.expert_offsets,
        N, K, P,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), c.stride(0), c.stride(1), c.stride(2),
        X_DIV=x_div, Y_DIV=y_div, SCALE_X=x_scale is not None, UPCAST=upcast,
        PRECISION="ieee" if y.dtype == torch.float32 and not upcast else "tf32",
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def _pick_config(hidden, w13, w2, topk_ids, fp8, config):
    if config is not None:
        cfg = config
    else:
        key = dtype_key(hidden.dtype, fp8)
        cfg = get_config(hidden.shape[0], w13.shape[0], w2.shape[2], topk_ids.shape[1], key, device_name(hidden.device),
                         arch=target_arch(hidden.device))
    if fp8 and FP8_BLOCK % cfg.BLOCK_K:
        raise ValueError(f"fp8 block scales need BLOCK_K to divide {FP8_BLOCK}, got config BLOCK_K={cfg.BLOCK_K}")
    return cfg


def _forward(hidden, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, cfg, save_preact):
    T, H = hidden.shape
    E, I = w2.shape[0], w2.shape[2]
    top_k = topk_ids.shape[1]
    P = T * top_k
    upcast = upcast_flag(hidden.dtype)
    buf_dtype = torch.float32 if upcast else hidden.dtype  # interpreter: keep bf16 out of arithmetic
    _check_align(topk_ids, cfg.BLOCK_M, E)
    align = _align(topk_ids, cfg.BLOCK_M, E)
    act = torch.empty(P, I, dtype=buf_dtype, device=hidden.device)
    preact = torch.empty(P, 2 * I, dtype=buf_dtype, device=hidden.device) if save_preact else None
    _launch_gemm(hidden, w13, act, align, P, top_k, cfg, fuse_silu=True, preact=preact, scale=w13_scale, upcast=upcast)
    y = torch.zeros(P, H, dtype=buf_dtype, device=hidden.device)  # pairs off this rank (id -1) stay 0
    weights = topk_weights.reshape(-1).contiguous()
    _launch_gemm(act, w2, y, align, P, 1, cfg, weights=weights, scale=w2_scale, upcast=upcast)
    out = y.view(T, top_k, H).sum(dim=1, dtype=torch.float32).to(hidden.dtype)
    return out, align, preact


def _backward(dout, hidden, w13, w2, topk_weights, preact, align, cfg):
    T, H = hidden.shape
    E, I = w2.shape[0], w2.shape[2]
    top_k = topk_weights.shape[1]
    P = T * top_k
    upcast = upcast_flag(hidden.dtype)
    buf_dtype = torch.float32 if upcast else hidden.dtype
    dout = dout.to(hidden.dtype).contiguous()
    # dA[p] = W2[e]^T dout[t]: w2 [E, H, I] read as [E, N=I, K=H].
    dA = torch.zeros(P, I, dtype=buf_dtype, device=hidden.device)
    w2_t = (w2.stride(0), w2.stride(2), w2.stride(1))
    _launch_gemm(dout, w2, dA, align, P, top_k, cfg, b_strides=w2_t, upcast=upcast)
    g, u = preact.float().split(I, dim=1)
    sg = torch.sigmoid(g)
    act = g * sg * u
    dA = dA.float()
    w = topk_weights.reshape(-1, 1).float()
    d_weights = (dA * act).sum(dim=1).view(T, top_k).to(topk_weights.dtype)
    da = dA * w
    dgu = torch.cat([da * u * sg * (1 + g * (1 - sg)), da * g * sg], dim=1).to(buf_dtype)
    # dx[t] = sum_j W13[e]^T dgu[p]: w13 [E, 2I, H] read as [E, N=H, K=2I].
    dx_pairs = torch.zeros(P, H, dtype=buf_dtype, device=hidden.device)
    w13_t = (w13.stride(0), w13.stride(2), w13.stride(1))
    _launch_gemm(dgu, w13, dx_pairs, align, P, 1, cfg, b_strides=w13_t, upcast=upcast)
    dx = dx_pairs.view(T, top_k, H).sum(dim=1, dtype=torch.float32).to(hidden.dtype)
    wbuf = torch.float32 if upcast else w2.dtype
    dw2 = torch.empty(E, H, I, dtype=wbuf, device=hidden.device)
    _launch_wgrad(dout, act.to(buf_dtype), dw2, align, P, top_k, 1, cfg,
                  x_scale=topk_weights.reshape(-1).float().contiguous(), upcast=upcast)  # fmt: skip
    dw13 = torch.empty(E, 2 * I, H, dtype=wbuf, device=hidden.device)
    _launch_wgrad(dgu, hidden, dw13, align, P, 1, top_k, cfg, upcast=upcast)
    return dx, dw13.to(w13.dtype), dw2.to(w2.dtype), d_weights


class FusedMoEFunction(torch.autograd.Function):
    """Autograd for fused_moe: grads for hidden, w13, w2 and topk_weights (ids are discrete)."""

    @staticmethod
    def forward(ctx, hidden, w13, w2, topk_weights, topk_ids, config):
        out, align, preact = _forward(hidden, w13, w2, topk_weights, topk_ids, None, None, config, True)
        ctx.save_for_backward(hidden, w13, w2, topk_weights, preact, *align)
        ctx.config = config
        return out

    @staticmethod
    def backward(ctx, dout):
        hidden, w13, w2, topk_weights, preact, *align = ctx.saved_tensors
        dx, dw13, dw2, dweights = _backward(dout, hidden, w13, w2, topk_weights, preact, MoEAlignment(*align), ctx.config)
        needs = ctx.needs_input_grad
        return (dx if needs[0] else None, dw13 if needs[1] else None, dw2 if needs[2] else None,
                dweights if needs[3] else None, None, None)  # fmt: skip


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    config: MoEKernelConfig | None = None,
) -> torch.Tensor:
    """Triton fused MoE, [T, H] in hidden's dtype; differentiable when inputs require grad."""
    check_moe_args(hidden, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    check_launchable("fused_moe", hidden, w13, w2, topk_weights, topk_ids)
    fp8 = w13_scale is not None
    cfg = _pick_config(hidden, w13, w2, topk_ids, fp8, config)
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    if hidden.shape[0] == 0:
        return hidden.new_zeros(hidden.shape)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, w13, w2, topk_weights))
    if grad:
        if fp8:
            raise ValueError("fused_moe backward needs bf16/fp16/fp32 weights; fp8 weights are inference-only")
        return FusedMoEFunction.apply(hidden, w13, w2, topk_weights, topk_ids, cfg)
    out, _, _ = _forward(hidden, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, cfg, False)
    return out

