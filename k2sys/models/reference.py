"""Reference DeepSeek-V3 / Kimi-K2 model in HF layout and naming.

Parameter names are exactly those of an HF `DeepseekV3ForCausalLM` checkpoint
(model.layers.N.self_attn.q_a_proj.weight, model.layers.N.mlp.experts.E.gate_proj.weight,
model.layers.N.mlp.gate.e_score_correction_bias, ...), so `state_dict()` *is* the checkpoint.
It is the correctness anchor for the trainer and the native engine, written for clarity:
readable loops over experts (the MoE math is `k2sys.models.moe`), fp32 softmax. Speed lives in
k2sys.engine and k2sys.kernels.

Shape legend: B batch, T tokens, H heads, D hidden, E routed experts, k experts per token,
C kv_lora_rank, R qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from k2sys.models.config import K2Config
from k2sys.models.moe import moe_experts, route_topk
from k2sys.models.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(logits: torch.Tensor, bias: torch.Tensor, cfg: K2Config) -> tuple[torch.Tensor, torch.Tensor]:
    """K2 router for cfg: logits [T, E] -> (weights [T, k] fp32, ids [T, k]); see `moe.route_topk`."""
    return route_topk(logits, bias, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group,
                      cfg.routed_scaling_factor, cfg.norm_topk_prob)


class Router(nn.Module):
    def __init__(self, cfg: K2Config):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        # A buffer, not a parameter: aux-loss-free balancing updates it outside the optimizer.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())
        return route(logits, self.e_score_correction_bias, self.cfg)


class MoE(nn.Module):
    def __init__(self, cfg: K2Config):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts))
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, ids = self.gate(flat)
        # HF keeps gate_proj and up_proj apart; the routed-experts formula takes them as one gate|up projection.
        gate_up = [lambda a, m=m: torch.cat((m.gate_proj(a), m.up_proj(a)), dim=-1) for m in self.experts]
        out = moe_experts(flat, gate_up, [m.down_proj for m in self.experts], weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)


class MLAttention(nn.Module):
    """Multi-head latent attention: K/V are expanded from a C-dim latent plus a shared R-dim rope key."""

    def __init__(self, cfg: K2Config):
        super().__init__()
        self.cfg = cfg
        H, D = cfg.num_attention_heads, cfg.hidden_size
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, D, bias=cfg.attention_bias)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> q [B, T, H, N+R] (rope part not yet rotated)."""
        if self.cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(*x.shape[:-1], self.cfg.num_attention_heads, self.cfg.qk_head_dim)

    def project_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> (normed latent [B, T, C], rope key [B, T, R] not yet rotated)."""
        ckv = self.kv_a_proj_with_mqa(x)
        latent, k_rope = ckv.split([self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(latent), k_rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: RotaryEmbedding,
                mask: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        H, N, V = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
        q = self.project_q(x).transpose(1, 2)  # [B, H, T, N+R]
        q_nope, q_rope = q.split([N, cfg.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.project_latent(x)
        cs, sn = cos[:, None], sin[:, None]  # [B, 1, T, R/2]
        q_rope = rope.apply(q_rope, cs, sn)
        k_rope = rope.apply(k_rope[:, None], cs, sn)  # [B, 1, T, R]
        kv = self.kv_b_proj(latent).view(B, T, H, N + V).transpose(1, 2)
        k_nope, v = kv.split([N, V], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, H, T, -1)], dim=-1)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * cfg.softmax_scale
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(B, T, H * V)
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: K2Config, layer_idx: int):
        super().__init__()
        self.self_attn = MLAttention(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, rope, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, rope, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class K2Model(nn.Module):
    def __init__(self, cfg: K2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class K2ForCausalLM(nn.Module):
    """forward(input_ids [B, T]) -> logits [B, T, vocab]."""

    def __init__(self, cfg: K2Config):
        super().__init__()
        self.config = cfg
        self.model = K2Model(cfg)
        self.rotary_emb = RotaryEmbedding(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> "K2ForCausalLM":
        """Normal(0, initializer_range) for matrices, ones for norms, zeros for router bias."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * self.config.initializer_range)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
        return self

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """attention_mask [B, T] (1 = real token) supports left-padded batches; positions default to
        0..T-1, or to the running count of real tokens when a mask is given."""
        B, T = input_ids.shape
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary_emb.cos_sin(position_ids, x.dtype)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
            # A fully masked (padding) query row would give NaN; let it attend to itself.
            mask = mask | torch.eye(T, dtype=torch.bool, device=x.device)[None, None]
        for layer in self.model.layers:
            x = layer(x, cos, sin, self.rotary_emb, mask)
        return self.lm_head(self.model.norm(x))


def num_params(cfg: K2Config) -> int:
    """Parameter count from shapes alone (no allocation)."""
    return sum(math.prod(s) for s in param_shapes(cfg).values())


def param_shapes(cfg: K2Config) -> dict[str, tuple[int, ...]]:
    """HF name -> shape for every tensor of the checkpoint (parameters and the router bias)."""
    with torch.device("meta"):
        m = K2ForCausalLM(cfg)
    out = {n: tuple(p.shape) for n, p in m.state_dict(keep_vars=True).items()}
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out
