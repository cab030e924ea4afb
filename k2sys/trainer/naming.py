"""Megatron <-> HF naming and sharding: ONE table, from which every conversion is derived.

`RULES` says, for each HF DeepseekV3 tensor, which Megatron GPTModel tensor holds it and how it is
split over tensor parallel ranks. `megatron_layout()` turns the table into the checkpoint engine's
generic `Layout` (k2sys.ckpt.layout: Pieces mapping boxes of global HF tensors to boxes of local
Megatron tensors) for one (tp_rank, ep_rank); `hf_to_megatron` and `megatron_to_hf` are nothing
but copies along those pieces, so the offline converter, the trainer's load/export and the
reshard planner cannot disagree. Copies only: a round trip is bitwise exact.

Split kinds (the TP group is the expert-TP group for routed experts; megatron's default etp = tp):
  REPL  every rank holds the whole tensor (norms, router, MLA's q/kv down-projections, which
        spec.K2MLASelfAttention replicates as megatron's TE spec does)
  COL   dim 0 (output rows) split into tp equal blocks: ColumnParallelLinear, vocab-parallel
        embedding / output layer
  ROW   dim 1 (input columns) split: RowParallelLinear (o_proj, down_proj)
A fused local tensor (linear_fc1 = [gate_shard; up_shard]) has one rule per part: `part=(k, n)`
puts the COL shard of the HF tensor at rows [k * rows/n, (k+1) * rows/n) of the local tensor.
Routed expert e lives on EP rank e // (E / ep) as local_experts.{e % (E / ep)}.

`te=` gives the Transformer Engine spec's name/split where it differs from the local spec (its
layer norms are fused into the following linear as `layer_norm_weight`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping

import torch

from k2sys.ckpt.layout import Layout, LayoutBuilder, cfg as _field, hf_param_shapes, split_range
from k2sys.ckpt.types import Box


class Split(Enum):
    REPL = "repl"
    COL = "col"
    ROW = "row"


@dataclass(frozen=True)
class Rule:
    hf: str
    """HF name relative to the scope ({i} = layer, {e} = expert are filled in by the scope)."""
    mg: str
    split: Split
    part: tuple[int, int] = (0, 1)
    te: tuple[str, Split] | None = None


R, C, W = Split.REPL, Split.COL, Split.ROW
# scope -> (HF prefix, Megatron prefix, rules)
RULES: dict[str, tuple[str, str, tuple[Rule, ...]]] = {
    "model": ("", "", (
        Rule("model.embed_tokens.weight", "embedding.word_embeddings.weight", C),
        Rule("model.norm.weight", "decoder.final_layernorm.weight", R),
        Rule("lm_head.weight", "output_layer.weight", C),  # absent when tie_word_embeddings
    )),
    "attention": ("model.layers.{i}.", "decoder.layers.{i}.", (
        Rule("input_layernorm.weight", "input_layernorm.weight", R),
        Rule("self_attn.q_proj.weight", "self_attention.linear_q_proj.weight", C),  # q_lora_rank None
        Rule("self_attn.q_a_proj.weight", "self_attention.linear_q_down_proj.weight", R),
        Rule("self_attn.q_a_layernorm.weight", "self_attention.q_layernorm.weight", R,
             te=("self_attention.linear_q_up_proj.layer_norm_weight", R)),
        Rule("self_attn.q_b_proj.weight", "self_attention.linear_q_up_proj.weight", C),
        Rule("self_attn.kv_a_proj_with_mqa.weight", "self_attention.linear_kv_down_proj.weight", R),
        Rule("self_attn.kv_a_layernorm.weight", "self_attention.kv_layernorm.weight", R,
             te=("self_attention.linear_kv_up_proj.layer_norm_weight", R)),
        Rule("self_attn.kv_b_proj.weight", "self_attention.linear_kv_up_proj.weight", C),
        Rule("self_attn.o_proj.weight", "self_attention.linear_proj.weight", W),
    )),
    "dense_mlp": ("model.layers.{i}.", "decoder.layers.{i}.", (
        Rule("post_attention_layernorm.weight", "pre_mlp_layernorm.weight", R,
             te=("mlp.linear_fc1.layer_norm_weight", R)),
        Rule("mlp.gate_proj.weight", "mlp.linear_fc1.weight", C, (0, 2)),
        Rule("mlp.up_proj.weight", "mlp.linear_fc1.weight", C, (1, 2)),
        Rule("mlp.down_proj.weight", "mlp.linear_fc2.weight", W),
    )),
    "moe": ("model.layers.{i}.", "decoder.layers.{i}.", (
        Rule("post_attention_layernorm.weight", "pre_mlp_layernorm.weight", R),
        Rule("mlp.gate.weight", "mlp.router.weight", R),
        Rule("mlp.gate.e_score_correction_bias", "mlp.router.expert_bias", R),
        Rule("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.linear_fc1.weight", C, (0, 2)),
        Rule("mlp.shared_experts.up_proj.weight", "mlp.shared_experts.linear_fc1.weight", C, (1, 2)),
        Rule("mlp.shared_experts.down_proj.weight", "mlp.shared_experts.linear_fc2.weight", W),
    )),
    "expert": ("model.layers.{i}.mlp.experts.{e}.", "decoder.layers.{i}.mlp.experts.local_experts.{le}.", (
        Rule("gate_proj.weight", "linear_fc1.weight", C, (0, 2)),
        Rule("up_proj.weight", "linear_fc1.weight", C, (1, 2)),
        Rule("down_proj.weight", "linear_fc2.weight", W),
    )),
}
# Kept in fp32 whatever the params dtype (megatron keeps expert_bias fp32; routing is precision-sensitive).
FP32_LOCAL_SUFFIXES = ("mlp.router.expert_bias",)


def _expanded(config: Any):
    """Yield (scope, fmt dict, rule) for every (layer, expert) of the model."""
    L = _field(config, "num_hidden_layers")
    E = _field(config, "n_routed_experts", 0) or 0
    first = _field(config, "first_k_dense_replace", 0)
    for rule in RULES["model"][2]:
        yield "model", {}, rule
    for i in range(L):
        for rule in RULES["attention"][2]:
            yield "attention", {"i": i}, rule
        if E and i >= first:
            for rule in RULES["moe"][2]:
                yield "moe", {"i": i}, rule
            for e in range(E):
                for rule in RULES["expert"][2]:
                    yield "expert", {"i": i, "e": e}, rule
        else:
            for rule in RULES["dense_mlp"][2]:
                yield "dense_mlp", {"i": i}, rule


def megatron_layout(config: Any, tp_size: int, ep_size: int, tp_rank: int, ep_rank: int,
                    dtype: torch.dtype = torch.float32, te: bool = False) -> Layout:
    """The Layout of one Megatron rank (tp_rank, ep_rank) of GPTModel, local spec (or TE spec)."""
    shapes = hf_param_shapes(config)
    E = _field(config, "n_routed_experts", 0) or 0
    if E:
        split_range(E, ep_size, ep_rank, "n_routed_experts over expert-parallel ranks")
    per_ep = E // ep_size if E else 0
    b = LayoutBuilder(f"megatron tp{tp_size}/{tp_rank} ep{ep_size}/{ep_rank}{' te' if te else ''}", dtype)
    fused: dict[str, tuple[int, ...]] = {}
    for scope, fmt, rule in _expanded(config):
        hf_pre, mg_pre, _ = RULES[scope]
        gname = hf_pre.format(**fmt) + rule.hf
        if gname not in shapes:  # lm_head when tied, q_proj vs q_a/q_b, no shared expert
            continue
        if scope == "expert":
            e = fmt["e"]
            if e // per_ep != ep_rank:
                continue
            fmt = {**fmt, "le": e % per_ep}
        mg_name, split = (rule.te if (te and rule.te) else (rule.mg, rule.split))
        lname = mg_pre.format(**fmt) + mg_name
        gshape = shapes[gname]
        ldtype = torch.float32 if lname.endswith(FP32_LOCAL_SUFFIXES) else dtype
        if split is Split.REPL:
            b.full(gname, gshape, lname, dtype=ldtype)
            continue
        dim = 0 if split is Split.COL else 1
        k, n = rule.part
        if n == 1:
            b.split(gname, gshape, dim, tp_size, tp_rank, lname)
            continue
        _, size = split_range(gshape[0], tp_size, tp_rank, f"{gname} dim 0")
        lshape = (size * n, gshape[1])
        if lname not in fused:
            fused[lname] = lshape
            b.tensor(lname, lshape, ldtype)
        b.split(gname, gshape, 0, tp_size, tp_rank, lname, (k * size, 0), lshape)
    return b.build()


def _copy(dst: torch.Tensor, dst_box: Box, src: torch.Tensor, src_box: Box) -> None:
    d, s = dst_box.view(dst), src_box.view(src)
    d.copy_(s.reshape(d.shape))


def read_piece(hf_state: Mapping[str, torch.Tensor], p, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The global box of piece `p` from a full HF state dict, or read as a slice from a checkpoint on disk
    (k2sys.models.checkpoint.HFCheckpoint: only the box's bytes are read, FP8 dequantized exactly)."""
    read = getattr(hf_state, "read", None)
    if read is not None:
        if tuple(hf_state.shape(p.global_name)) != p.global_shape:
            raise ValueError(f"hf_to_megatron: {p.global_name} has shape {tuple(hf_state.shape(p.global_name))}, "
                             f"the config says {p.global_shape}")
        # FP8 weights are dequantized straight to the destination dtype (no detour through bf16)
        return read(p.global_name, p.global_box.offsets, p.global_box.sizes, dtype=dtype)
    src = hf_state[p.global_name]
    if tuple(src.shape) != p.global_shape:
        raise ValueError(f"hf_to_megatron: {p.global_name} has shape {tuple(src.shape)}, the config says "
                         f"{p.global_shape}")
    return p.global_box.view(src)


def load_hf_into(local: Mapping[str, torch.Tensor], hf_state: Mapping[str, torch.Tensor], config: Any,
                 tp_size: int = 1, ep_size: int = 1, tp_rank: int = 0, ep_rank: int = 0, te: bool = False) -> None:
    """Copy this rank's pieces of `hf_state` straight into the local tensors `local` (e.g. a model's
    parameters): one piece in flight at a time, so loading needs no second copy of the rank's share."""
    layout = megatron_layout(config, tp_size, ep_size, tp_rank, ep_rank, torch.float32, te)
    missing = sorted(set(layout.global_shapes()) - set(hf_state))
    if missing:
        raise KeyError(f"hf_to_megatron: the HF state lacks {missing[:5]}{'...' if len(missing) > 5 else ''}")
    for name, spec in layout.tensors.items():
        if name not in local:
            raise KeyError(f"hf_to_megatron: no local tensor {name} to load into")
        if tuple(local[name].shape) != tuple(spec.shape):
            raise ValueError(f"hf_to_megatron: {name} is {tuple(local[name].shape)} locally, the layout says "
                             f"{tuple(spec.shape)}")
    with torch.no_grad():
        for p in layout.pieces:
            d = p.local_box.view(local[p.local_name])
            src = read_piece(hf_state, p, d.dtype)
            d.copy_(src.reshape(d.shape))


def hf_to_megatron(hf_state: Mapping[str, torch.Tensor], config: Any, tp_size: int = 1, ep_size: int = 1,
                   tp_rank: int = 0, ep_rank: int = 0, te: bool = False,
                   dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The local Megatron state dict of rank (tp_rank, ep_rank) from a full HF state dict (or an
    HFCheckpoint, read slice by slice). dtype None: the state's dtype."""
    if dtype is None:
        first = next(iter(hf_state))
        dtype = hf_state.out_dtype(first) if hasattr(hf_state, "out_dtype") else hf_state[first].dtype
    layout = megatron_layout(config, tp_size, ep_size, tp_rank, ep_rank, dtype, te)
    out = {name: torch.empty(spec.shape, dtype=spec.dtype) for name, spec in layout.tensors.items()}
    load_hf_into(out, hf_state, config, tp_size, ep_size, tp_rank, ep_rank, te)
    return out


def megatron_to_hf(shards: Mapping[tuple[int, int], Mapping[str, torch.Tensor]], config: Any, tp_size: int = 1,
                   ep_size: int = 1, te: bool = False, check_replicas: bool = True) -> dict[str, torch.Tensor]:
    """A full HF state dict from the local state dicts of every (tp_rank, ep_rank).

    Replicated tensors are read from the first rank holding them; with check_replicas the other
    copies must be bitwise equal (a diverged replica means a broken checkpoint, not a choice).
    """
    need = {(t, e) for t in range(tp_size) for e in range(ep_size)}
    if set(shards) != need:
        raise KeyError(f"megatron_to_hf: need shards for every (tp_rank, ep_rank) in {sorted(need)}, "
                       f"got {sorted(shards)}")
    out: dict[str, torch.Tensor] = {}
    written: set[tuple[str, Box]] = set()
    for (t, e) in sorted(shards):
        local = shards[(t, e)]
        layout = megatron_layout(config, tp_size, ep_size, t, e, torch.float32, te)
        for p in layout.pieces:
            if p.local_name not in local:
                raise KeyError(f"megatron_to_hf: rank tp{t}/ep{e} lacks {p.local_name}")
            src = local[p.local_name]
            if p.global_name not in out:
                out[p.global_name] = torch.empty(p.global_shape, dtype=src.dtype)
            key = (p.global_name, p.global_box)
            if key in written:
                if check_replicas and not torch.equal(p.global_box.view(out[p.global_name]),
                                                      p.local_box.view(src).reshape(p.global_box.sizes)):
                    raise ValueError(f"megatron_to_hf: replicas of {p.global_name} differ between ranks "
                                     f"(rank tp{t}/ep{e}); the checkpoint is inconsistent")
                continue
            written.add(key)
            _copy(out[p.global_name], p.global_box, src, p.local_box)
    return out


def local_names(config: Any, tp_size: int = 1, ep_size: int = 1, tp_rank: int = 0, ep_rank: int = 0,
                te: bool = False) -> list[str]:
    return list(megatron_layout(config, tp_size, ep_size, tp_rank, ep_rank, torch.float32, te).tensors)
