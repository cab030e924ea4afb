"""The K2 (DeepSeek-V3) MoE math in torch: the router and the routed experts, defined once.

Every torch-level user calls these: the reference model (`reference.MoE`), the native engine's
torch routing and its per-expert path (FP8 off CUDA, moe_impl="loop"), the trainer's group-limited
router (`k2sys.trainer.spec`) and the torch references of the Triton kernels (`k2sys.kernels`:
`k2_router_topk_torch`, `fused_moe_torch`, `grouped_experts_torch`). The independent checks are
transformers' DeepseekV3TopkRouter / DeepseekV3MoE in the tests.

Router (noaux_tc, HF `DeepseekV3TopkRouter`):
  scores  = sigmoid(logits)                                  [T, E] fp32
  choice  = scores + e_score_correction_bias                 selection only, never the weights
  groups  = E / n_group experts each, ranked by the sum of their top-2 `choice` values;
            the best `topk_group` groups stay, the rest are masked to -inf
  ids     = the top_k experts by `choice` among the kept groups
  weights = scores[ids] (unbiased), / (sum + 1e-20) if norm_topk_prob, * routed_scaling_factor
Ties go to the lower index (groups and experts) and ids come out in descending `choice`, as in the
Triton kernel (torch's topk leaves the order of ties unspecified).

Routed experts: out[t] = sum_j weights[t, j] * down[e] (silu(gate[e] x[t]) * up[e] x[t]), e = ids[t, j].

Shapes: T tokens, E experts, k = top_k, D hidden, I expert width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["moe_experts", "route_topk"]

# An expert projection: a weight [out, in] (HF layout) or a callable [*, in] -> [*, out].
Projection = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


def route_topk(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int = 1, topk_group: int = 1,
               routed_scaling_factor: float = 1.0, norm_topk_prob: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """K2 router: logits [T, E] -> (weights [T, top_k] fp32, ids [T, top_k] int64).

    Differentiable in logits through the weights. Arguments are trusted (K2Config validated them);
    `k2sys.kernels.k2_router_topk_torch` is the checked entry with the kernel's contract."""
    T, E = logits.shape
    scores = logits.float().sigmoid()
    choice = scores.detach() if bias is None else scores.detach() + bias.float()
    if n_group > 1 and topk_group < n_group:
        per_group = E // n_group
        group_scores = choice.view(T, n_group, per_group).topk(2, dim=-1).values.sum(dim=-1)
        kept = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        choice = choice.masked_fill(~keep.repeat_interleave(per_group, dim=1), float("-inf"))
    ids = _topk_lower_index_first(choice, top_k)
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids


def _topk_lower_index_first(choice: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest per row in descending order, ties to the lower index: what a stable
    descending sort gives, at about the cost of a topk (a full sort of [T, E] is ~4x slower on CPU;
    this runs in every MoE layer of the engine's torch path)."""
    vals, idx = choice.topk(min(k + 1, choice.shape[-1]), dim=-1)
    if not bool((vals[:, 1:] == vals[:, :-1]).any()):  # no tie among the k+1 best: topk's order is the answer
        return idx[:, :k]
    kth = vals[:, k - 1:k]
    above = choice > kth
    tie = choice == kth
    need = k - above.sum(dim=-1, keepdim=True)  # how many of the tied values make the cut
    chosen = above | (tie & (tie.cumsum(dim=-1) <= need))
    ids = chosen.nonzero()[:, 1].view(-1, k)  # ascending index within each row
    return ids.gather(1, torch.sort(choice.gather(1, ids), dim=-1, descending=True, stable=True).indices)


def _project(p: Projection, a: torch.Tensor) -> torch.Tensor:
    return p(a) if callable(p) else F.linear(a, p)


def moe_experts(x: torch.Tensor, gate_up: torch.Tensor | Sequence[Projection], down: torch.Tensor | Sequence[Projection],
                weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The routed experts, one GEMM pair per expert that has rows: x [T, D] -> [T, D] in x's dtype.

    gate_up[e]: [2I, D] (gate rows, then up rows) or a callable [*, D] -> [*, 2I]; down[e]: [D, I]
    or a callable [*, I] -> [*, D] (stacked [E, 2I, D] / [E, D, I] tensors index the same way).
    weights/ids [T, k]; an id < 0 (an expert not on this rank) contributes nothing. Each token's
    weighted sum is accumulated in fp32 and in expert order; differentiable in x, weights and the
    expert weights."""
    k, E = ids.shape[1], len(gate_up)
    flat = ids.reshape(-1).long()
    key = torch.where(flat >= 0, flat, E)  # non-local pairs sort last and are dropped
    counts = torch.bincount(key, minlength=E + 1)[:E].tolist()
    order = torch.sort(key, stable=True).indices[:sum(counts)]  # by expert, then by token
    tok = order // k
    xs = x.index_select(0, tok)
    ys, start = [], 0
    for e, n in enumerate(counts):
        if n:
            g, u = _project(gate_up[e], xs[start:start + n]).chunk(2, dim=-1)
            ys.append(_project(down[e], F.silu(g) * u))
            start += n
    if not ys:
        return torch.zeros_like(x)
    y = torch.cat(ys).float() * weights.reshape(-1).index_select(0, order)[:, None].float()
    return x.new_zeros(x.shape, dtype=torch.float32).index_add(0, tok, y).to(x.dtype)
