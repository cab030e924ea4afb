"""moe_align_block_size: group token-expert pairs by expert, each group padded to block_m.

The grouped GEMMs walk `sorted_token_ids` in blocks of block_m rows; every block belongs to
one expert (`expert_ids[block]`), so a program loads one expert's weights and a block of the
tokens routed to it. Legend (P = T * top_k pairs, flat pair index p = t * top_k + j):

  sorted_token_ids [max_padded] int32  pair indices grouped by expert, ascending p within an
                                       expert; padding slots hold the sentinel P
  expert_ids       [max_blocks] int32  expert of each block; -1 past the padded count
  num_tokens_post_padded [1]    int32  sum over experts of round_up(count_e, block_m)
  expert_offsets   [E + 1]      int32  padded start of each expert's rows (used by the
                                       weight-gradient kernel to loop over one expert)

A negative expert id means "not routed on this rank" (expert parallelism): the pair is left
out. Ids >= E are an error (checked on CPU tensors; on CUDA the caller owns the range).

Three launches, deterministic (no atomics): per-chunk histograms -> one-program scan that
also fills expert_ids -> per-chunk scatter with ranks from an in-chunk comparison matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._interp import cdiv, check_launchable, next_pow2, tl, triton
from .launch import launch

__all__ = ["MoEAlignment", "moe_align_block_size", "moe_align_block_size_torch", "max_padded_rows"]


class MoEAlignment(NamedTuple):
    sorted_token_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_tokens_post_padded: torch.Tensor
    expert_offsets: torch.Tensor


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, numel, E, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    e = tl.load(ids_ptr + offs, mask=offs < numel, other=-1).to(tl.int32)
    experts = tl.arange(0, BLOCK_E)
    hist = tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + pid * E + experts, hist, mask=experts < E)


@triton.jit
def _scan_kernel(
    counts_ptr,  # [num_chunks, E] in: per-chunk counts; out: exclusive prefix over chunks
    offsets_ptr,
    expert_ids_ptr,
    ntpp_ptr,
    num_chunks,
    E,
    max_blocks,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    experts = tl.arange(0, BLOCK_E)
    emask = experts < E
    running = tl.zeros([BLOCK_E], dtype=tl.int32)
    for c in range(num_chunks):
        cnt = tl.load(counts_ptr + c * E + experts, mask=emask, other=0)
        tl.store(counts_ptr + c * E + experts, running, mask=emask)
        running += cnt
    padded = (running + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    total = tl.sum(padded, axis=0)
    tl.store(offsets_ptr + 1 + experts, ends, mask=emask)
    tl.store(offsets_ptr, 0)
    tl.store(ntpp_ptr, total)
    # Block b starts at row b*BLOCK_M; its expert is the number of experts ending at or before it.
    ends_live = tl.where(emask, ends, 2147483647)
    for b0 in range(0, max_blocks, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        row = blocks * BLOCK_M
        owner = tl.sum((ends_live[None, :] <= row[:, None]).to(tl.int32), axis=1)
        owner = tl.where(row < total, owner, -1)
        tl.store(expert_ids_ptr + blocks, owner, mask=blocks < max_blocks)


@triton.jit
def _scatter_kernel(ids_ptr, sorted_ptr, chunk_base_ptr, offsets_ptr, numel, E, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    local = tl.arange(0, CHUNK)
    offs = pid * CHUNK + local
    e = tl.load(ids_ptr + offs, mask=offs < numel, other=-1).to(tl.int32)
    valid = (offs < numel) & (e >= 0) & (e < E)
    # Rank among earlier pairs of the same expert in this chunk keeps ascending pair order.
    earlier = (e[:, None] == e[None, :]) & (local[None, :] < local[:, None])
    rank = tl.sum(earlier.to(tl.int32), axis=1)
    base = tl.load(chunk_base_ptr + pid * E + e, mask=valid, other=0)
    start = tl.load(offsets_ptr + e, mask=valid, other=0)
    tl.store(sorted_ptr + start + base + rank, offs.to(tl.int32), mask=valid)


def max_padded_rows(num_pairs: int, block_m: int, num_experts: int) -> int:
    """Upper bound on num_tokens_post_padded, rounded to block_m (at most min(E, P) experts pad)."""
    return cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m) * block_m


def _check(topk_ids: torch.Tensor, block_m: int, num_experts: int) -> None:
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, top_k], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m} must be a power of two (the GEMM tile height)")
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts} must be >= 1")
    if topk_ids.device.type == "cpu" and topk_ids.numel() and int(topk_ids.max()) >= num_experts:
        raise ValueError(
            f"topk_ids holds expert {int(topk_ids.max())} but num_experts={num_experts}; "
            "pass the local expert count and map global ids to local ones (-1 = not on this rank)"
        )


def _empty(numel: int, block_m: int, num_experts: int, device) -> MoEAlignment:
    max_padded = max_padded_rows(numel, block_m, num_experts)
    return MoEAlignment(
        torch.full((max_padded,), numel, dtype=torch.int32, device=device),
        torch.full((max_padded // block_m,), -1, dtype=torch.int32, device=device),
        torch.zeros(1, dtype=torch.int32, device=device),
        torch.zeros(num_experts + 1, dtype=torch.int32, device=device),
    )


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int) -> MoEAlignment:
    """Triton launcher; see the module docstring for the outputs."""
    _check(topk_ids, block_m, num_experts)
    check_launchable("moe_align_block_size", topk_ids)
    return _align(topk_ids, block_m, num_experts)


def _align(topk_ids: torch.Tensor, block_m: int, num_experts: int) -> MoEAlignment:
    """The launches behind moe_align_block_size (arguments already checked)."""
    ids = topk_ids.contiguous().view(-1)
    numel = ids.numel()
    out = _empty(numel, block_m, num_experts, ids.device)
    if numel == 0:
        return out
    chunk = 128 if numel > 64 else 64
    num_chunks = cdiv(numel, chunk)
    block_e = next_pow2(num_experts)
    counts = torch.empty(num_chunks, num_experts, dtype=torch.int32, device=ids.device)
    launch(_count_kernel, (num_chunks,), ids, counts, numel, num_experts, CHUNK=chunk, BLOCK_E=block_e)
    max_blocks = out.expert_ids.numel()
    launch(
        _scan_kernel, (1,),
        counts, out.expert_offsets, out.expert_ids, out.num_tokens_post_padded,
        num_chunks, num_experts, max_blocks,
        BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_B=max(16, min(64, next_pow2(max_blocks))),
    )  # fmt: skip
    launch(_scatter_kernel, (num_chunks,), ids, out.sorted_token_ids, counts, out.expert_offsets, numel, num_experts,
           CHUNK=chunk)
    return out


def moe_align_block_size_torch(topk_ids: torch.Tensor, block_m: int, num_experts: int) -> MoEAlignment:
    """Torch reference producing the same tensors (stable sort keeps ascending pair order)."""
    _check(topk_ids, block_m, num_experts)
    ids = topk_ids.reshape(-1).long()
    numel = ids.numel()
    out = _empty(numel, block_m, num_experts, ids.device)
    live = ids >= 0
    counts = torch.bincount(ids[live], minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    out.expert_offsets[1:] = ends.to(torch.int32)
    total = int(ends[-1]) if num_experts else 0
    out.num_tokens_post_padded[0] = total
    order = torch.sort(torch.where(live, ids, num_experts), stable=True).indices[: int(live.sum())]
    starts = ends - padded
    sorted_experts = ids[order]
    rank = torch.arange(order.numel(), device=ids.device) - (counts.cumsum(0) - counts)[sorted_experts]
    out.sorted_token_ids[starts[sorted_experts] + rank] = order.to(torch.int32)
    blocks = total // block_m
    block_rows = torch.arange(blocks, device=ids.device) * block_m
    out.expert_ids[:blocks] = torch.searchsorted(ends, block_rows, right=True).to(torch.int32)
    return out
