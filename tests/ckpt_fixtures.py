"""Shared helpers of the checkpoint-engine tests: a tiny K2-shaped config, a random HF state
dict, a Megatron-like trainer layout, and a torch-only reference that materializes a layout."""

from __future__ import annotations

import socket

import torch

from k2sys.ckpt import Box, LayoutBuilder, hf_param_shapes, split_range

TINY = dict(hidden_size=32, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, moe_intermediate_size=8, intermediate_size=24,
            first_k_dense_replace=1, num_hidden_layers=2, n_shared_experts=1, vocab_size=64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_hf_state(config, seed: int = 0, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in hf_param_shapes(config).items()}


def megatron_like_layout(config, tp: int, rank: int, dtype=torch.bfloat16):
    """A trainer-style layout written for the tests: TP on attention/dense MLP with Megatron's
    fused fc1 (gate shard | up shard), experts placed by expert parallelism (EP = tp, whole
    experts per rank, fused fc1 per expert), everything else replicated. Local names differ
    from HF on purpose so the planner must go through the global names."""
    shapes = hf_param_shapes(config)
    b = LayoutBuilder(f"megatron-like tp{tp} rank{rank}", dtype)
    E = config["n_routed_experts"]
    e0, ne = split_range(E, tp, rank, "n_routed_experts")
    for g, shape in shapes.items():
        local = "trainer." + g
        if ".mlp.experts." in g:
            layer, rest = g.split(".mlp.experts.", 1)
            e = int(rest.split(".")[0])
            if not e0 <= e < e0 + ne:
                continue
            q = f"trainer.{layer}.local_experts.{e - e0}."
            Im, H = shapes[f"{layer}.mlp.experts.{e}.gate_proj.weight"]
            if rest.endswith("gate_proj.weight"):
                b.tensor(q + "linear_fc1", (2 * Im, H))
                b.piece(g, shape, Box.full(shape), q + "linear_fc1", Box((0, 0), (Im, H)))
            elif rest.endswith("up_proj.weight"):
                b.piece(g, shape, Box.full(shape), q + "linear_fc1", Box((Im, 0), (Im, H)))
            else:
                b.full(g, shape, q + "linear_fc2")
        elif g.endswith("mlp.gate_proj.weight") or g.endswith("shared_experts.gate_proj.weight"):
            prefix = g.rsplit(".", 2)[0]
            start, size = split_range(shape[0], tp, rank, g)
            fc1 = f"trainer.{prefix}.linear_fc1"
            b.tensor(fc1, (2 * size, shape[1]))
            b.piece(g, shape, Box((start, 0), (size, shape[1])), fc1, Box((0, 0), (size, shape[1])))
            up = prefix + ".up_proj.weight"
            b.piece(up, shape, Box((start, 0), (size, shape[1])), fc1, Box((size, 0), (size, shape[1])))
        elif g.endswith("up_proj.weight"):
            continue  # placed with its gate_proj
        elif g.endswith(("q_b_proj.weight", "kv_b_proj.weight", "embed_tokens.weight", "lm_head.weight")):
            b.split(g, shape, 0, tp, rank, local)
        elif g.endswith(("o_proj.weight", "down_proj.weight")):
            b.split(g, shape, 1, tp, rank, local)
        else:
            b.full(g, shape, local)
    return b.build()


def materialize(layout, global_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference (plain torch slicing): the local tensors of `layout` filled from global tensors."""
    out = {n: torch.full(s.shape, float("nan")).to(s.dtype) for n, s in layout.tensors.items()}
    for p in layout.pieces:
        src = p.global_box.view(global_tensors[p.global_name])
        p.local_box.view(out[p.local_name]).copy_(src.reshape(p.local_box.sizes))
    return out
