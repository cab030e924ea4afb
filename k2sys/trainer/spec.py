"""The Kimi-K2 / DeepSeek-V3 architecture as a megatron-core GPTModel.

K2Config (HF field names) -> MLATransformerConfig -> layer specs -> GPTModel:
  MLA (q/kv low-rank + latent RMSNorms, decoupled RoPE/YaRN), first_k_dense_replace dense SwiGLU
  layers, then MoE layers: sigmoid router with expert bias (aux-loss-free: megatron's
  finalize_model_grads moves the bias by `bias_update_rate * sign(mean_load - load)` each step),
  group-limited top-k, routed scaling, one shared expert; RMSNorm everywhere.

Spec: the Transformer Engine spec when transformer_engine imports (GPU), else the local spec with
two modules of ours: `K2CoreAttention` (the local DotProductAttention rejects MLA's k/v channel
sizes) and `K2RMSNorm` (megatron's torch-norm wrapper refuses sequence parallel, which MoE+TP needs).

Group-limited routing: megatron's TopKRouter ranks expert groups by the sum of their top
(topk // group_topk) scores, DeepSeek-V3 (HF transformers, k2sys.models.route_topk) by their top-2; the
two agree only when num_experts_per_tok == 2 * topk_group. Every MoE layer therefore gets
`K2TopKRouter` (megatron's router with HF's group scoring; same parameters, buffers and state-dict
keys), so any valid DeepseekV3 config trains with the routing it was released with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from k2sys.models.config import ConfigError, K2Config
from k2sys.models.moe import route_topk
from k2sys.trainer.cpu_compat import ensure_cpu_shims

ensure_cpu_shims()

from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.moe.moe_utils import (  # noqa: E402
    apply_router_token_dropping,
    compute_routing_scores_for_aux_loss,
)
from megatron.core.transformer.moe.router import TopKRouter  # noqa: E402
from megatron.core.transformer.multi_latent_attention import MLASelfAttention  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.transformer_config import MLATransformerConfig  # noqa: E402

# HF DeepseekV3 builds q_a_layernorm / kv_a_layernorm with the RMSNorm default eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def grouping_active(cfg: K2Config) -> bool:
    return cfg.n_group > 1 and cfg.topk_group < cfg.n_group


def check_supported(cfg: K2Config, tp: int = 1, ep: int = 1) -> None:
    """Raise ConfigError for a config/layout this backend would not reproduce exactly."""
    def need(cond: bool, field: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{field}: {msg}")

    need(not cfg.attention_bias, "K2Config.attention_bias", "biased MLA projections are not supported; set False")
    need(cfg.rope_interleave, "K2Config.rope_interleave",
         "megatron MLA de-interleaves rope dims (DeepSeek-V3 layout); set True")
    has_moe = cfg.first_k_dense_replace < cfg.num_hidden_layers
    if has_moe:
        k = cfg.num_experts_per_tok
        need(cfg.norm_topk_prob == (k > 1), "K2Config.norm_topk_prob",
             f"megatron's sigmoid router normalises top-k weights exactly when k > 1 (k={k}); "
             f"set norm_topk_prob={k > 1}")
        # Group-limited routing: any grouping K2Config accepts (it checks n_group, topk_group and
        # num_experts_per_tok) trains with HF's scoring through K2TopKRouter.
        need(cfg.n_routed_experts % ep == 0, "ParallelConfig.ep",
             f"ep={ep} must divide n_routed_experts={cfg.n_routed_experts}")
    for name, size in (("vocab_size", cfg.vocab_size), ("num_attention_heads", cfg.num_attention_heads),
                       ("intermediate_size", cfg.intermediate_size),
                       ("moe_intermediate_size", cfg.moe_intermediate_size),
                       ("kv_lora_rank + qk_rope_head_dim", cfg.kv_lora_rank + cfg.qk_rope_head_dim)):
        need(size % tp == 0, f"K2Config.{name}", f"{size} is not divisible by tp={tp}")
    if cfg.q_lora_rank is not None:
        need(cfg.q_lora_rank % tp == 0, "K2Config.q_lora_rank", f"{cfg.q_lora_rank} is not divisible by tp={tp}")


def transformer_config(cfg: K2Config, tp: int = 1, ep: int = 1, dtype: str | None = None,
                       bias_update_rate: float = 1e-3, seq_aux_loss_coeff: float = 0.0,
                       recompute: bool = False) -> MLATransformerConfig:
    """The MLATransformerConfig of `cfg` for a (tp, ep) layout; dtype None = cfg.torch_dtype."""
    check_supported(cfg, tp, ep)
    dtype = dtype or cfg.torch_dtype
    params_dtype = _DTYPES[dtype]
    rs = cfg.rope_scaling or {}
    yarn = rs.get("type") == "yarn"
    has_moe = cfg.first_k_dense_replace < cfg.num_hidden_layers
    moe = {}
    if has_moe:
        moe = dict(
            num_moe_experts=cfg.n_routed_experts,
            moe_layer_freq=[0] * cfg.first_k_dense_replace + [1] * (cfg.num_hidden_layers - cfg.first_k_dense_replace),
            moe_ffn_hidden_size=cfg.moe_intermediate_size,
            moe_shared_expert_intermediate_size=(cfg.moe_intermediate_size * cfg.n_shared_experts
                                                 if cfg.n_shared_experts else None),
            moe_router_topk=cfg.num_experts_per_tok,
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_bias_update_rate=bias_update_rate,
            moe_router_num_groups=cfg.n_group if grouping_active(cfg) else None,
            moe_router_group_topk=cfg.topk_group if grouping_active(cfg) else None,
            moe_router_topk_scaling_factor=cfg.routed_scaling_factor,
            moe_router_load_balancing_type="seq_aux_loss" if seq_aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=seq_aux_loss_coeff,
            moe_router_dtype="fp32",
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
        )
    return MLATransformerConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_head_dim=cfg.qk_nope_head_dim,
        qk_pos_emb_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        rope_type="yarn" if yarn else "rope",
        rotary_base=cfg.rope_theta,
        rotary_scaling_factor=float(rs.get("factor", 1.0)) if yarn else 1.0,
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings", cfg.max_position_embeddings)),
        beta_fast=float(rs.get("beta_fast") or 32), beta_slow=float(rs.get("beta_slow") or 1),
        mscale=float(rs.get("mscale") or 1.0), mscale_all_dim=float(rs.get("mscale_all_dim") or 0.0),
        normalization="RMSNorm", layernorm_epsilon=cfg.rms_norm_eps, qk_layernorm=True,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=cfg.initializer_range,
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
        # MoE with TP > 1 needs sequence parallel in megatron (docs/FACTS.md).
        sequence_parallel=tp > 1,
        params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        calculate_per_token_loss=True,
        use_cpu_initialization=not torch.cuda.is_available(),
        # Must stay True: megatron 0.16.1 sets the tensor_model_parallel / partition_dim attributes of
        # TP weights only inside its init functions; without them grad norms and Muon see no TP shards.
        perform_initialization=True,
        bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
        **moe,
    )


def k2_group_limited_routing(logits: torch.Tensor, topk: int, num_groups: int, group_topk: int,
                             scaling_factor: float | None, expert_bias: torch.Tensor | None):
    """(routing_probs [T, E], routing_map [T, E] bool) of the sigmoid router with HF's group scoring.

    Same contract as megatron's topk_routing_with_score_function(score_function="sigmoid"): the
    bias steers selection only, probabilities are the unbiased scores of the chosen experts,
    normalised when topk > 1, times scaling_factor. Selection and weights are the one K2 router
    (k2sys.models.route_topk) in fp32, as HF computes them; the probabilities come back in logits' dtype."""
    probs, ids = route_topk(logits, expert_bias, topk, num_groups, group_topk, scaling_factor or 1.0, topk > 1)
    routing_probs = torch.zeros_like(logits).scatter(1, ids, probs.type_as(logits))
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, ids, True)
    return routing_probs, routing_map


class K2TopKRouter(TopKRouter):
    """megatron's TopKRouter with DeepSeek-V3's group scoring (top-2 per group, not top-(k / group_topk)).

    Parameters, buffers (weight, expert_bias) and state-dict keys are megatron's; the z-loss, aux
    losses and the expert-bias token counts are megatron's own methods. Only the top-k selection of
    group-limited routing differs; without active grouping this is megatron's routing unchanged.
    """

    def __init__(self, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        groups, keep = config.moe_router_num_groups, config.moe_router_group_topk
        self.hf_groups = bool(groups and keep and keep < groups)
        if self.hf_groups:
            unsupported = [
                (config.moe_router_score_function != "sigmoid", "moe_router_score_function must be 'sigmoid'"),
                (self.routing_type == "sinkhorn", "sinkhorn load balancing"),
                (config.moe_router_fusion, "moe_router_fusion (TE's fused router scores groups megatron's way)"),
                (config.moe_enable_routing_replay, "moe_enable_routing_replay"),
            ]
            msgs = [m for bad, m in unsupported if bad]
            if msgs:
                raise ValueError("K2TopKRouter: group-limited routing with " + "; ".join(msgs) + " is not supported")

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        if not self.hf_groups:
            return super().routing(logits, padding_mask=padding_mask)
        # megatron 0.16's TopKRouter.routing with the top-k step replaced.
        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.config.num_moe_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)
        probs, routing_map = k2_group_limited_routing(
            logits, self.topk, self.config.moe_router_num_groups, self.config.moe_router_group_topk,
            self.config.moe_router_topk_scaling_factor, self.expert_bias)
        if self.config.moe_expert_capacity_factor is not None:
            probs, routing_map = apply_router_token_dropping(
                probs, routing_map, router_topk=self.topk, capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity)
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            aux_map, aux_scores = compute_routing_scores_for_aux_loss(
                logits, self.topk, self.score_function, fused=False, padding_mask=padding_mask)
            masked = padding_mask is not None
            probs = self._apply_aux_loss(probs, aux_scores, aux_map, with_padding_mask=masked)
            probs = self._apply_seq_aux_loss(probs, aux_scores, aux_map, seq_length, bsz, with_padding_mask=masked)
            probs = self._apply_global_aux_loss(probs, aux_scores, aux_map, with_padding_mask=masked)
        self._apply_expert_bias(routing_map, padding_mask=padding_mask)
        return probs, routing_map


class K2RMSNorm(torch.nn.Module):
    """RMSNorm computed in fp32 as DeepSeek-V3 does; works under sequence parallel.

    Under sequence parallel each TP rank normalises its own tokens, so the weight gradient is
    partial: `sequence_parallel=True` on the weight makes finalize_model_grads all-reduce it over TP.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_ignored):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(dtype)


class K2LatentRMSNorm(K2RMSNorm):
    """MLA's q_a/kv_a layernorm: HF uses eps 1e-6 whatever rms_norm_eps is."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_ignored):
        super().__init__(config, hidden_size, LATENT_NORM_EPS)


class K2CoreAttention(MegatronModule):
    """Softmax attention for MLA (q/k head dim != v head dim) with causal and packed-sequence masks.

    query/key [s, b, h, dq], value [s, b, h, dv] -> [s, b, h * dv]; with packed_seq_params
    (qkv_format 'thd') [t, h, d] -> [t, h * dv], and a token attends only to earlier tokens
    of its own sequence (cu_seqlens_q boundaries).
    """

    def __init__(self, config, layer_number: int, attn_mask_type=AttnMaskType.causal, attention_type: str = "self",
                 attention_dropout=None, softmax_scale=None, k_channels=None, v_channels=None,
                 cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("K2CoreAttention: context parallelism is not supported; set context_parallel_size=1")
        self.softmax_scale = softmax_scale if softmax_scale is not None else (k_channels or config.kv_channels) ** -0.5
        self.attn_mask_type = attn_mask_type

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("K2CoreAttention: attention_bias is not supported")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._packed(query, key, value, packed_seq_params.cu_seqlens_q)
        s, b = query.shape[:2]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d]
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            # megatron convention: True = masked out.
            causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal & ~attention_mask.bool(),
                                                 scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


    def _packed(self, query, key, value, cu):
        """[t, h, d] packs: causal attention inside each sequence. Sequences of equal length are
        stacked and run as one batch, so the cost is sum(len^2), not t^2 (a dense t x t mask over
        a 64x64 SFT batch is ~4096^2 per head and made a tiny step take seconds)."""
        t = query.shape[0]
        lens = (cu[1:] - cu[:-1]).long()
        if int(lens.sum()) != t:
            raise ValueError(f"K2CoreAttention: cu_seqlens cover {int(lens.sum())} tokens, the pack has {t}")
        sizes = lens.tolist()
        parts = [x.split(sizes) for x in (query, key, value)]  # views; backward is one cat
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(sizes):
            groups.setdefault(n, []).append(i)
        outs: list = [None] * len(sizes)
        for members in groups.values():
            q, k, v = (torch.stack([p[i] for i in members]).transpose(1, 2) for p in parts)  # [n, h, L, d]
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
            for i, oi in zip(members, o.transpose(1, 2).unbind(0)):  # unbind: backward is one stack
                outs[i] = oi
        return torch.cat(outs).reshape(t, -1)


class K2ReplicatedLinear(torch.nn.Module):
    """Every TP rank holds the whole weight and projects its own (sequence-parallel) tokens.

    `sequence_parallel=True` on the weight makes finalize_model_grads all-reduce its gradient over TP.
    """

    def __init__(self, input_size: int, output_size: int, config):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))
        with torch.no_grad():
            config.init_method(self.weight)
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor):
        return F.linear(x, self.weight), None


class K2MLASelfAttention(MLASelfAttention):
    """MLASelfAttention whose q/kv down-projections are replicated over TP (as in megatron's TE spec).

    With megatron's local spec they are ColumnParallelLinear: the output is all-gathered over TP and
    split, and the backward of that gather keeps only this rank's slice, so the shared rope key
    k_pos_emb (used by every rank's heads) gets only this rank's heads' gradient (measured: TP=2
    grads off by ~1e-4 relative). Replicated down-projections on sequence-parallel tokens take
    megatron's other branch, whose gather_from_sequence_parallel_region sums k_pos_emb's gradient.
    """

    def __init__(self, config, submodules, layer_number, attn_mask_type=AttnMaskType.padding,
                 cp_comm_type=None, pg_collection=None):
        super().__init__(config, submodules, layer_number, attn_mask_type, cp_comm_type, pg_collection)
        if config.tensor_model_parallel_size > 1 and not config.sequence_parallel:
            raise ValueError("K2MLASelfAttention: tensor parallelism needs sequence_parallel=True")
        if config.q_lora_rank is not None:
            self.linear_q_down_proj = K2ReplicatedLinear(config.hidden_size, config.q_lora_rank, config)
        self.linear_kv_down_proj = K2ReplicatedLinear(
            config.hidden_size, config.kv_lora_rank + config.qk_pos_emb_head_dim, config)


def _localize(layer_spec: ModuleSpec) -> ModuleSpec:
    """Swap our core attention and norms into a megatron local layer spec (in place)."""
    sub = layer_spec.submodules
    sub.input_layernorm = K2RMSNorm
    sub.pre_mlp_layernorm = K2RMSNorm
    attn = sub.self_attention
    assert attn.module is MLASelfAttention, "expected an MLA layer spec"
    attn.module = K2MLASelfAttention
    attn.submodules.core_attention = K2CoreAttention
    attn.submodules.q_layernorm = K2LatentRMSNorm
    attn.submodules.kv_layernorm = K2LatentRMSNorm
    return layer_spec


def _use_k2_router(layer_spec: ModuleSpec) -> None:
    """Route every MoE layer with K2TopKRouter (HF's group scoring) in place; dense layers are left."""
    sub = getattr(layer_spec.submodules.mlp, "submodules", None)
    if sub is not None and hasattr(sub, "router"):
        sub.router = K2TopKRouter


def _fuse_experts(layer_spec: ModuleSpec) -> None:
    """Swap megatron's SequentialMLP for K2FusedExperts (same params, Triton forward) in place."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    from k2sys.trainer.fused_experts import K2FusedExperts

    mlp = layer_spec.submodules.mlp
    experts = getattr(getattr(mlp, "submodules", None), "experts", None)
    if experts is None:
        return  # a dense layer
    if experts.module is not SequentialMLP:
        raise ValueError(f"moe_kernels: expected megatron's SequentialMLP experts, got {experts.module.__name__}; "
                         "set moe_kernels=megatron")
    experts.module = K2FusedExperts


def block_spec(config: MLATransformerConfig, use_te: bool | None = None, fused_experts: bool = False):
    """The decoder block spec: TE's when `use_te` (default: TE importable with CUDA), else local + ours;
    every MoE layer routed by K2TopKRouter; routed experts on the Triton kernels when `fused_experts`
    (K2FusedExperts)."""
    if use_te is None:
        use_te = te_available()
    import copy

    spec = copy.deepcopy(get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm"))
    seen: set[int] = set()
    for layer in spec.layer_specs:
        if id(layer) not in seen:
            seen.add(id(layer))
            _use_k2_router(layer)
            if not use_te:
                _localize(layer)
            if fused_experts:
                _fuse_experts(layer)
    if not use_te:
        spec.layer_norm = K2RMSNorm
    return spec


def build_gpt_model(cfg: K2Config, config: MLATransformerConfig, use_te: bool | None = None,
                    fused_experts: bool = False) -> GPTModel:
    """An uninitialised GPTModel for `cfg` on this rank (load weights with convert.load_hf_into).
    `fused_experts`: routed experts run k2sys' Triton kernels (see k2sys.trainer.fused_experts)."""
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, use_te, fused_experts),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
    )
    if torch.cuda.is_available():
        model = model.cuda()
    if fused_experts:  # after .cuda(), which gives every param its own storage
        from k2sys.trainer.fused_experts import consolidate_expert_weights

        consolidate_expert_weights(model)
    return model
