"""Rotary embeddings for MLA's rope part: default RoPE and YaRN, DeepSeek-V3 conventions.

cos/sin legend: [T, qk_rope_head_dim // 2] (one frequency per rotated pair).
"""

from __future__ import annotations

import math

import torch

from k2sys.models.config import K2Config, yarn_mscale


def inv_freq_and_scale(cfg: K2Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin magnitude factor (YaRN attention factor)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0 / pos_freqs, 1.0
    factor = float(rs["factor"])
    orig = rs["original_max_position_embeddings"]
    mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
    if rs.get("attention_factor") is not None:
        attn_factor = float(rs["attention_factor"])
    elif mscale and mscale_all:
        attn_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
    else:
        attn_factor = yarn_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrap = 1 - ramp  # 1 where the original frequencies are kept (high-frequency dims)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap
    return inv_freq, attn_factor


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, cfg: K2Config):
        super().__init__()
        inv_freq, self.attention_scaling = inv_freq_and_scale(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = cfg.rope_interleave

    def cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [..., T] -> cos, sin [..., T, dim/2]."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        return (freqs.cos() * self.attention_scaling).to(dtype), (freqs.sin() * self.attention_scaling).to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, dim] (or any [..., T, dim]) with cos/sin broadcastable to [..., T, dim/2].

        Output is in half-split order (x_even-rotated, x_odd-rotated), exactly as HF computes it, so
        q and k agree; dot products are the same as the interleaved layout's.
        """
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
