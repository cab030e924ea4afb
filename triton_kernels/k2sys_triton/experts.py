"""Grouped expert MLPs over tokens already grouped by expert (Megatron's token-dispatcher output).

  out[p] = prob[p] * W2[e] (silu(G[e] x[p]) * (U[e] x[p])),   e = the expert of row p,
  rows grouped by expert: tokens_per_expert[0] rows of expert 0, then expert 1, ...

This is `fused_moe` with top_k = 1 and the expert of each row implied by the grouping; it reuses
the fused kernels (GEMM1 + SiLU-and-mul, GEMM2 with the routing weight, grouped weight grads).
Megatron keeps one Parameter per local expert, so the weights come as per-expert lists
(w13[e] [2I, H] = gate rows then up rows, w2[e] [H, I]). When the experts' tensors are evenly
spaced views of one storage (`stack_views`: k2sys lays expert weights out that way, and so does
a Megatron DDP buffer when the spacing is regular) the kernels read them in place; otherwise
they are stacked, one copy per call. Each expert's weight gradient is a view of the grouped
weight-gradient output (no split copies).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._interp import check_launchable
from .fused_moe import _backward, _forward, _pick_config, check_moe_args
from .align import MoEAlignment

__all__ = ["check_expert_lists", "grouped_experts", "stack_views"]


def stack_views(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, bool] | None:
    """A zero-copy [E, *shape] view over equally spaced same-shape tensors of one storage.

    Returns (stacked, reversed): stacked[i] is tensors[i], or tensors[E-1-i] when reversed (the
    tensors sit in memory in descending order, as in a buffer filled back to front); None when
    the tensors are not laid out that way (different storages, irregular spacing, overlap).
    """
    if not tensors:
        return None
    t0 = tensors[0]
    if len(tensors) == 1:
        return t0.detach().unsqueeze(0), False
    ref = (t0.shape, t0.stride(), t0.dtype, t0.device, t0.untyped_storage().data_ptr())
    for t in tensors[1:]:
        if (t.shape, t.stride(), t.dtype, t.device, t.untyped_storage().data_ptr()) != ref:
            return None
    offs = [t.storage_offset() for t in tensors]
    step = offs[1] - offs[0]
    if step == 0 or any(b - a != step for a, b in zip(offs, offs[1:])):
        return None
    extent = 1 + sum((n - 1) * s for n, s in zip(t0.shape, t0.stride()))  # elements one tensor spans
    if abs(step) < extent:
        return None  # the views overlap: not distinct experts
    first = tensors[0] if step > 0 else tensors[-1]
    stacked = first.detach().as_strided((len(tensors), *t0.shape), (abs(step), *t0.stride()), min(offs))
    return stacked, step < 0


def _stack_pair(w13: Sequence[torch.Tensor], w2: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(W13 [E, 2I, H], W2 [E, H, I], reversed): in place where possible, copies otherwise."""
    s13, s2 = stack_views(w13), stack_views(w2)
    if s13 is not None and s2 is not None and s13[1] == s2[1]:
        return s13[0], s2[0], s13[1]
    # Different orders or no in-place view for one side: follow the side that has one.
    rev = s13[1] if s13 is not None else (s2[1] if s2 is not None else False)
    order = (lambda xs: list(xs)[::-1]) if rev else list
    W13 = s13[0] if s13 is not None and s13[1] == rev else torch.stack([t.detach() for t in order(w13)])
    W2 = s2[0] if s2 is not None and s2[1] == rev else torch.stack([t.detach() for t in order(w2)])
    return W13, W2, rev


def _expert_ids(tokens_per_expert, E: int, P: int, device: torch.device, reverse: bool) -> torch.Tensor:
    counts = torch.as_tensor(tokens_per_expert, device=device).long().reshape(-1)
    if counts.numel() != E:
        raise ValueError(f"tokens_per_expert must have one count per local expert ({E}), got {counts.numel()}")
    if device.type == "cpu" and int(counts.sum()) != P:
        raise ValueError(f"tokens_per_expert sums to {int(counts.sum())} but hidden has {P} rows")
    experts = torch.arange(E, device=device)
    if reverse:
        experts = E - 1 - experts  # stacked index of expert e
    return torch.repeat_interleave(experts, counts, output_size=P).to(torch.int32).view(P, 1)


class _GroupedExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, probs, tokens_per_expert, n_experts, *weights):
        w13, w2 = weights[:n_experts], weights[n_experts:]
        W13, W2, rev = _stack_pair(w13, w2)
        P = hidden.shape[0]
        ids = _expert_ids(tokens_per_expert, n_experts, P, hidden.device, rev)
        topw = probs.reshape(P, 1)
        check_moe_args(hidden, W13, W2, topw, ids)
        check_launchable("grouped_experts", hidden, W13, W2, topw, ids)
        cfg = _pick_config(hidden, W13, W2, ids, False, None)
        ctx.n_experts, ctx.rev, ctx.cfg = n_experts, rev, cfg
        if P == 0:
            ctx.empty = True
            ctx.save_for_backward(*weights)
            return hidden.new_zeros(hidden.shape)
        ctx.empty = False
        out, align, preact = _forward(hidden, W13, W2, topw, ids, None, None, cfg, True)
        ctx.save_for_backward(hidden, topw, W13, W2, preact, *align)
        return out

    @staticmethod
    def backward(ctx, dout):
        if ctx.empty:
            weights = ctx.saved_tensors
            return (torch.zeros_like(dout), None, None, None, *[torch.zeros_like(w) for w in weights])
        hidden, topw, W13, W2, preact, *align = ctx.saved_tensors
        dx, dW13, dW2, dw = _backward(dout, hidden, W13, W2, topw, preact, MoEAlignment(*align), ctx.cfg)
        g13, g2 = list(dW13.unbind(0)), list(dW2.unbind(0))
        if ctx.rev:
            g13, g2 = g13[::-1], g2[::-1]
        return (dx, dw.reshape(-1), None, None, *g13, *g2)


def check_expert_lists(hidden, probs, w13, w2) -> None:
    """Raise ValueError naming the bad argument of grouped_experts (or its torch reference)."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [P, H] (rows grouped by expert), got {tuple(hidden.shape)}")
    if probs.dim() != 1 or probs.shape[0] != hidden.shape[0]:
        raise ValueError(f"probs must be [P={hidden.shape[0]}] (one routing weight per row), got {tuple(probs.shape)}")
    if len(w13) != len(w2) or not w13:
        raise ValueError(f"w13 and w2 need one tensor per local expert, got {len(w13)} and {len(w2)}")


def grouped_experts(
    hidden: torch.Tensor,
    probs: torch.Tensor,
    tokens_per_expert: torch.Tensor | Sequence[int],
    w13: Sequence[torch.Tensor],
    w2: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Triton grouped expert MLPs, [P, H] in hidden's dtype; differentiable in hidden, probs and
    every expert weight. w13[e] is [2I, H] (gate rows, then up rows), w2[e] is [H, I]."""
    check_expert_lists(hidden, probs, w13, w2)
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    return _GroupedExpertsFunction.apply(hidden, probs, tokens_per_expert, len(w13), *w13, *w2)

