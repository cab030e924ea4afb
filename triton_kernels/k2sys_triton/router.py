"""Kimi-K2 / DeepSeek-V3 router top-k as a Triton kernel.

Semantics are those of HF transformers' `DeepseekV3TopkRouter`. Their torch definition is
`k2sys.models.moe.route_topk`, which `k2sys.kernels.k2_router_topk_torch` wraps with this
kernel's argument checks and id dtype (this package imports nothing from k2sys):
  scores  = sigmoid(logits)                                  [T, E] fp32
  choice  = scores + e_score_correction_bias                 selection only, never the weights
  groups  = E / n_group experts each, ranked by the sum of their top-2 `choice` values;
            the best `topk_group` groups stay, the rest are masked to -inf
  ids     = the top_k experts by `choice` among the kept groups
  weights = scores[ids] (unbiased), / (sum + 1e-20) if norm_topk_prob, * routed_scaling_factor

Ties are broken towards the lower index (groups and experts) in both the kernel and the
reference, and ids come out in descending order of `choice`; HF's `topk(sorted=False)` leaves
both unspecified, so comparisons with HF are per token as sets.

Kernel layout: one program per token; the E experts are viewed as a [n_group, E/n_group]
tile so group scores are row reductions and no reshape is needed.
"""

from __future__ import annotations

import torch

from ._interp import check_launchable, next_pow2, tl, triton
from .launch import launch

__all__ = ["k2_router_topk", "check_router_args"]


@triton.jit
def _router_topk_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    stride_lt,
    routed_scaling,
    TOP_K: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    EPG: tl.constexpr,  # experts per group
    BLOCK_G: tl.constexpr,
    BLOCK_EPG: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    g1 = tl.arange(0, BLOCK_G)
    g = g1[:, None]
    j = tl.arange(0, BLOCK_EPG)[None, :]
    valid = (g < N_GROUP) & (j < EPG)
    # Flat expert index of each tile element. Padding slots (j >= EPG, when EPG is not a power of
    # two) would alias the next group's first experts (g * EPG + j), so they get an index past
    # every real expert: a lookup by index (the weight below) must never see them.
    e = tl.where(valid, g * EPG + j, BLOCK_G * BLOCK_EPG + g * BLOCK_EPG + j)
    logit = tl.load(logits_ptr + t * stride_lt + e, mask=valid, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + e, mask=valid, other=0.0).to(tl.float32)
    score = tl.where(valid, tl.sigmoid(logit), 0.0)
    choice = tl.where(valid, score + bias, float("-inf"))

    if N_GROUP > 1:
        # Group score = sum of the group's two best biased scores (duplicates count twice).
        top1 = tl.max(choice, axis=1)
        first = tl.min(tl.where(choice == top1[:, None], j, BLOCK_EPG), axis=1)
        top2 = tl.max(tl.where(j == first[:, None], float("-inf"), choice), axis=1)
        gscore = tl.where(g1 < N_GROUP, top1 + top2, float("-inf"))
        keep = g1 < 0
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(gscore, axis=0)
            gi = tl.min(tl.where(gscore == best, g1, BLOCK_G), axis=0)
            keep = keep | (g1 == gi)
            gscore = tl.where(g1 == gi, float("-inf"), gscore)
        choice = tl.where(keep[:, None], choice, float("-inf"))

    kk = tl.arange(0, BLOCK_K)
    w_out = tl.zeros([BLOCK_K], dtype=tl.float32)
    id_out = tl.zeros([BLOCK_K], dtype=tl.int32)
    big = 2 * BLOCK_G * BLOCK_EPG
    for i in tl.static_range(TOP_K):
        best = tl.max(tl.max(choice, axis=1), axis=0)
        idx = tl.min(tl.min(tl.where(choice == best, e, big), axis=1), axis=0)
        w = tl.sum(tl.sum(tl.where(e == idx, score, 0.0), axis=1), axis=0)
        w_out = tl.where(kk == i, w, w_out)
        id_out = tl.where(kk == i, idx.to(tl.int32), id_out)
        choice = tl.where(e == idx, float("-inf"), choice)

    if NORM:
        w_out = w_out / (tl.sum(w_out, axis=0) + 1e-20)
    w_out = w_out * routed_scaling
    kmask = kk < TOP_K
    tl.store(weights_ptr + t * TOP_K + kk, w_out, mask=kmask)
    tl.store(ids_ptr + t * TOP_K + kk, id_out, mask=kmask)


def check_router_args(router_logits: torch.Tensor, bias, top_k: int, n_group: int, topk_group: int) -> None:
    """Raise ValueError naming the bad argument and the fix."""
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    if not router_logits.is_floating_point():
        raise ValueError(f"router_logits must be floating point, got {router_logits.dtype}")
    E = router_logits.shape[1]
    if bias is not None and tuple(bias.shape) != (E,):
        raise ValueError(f"e_score_correction_bias must have shape [{E}], got {tuple(bias.shape)}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k={top_k} must be in [1, E={E}]")
    if n_group < 1 or E % n_group:
        raise ValueError(f"n_group={n_group} must divide the expert count E={E}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
    epg = E // n_group
    if n_group > 1 and epg < 2:
        raise ValueError(f"group scores sum the top-2 experts of each group: need E/n_group >= 2, got {epg}")
    if top_k > topk_group * epg:
        raise ValueError(
            f"top_k={top_k} exceeds the experts in the kept groups (topk_group*E/n_group={topk_group * epg}); "
            "raise topk_group or lower top_k"
        )


def k2_router_topk(
    router_logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
    norm_topk_prob: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton router: (topk_weights [T, top_k] fp32, topk_ids [T, top_k] int32)."""
    check_router_args(router_logits, e_score_correction_bias, top_k, n_group, topk_group)
    T, E = router_logits.shape
    if e_score_correction_bias is None:
        e_score_correction_bias = torch.zeros(E, dtype=torch.float32, device=router_logits.device)
    check_launchable("k2_router_topk", router_logits, e_score_correction_bias)
    return _router_topk(router_logits, e_score_correction_bias, top_k, n_group, topk_group, routed_scaling_factor,
                        norm_topk_prob)


def _router_topk(router_logits, e_score_correction_bias, top_k, n_group, topk_group, routed_scaling_factor,
                 norm_topk_prob):
    """The launch behind k2_router_topk (arguments already checked; also driven on meta tensors by
    the compile check)."""
    T, E = router_logits.shape
    logits = router_logits
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    bias = e_score_correction_bias.contiguous().float()
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=logits.device)
    if T == 0:
        return weights, ids
    epg = E // n_group
    launch(
        _router_topk_kernel,
        (T,),
        logits,
        bias,
        weights,
        ids,
        logits.stride(0),
        float(routed_scaling_factor),
        TOP_K=top_k,
        N_GROUP=n_group,
        TOPK_GROUP=topk_group,
        EPG=epg,
        BLOCK_G=next_pow2(n_group),
        BLOCK_EPG=next_pow2(epg),
        BLOCK_K=next_pow2(top_k),
        NORM=bool(norm_topk_prob),
        num_warps=4 if E > 256 else 2,
    )
    return weights, ids

