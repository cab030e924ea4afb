"""The K2 forward pass of the native engine: ragged batches over the paged MLA latent cache.

Weights live in a few fused base tensors (q_a + kv_a input projections, gate+up, stacked
experts); every HF checkpoint name is a *view* into a base, so a weight update is a copy into
the view (no re-packing), and releasing weights frees the bases' storage for real.

Attention is the absorbed form for every token, prefill and decode:
    q_lat[h] = q_nope[h] @ W_UK[h]            (fold kv_b's K part into the query)
    score    = q_lat . latent + q_rope . k_rope  (over the cached [latent | k_rope] rows)
    out[h]   = (probs @ latent) @ W_UV[h]^T    (apply kv_b's V part after attention)
so K and V are never expanded per head.

Shape legend: T tokens in the step, B sequences, Q query tokens per sequence, L cached tokens,
H heads, D hidden, C kv_lora_rank, R qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim,
E routed experts, I expert width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from k2sys.engine.kv_cache import PagedLatentCache
from k2sys.models import K2Config, param_shapes, route
from k2sys.models.rope import RotaryEmbedding

__all__ = ["AttnGroup", "ModelRunner", "StepBatch"]

try:  # the fused Triton MoE, used where it runs compiled (CUDA); CPU keeps grouped_moe below
    from k2sys.kernels import moe_forward as _kernel_moe
    from k2sys.kernels import uses_triton as _uses_triton
except Exception:  # noqa: BLE001 - kernels package absent or triton broken: the torch path serves
    _kernel_moe = _uses_triton = None


@dataclass
class AttnGroup:
    """Sequences that attend with the same query length layout (one padded batch)."""
    rows: torch.Tensor          # [B, Q] rows of the step's tokens (padding rows repeat a valid one)
    qpos: torch.Tensor          # [B, Q] absolute positions of the queries (padding: 0)
    block_tables: torch.Tensor  # [B, nb]
    ctx_len: torch.Tensor       # [B] tokens in cache after this step's writes
    valid: torch.Tensor         # [B, Q] real query (not padding)


@dataclass
class StepBatch:
    input_ids: torch.Tensor     # [T]
    positions: torch.Tensor     # [T]
    slots: torch.Tensor         # [T] cache slot of each token
    groups: list[AttnGroup]
    logit_rows: torch.Tensor    # [S] rows whose next-token logits are needed


class _Layer:
    """One decoder layer's weights as fused bases and HF-named views (filled by ModelRunner)."""


class ModelRunner:
    def __init__(self, cfg: K2Config, state: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: str | torch.device = "cpu", max_positions: int | None = None):
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.H, self.C, self.R = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.N, self.V = cfg.qk_nope_head_dim, cfg.v_head_dim
        self.scale = cfg.softmax_scale
        self.bases: list[torch.Tensor] = []
        self.params: dict[str, torch.Tensor] = {}
        self._build_storage()
        self.expected = {n: tuple(s) for n, s in param_shapes(cfg).items()}
        missing = sorted(set(self.expected) - set(state))
        unexpected = sorted(set(state) - set(self.expected))
        if missing or unexpected:
            raise ValueError(f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, t in state.items():
                self.params[name].copy_(t)
        self.rope = RotaryEmbedding(cfg).to(self.device)
        n_pos = max_positions or cfg.max_position_embeddings
        cos, sin = self.rope.cos_sin(torch.arange(n_pos, device=self.device), dtype)
        self.cos_table, self.sin_table = cos, sin

    # ---- weight storage ----------------------------------------------------------------------
    def _base(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = torch.zeros(*shape, dtype=dtype or self.dtype, device=self.device)
        self.bases.append(t)
        return t

    def _build_storage(self) -> None:
        cfg, H, C, R, N, V = self.cfg, self.H, self.C, self.R, self.N, self.V
        D, P = cfg.hidden_size, self.params
        self.embed = P["model.embed_tokens.weight"] = self._base(cfg.vocab_size, D)
        self.lm_head = self.embed if cfg.tie_word_embeddings else self._base(cfg.vocab_size, D)
        if not cfg.tie_word_embeddings:
            P["lm_head.weight"] = self.lm_head
        self.final_norm = P["model.norm.weight"] = self._base(D)
        self.layers: list[_Layer] = []
        qk = H * (N + R)
        for i in range(cfg.num_hidden_layers):
            p, L = f"model.layers.{i}.", _Layer()
            self.layers.append(L)
            a = p + "self_attn."
            L.in_norm = P[p + "input_layernorm.weight"] = self._base(D)
            L.post_norm = P[p + "post_attention_layernorm.weight"] = self._base(D)
            # One matmul for both input projections of attention (q_a or q, and kv_a).
            L.q_in = cfg.q_lora_rank if cfg.q_lora_rank is not None else qk
            L.attn_in = self._base(L.q_in + C + R, D)
            P[a + ("q_a_proj.weight" if cfg.q_lora_rank else "q_proj.weight")] = L.attn_in[:L.q_in]
            P[a + "kv_a_proj_with_mqa.weight"] = L.attn_in[L.q_in:]
            L.attn_in_bias = None
            if cfg.attention_bias:
                L.attn_in_bias = self._base(L.q_in + C + R)
                if cfg.q_lora_rank:
                    P[a + "q_a_proj.bias"] = L.attn_in_bias[:L.q_in]
                P[a + "kv_a_proj_with_mqa.bias"] = L.attn_in_bias[L.q_in:]
            if cfg.q_lora_rank:
                L.q_norm = P[a + "q_a_layernorm.weight"] = self._base(cfg.q_lora_rank)
                L.q_b = P[a + "q_b_proj.weight"] = self._base(qk, cfg.q_lora_rank)
            L.kv_norm = P[a + "kv_a_layernorm.weight"] = self._base(C)
            L.kv_b = P[a + "kv_b_proj.weight"] = self._base(H * (N + V), C)
            kvb = L.kv_b.view(H, N + V, C)
            L.w_uk, L.w_uv = kvb[:, :N], kvb[:, N:]          # [H, N, C], [H, V, C]
            L.o_proj = P[a + "o_proj.weight"] = self._base(D, H * V)
            L.o_bias = None
            if cfg.attention_bias:
                L.o_bias = P[a + "o_proj.bias"] = self._base(D)
            L.moe = cfg.is_moe_layer(i)
            if not L.moe:
                L.gate_up, L.down = self._mlp(p + "mlp.", cfg.intermediate_size)
                continue
            E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
            L.router = P[p + "mlp.gate.weight"] = self._base(E, D, dtype=torch.float32)
            L.router_bias = P[p + "mlp.gate.e_score_correction_bias"] = self._base(E, dtype=torch.float32)
            L.w13, L.w2 = self._base(E, 2 * I, D), self._base(E, D, I)
            for e in range(E):
                q = f"{p}mlp.experts.{e}."
                P[q + "gate_proj.weight"], P[q + "up_proj.weight"] = L.w13[e, :I], L.w13[e, I:]
                P[q + "down_proj.weight"] = L.w2[e]
            L.shared = None
            if cfg.n_shared_experts:
                L.shared = self._mlp(p + "mlp.shared_experts.", I * cfg.n_shared_experts)

    def _mlp(self, prefix: str, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
        gate_up = self._base(2 * inter, self.cfg.hidden_size)
        self.params[prefix + "gate_proj.weight"], self.params[prefix + "up_proj.weight"] = gate_up[:inter], gate_up[inter:]
        down = self.params[prefix + "down_proj.weight"] = self._base(self.cfg.hidden_size, inter)
        return gate_up, down

    @property
    def weight_bytes(self) -> int:
        return sum(b.untyped_storage().nbytes() for b in self.bases)

    def release_weights(self) -> None:
        """Free every base's storage (views stay attached to the emptied storage)."""
        for b in self.bases:
            b.untyped_storage().resize_(0)

    def resume_weights(self) -> None:
        """Storage back, contents undefined until the next weight update."""
        for b in self.bases:
            b.untyped_storage().resize_(b.numel() * b.element_size())

    # ---- forward -----------------------------------------------------------------------------
    @staticmethod
    def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return w * xf.to(dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.rope.apply(x, cos, sin)

    @torch.inference_mode()
    def forward(self, batch: StepBatch, cache: PagedLatentCache) -> torch.Tensor:
        """-> logits [S, vocab] (fp32) for batch.logit_rows."""
        cfg = self.cfg
        eps = cfg.rms_norm_eps
        x = F.embedding(batch.input_ids, self.embed)
        cos, sin = self.cos_table[batch.positions], self.sin_table[batch.positions]
        for li, L in enumerate(self.layers):
            h = self._rms(x, L.in_norm, eps)
            x = x + self._attention(li, L, h, cos, sin, batch, cache)
            h = self._rms(x, L.post_norm, eps)
            x = x + (self._moe(L, h) if L.moe else self._swiglu(h, L.gate_up, L.down))
        x = x.index_select(0, batch.logit_rows)
        x = self._rms(x, self.final_norm, eps)
        return F.linear(x, self.lm_head).float()

    def _attention(self, li: int, L: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   batch: StepBatch, cache: PagedLatentCache) -> torch.Tensor:
        cfg, H, C, R, N, V = self.cfg, self.H, self.C, self.R, self.N, self.V
        T = h.shape[0]
        a = F.linear(h, L.attn_in, L.attn_in_bias)
        q, latent, k_rope = a.split([L.q_in, C, R], dim=-1)
        if cfg.q_lora_rank:
            q = F.linear(self._rms(q, L.q_norm, 1e-6), L.q_b)
        q = q.view(T, H, N + R)
        q_nope, q_rope = q.split([N, R], dim=-1)
        q_rope = self._rope(q_rope, cos[:, None], sin[:, None])
        k_rope = self._rope(k_rope, cos, sin)
        latent = self._rms(latent, L.kv_norm, 1e-6)
        cache.write(li, batch.slots, latent, k_rope)
        q_lat = torch.bmm(q_nope.transpose(0, 1), L.w_uk).transpose(0, 1)      # [T, H, C]
        qcat = torch.cat([q_lat, q_rope], dim=-1)                               # [T, H, C+R]
        o_lat = torch.empty(T, H, C, dtype=h.dtype, device=h.device)
        for g in batch.groups:
            B, Q = g.rows.shape
            kv = cache.gather(li, g.block_tables).to(h.dtype)                  # [B, Lmax, C+R]
            qg = qcat.index_select(0, g.rows.reshape(-1)).view(B, Q * H, C + R)
            scores = torch.bmm(qg, kv.transpose(1, 2)).float() * self.scale    # [B, Q*H, Lmax]
            kpos = torch.arange(kv.shape[1], device=h.device)
            mask = (kpos[None, None, :] <= g.qpos[:, :, None]) & (kpos[None, None, :] < g.ctx_len[:, None, None])
            scores = scores.view(B, Q, H, -1).masked_fill(~mask[:, :, None, :], float("-inf"))
            probs = scores.softmax(-1).to(h.dtype).view(B, Q * H, -1)
            out = torch.bmm(probs, kv[..., :C]).view(B * Q, H, C)
            if Q == 1:
                o_lat.index_copy_(0, g.rows.view(-1), out)
            else:
                keep = g.valid.view(-1)
                o_lat.index_copy_(0, g.rows.view(-1)[keep], out[keep])
        o = torch.bmm(o_lat.transpose(0, 1), L.w_uv.transpose(1, 2)).transpose(0, 1)  # [T, H, V]
        return F.linear(o.reshape(T, H * V), L.o_proj, L.o_bias)

    @staticmethod
    def _swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        g, u = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(g) * u, down)

    def _moe(self, L: _Layer, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        weights, ids = route(F.linear(x.float(), L.router), L.router_bias, cfg)
        if _kernel_moe is not None and _uses_triton(x):
            out = _kernel_moe(x, L.w13, L.w2, weights, ids)
        else:
            out = grouped_moe(x, L.w13, L.w2, weights, ids)
        if L.shared is not None:
            out = out + self._swiglu(x, *L.shared)
        return out


def grouped_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                ids: torch.Tensor) -> torch.Tensor:
    """Routed experts by sorting (token, slot) pairs by expert and running one GEMM pair per
    expert on a contiguous slice. x [T, D], w13 [E, 2I, D], w2 [E, D, I], weights/ids [T, k]."""
    T, k = ids.shape
    E = w13.shape[0]
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()
    tok = order // k
    xs = x.index_select(0, tok)
    ys = torch.empty_like(xs)
    start = 0
    for e, c in enumerate(counts):
        if c:
            g, u = F.linear(xs[start:start + c], w13[e]).chunk(2, dim=-1)
            ys[start:start + c] = F.linear(F.silu(g) * u, w2[e])
            start += c
    ys = ys * weights.reshape(-1).index_select(0, order)[:, None].to(ys.dtype)
    return torch.zeros_like(x).index_add_(0, tok, ys)
