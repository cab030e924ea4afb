"""FP8 e4m3 expert weights with 128x128 block scales (the DeepSeek-V3 / Kimi-K2 FP8 format).

w[e, n, k] ~= w_fp8[e, n, k] * scale[e, n // 128, k // 128]; each 128x128 block is scaled so
its absolute maximum maps to e4m3's largest finite value (448). Edge blocks are partial.
"""

from __future__ import annotations

import torch

from ._interp import cdiv

__all__ = ["FP8_BLOCK", "FP8_DTYPE", "quantize_fp8_block", "dequantize_fp8_block", "check_fp8_scale"]

FP8_BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
_FP8_MAX = 448.0


def _pad_to_blocks(w: torch.Tensor) -> torch.Tensor:
    E, N, K = w.shape
    pn, pk = cdiv(N, FP8_BLOCK) * FP8_BLOCK - N, cdiv(K, FP8_BLOCK) * FP8_BLOCK - K
    return torch.nn.functional.pad(w, (0, pk, 0, pn)) if pn or pk else w


def quantize_fp8_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] float weights -> (fp8 e4m3 weights [E, N, K], fp32 scales [E, ceil(N/128), ceil(K/128)])."""
    if w.dim() != 3 or not w.is_floating_point():
        raise ValueError(f"quantize_fp8_block: expected float [E, N, K] weights, got {w.dtype} {tuple(w.shape)}")
    E, N, K = w.shape
    nb, kb = cdiv(N, FP8_BLOCK), cdiv(K, FP8_BLOCK)
    blocks = _pad_to_blocks(w.float()).view(E, nb, FP8_BLOCK, kb, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(2, 4)).clamp_min(1e-12)
    scale = amax / _FP8_MAX
    q = (blocks / scale[:, :, None, :, None]).clamp(-_FP8_MAX, _FP8_MAX)
    q = q.view(E, nb * FP8_BLOCK, kb * FP8_BLOCK)[:, :N, :K].to(FP8_DTYPE).contiguous()
    return q, scale.contiguous()


def check_fp8_scale(name: str, w: torch.Tensor, scale: torch.Tensor) -> None:
    E, N, K = w.shape
    want = (E, cdiv(N, FP8_BLOCK), cdiv(K, FP8_BLOCK))
    if tuple(scale.shape) != want or scale.dtype != torch.float32:
        raise ValueError(
            f"{name}_scale must be float32 of shape {want} (one scale per 128x128 block of {name}), "
            f"got {scale.dtype} {tuple(scale.shape)}; make it with quantize_fp8_block"
        )


def dequantize_fp8_block(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_fp8_block (up to fp8 rounding)."""
    check_fp8_scale("w", w, scale)
    full = scale.repeat_interleave(FP8_BLOCK, dim=1).repeat_interleave(FP8_BLOCK, dim=2)
    return (w.float() * full[:, : w.shape[1], : w.shape[2]]).to(dtype)
