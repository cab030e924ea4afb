"""Routed experts on the native engine's torch path (CPU, and CUDA when the Triton MoE is off).

    (token, slot) pairs --sort by expert--> rows grouped per expert
      --grouped GEMM over the stacked gate|up weights--> silu(gate) * up
      --grouped GEMM over the stacked down weights--> x routing weight --scatter-add--> [T, D]

`grouped_moe` runs all experts of a layer in one GEMM call per projection, on the stacked expert
weights the engine already stores ([E, 2I, D] and [E, D, I], read through transposed views: no
copy). The GEMM is `torch.nn.functional.grouped_mm` (jagged row groups, one weight per group)
where it runs for the device and dtype (`grouped_mm_works`), else one bmm over the groups padded to
the largest. On CPU grouped_mm is a C++ loop that visits every group (~3 us each, empty or not),
so decode-sized steps on CPU go another way: in fp32 (<= CPP_PAIRS_PER_EXPERT pairs per expert) all
of it in one C++ call that groups the pairs by expert and streams each selected expert's weights
once (`_cpp_pairs`); otherwise, with fewer (token, slot) pairs than experts, one GEMV pair per pair
(`_per_pair`). Either way only the selected experts' weights are read.

The per-expert loop the grouped path replaced is the torch reference itself,
`k2sys.models.moe_experts`: one GEMM pair per expert through per-expert callables (the engine's
packed oneDNN linears, or FP8 linears that dequantize one expert at a time). The model runner uses
it for moe_impl="loop" (the peer of benchmarks/bench_decode.py) and for FP8 off CUDA.

Shapes: T tokens, k experts per token, E experts, D hidden, I expert width; ids/weights [T, k].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from k2sys.ext import _C

__all__ = ["ExpertRows", "grouped_mm_works", "grouped_moe", "sort_by_expert"]


@dataclass
class ExpertRows:
    """The step's (token, slot) pairs sorted by expert (stable: by token within an expert)."""
    order: torch.Tensor   # [T*k] flat (token, slot) index of each sorted row
    tok: torch.Tensor     # [T*k] token of each sorted row
    counts: torch.Tensor  # [E] rows per expert


def sort_by_expert(ids: torch.Tensor, num_experts: int) -> ExpertRows:
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    return ExpertRows(order=order, tok=order // ids.shape[1], counts=torch.bincount(flat, minlength=num_experts))


def _combine(x: torch.Tensor, ys: torch.Tensor, weights: torch.Tensor, rows: ExpertRows) -> torch.Tensor:
    """sum over a token's k experts of routing weight x expert output -> [T, D], accumulated in fp32
    like the reference (k2sys.models.moe_experts) and the Triton kernel, so bf16 paths agree."""
    ys = ys.float() * weights.reshape(-1).index_select(0, rows.order)[:, None].float()
    return x.new_zeros(x.shape, dtype=torch.float32).index_add_(0, rows.tok, ys).to(x.dtype)


def _padded_mm(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM as one bmm over groups padded to the largest: a [R, K] rows sorted by group,
    b [G, K, N], counts [G] -> [R, N]."""
    G, R = b.shape[0], a.shape[0]
    starts = torch.cumsum(counts, 0) - counts
    group = torch.repeat_interleave(torch.arange(G, device=a.device), counts, output_size=R)
    slot = torch.arange(R, device=a.device) - starts[group]
    padded = a.new_zeros(G, int(counts.max()), a.shape[1])
    padded[group, slot] = a
    return torch.bmm(padded, b)[group, slot]


_WORKS: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_works(device: torch.device | str, dtype: torch.dtype) -> bool:
    """True where F.grouped_mm runs for (device, dtype) with empty groups and an [E, K, N] transposed
    view as the weight, and agrees with per-group matmuls (checked once, on a small case)."""
    dev = torch.device(device)
    key = (dev.type, dtype)
    if key not in _WORKS:
        ok = False
        if hasattr(F, "grouped_mm"):
            try:
                g = torch.Generator().manual_seed(0)
                counts = torch.tensor([3, 0, 5, 0], device=dev)
                a = torch.randn(8, 16, generator=g).to(dev, dtype)
                w = torch.randn(4, 32, 16, generator=g).to(dev, dtype)  # [G, N, K] like the engine's bases
                out = F.grouped_mm(a, w.transpose(1, 2), offs=torch.cumsum(counts, 0).to(torch.int32))
                ref = torch.cat([a[:3] @ w[0].T, a[3:] @ w[2].T])
                tol = 1e-4 if dtype == torch.float32 else 3e-2
                ok = out.shape == ref.shape and bool(torch.allclose(out.float(), ref.float(), rtol=tol, atol=tol))
            except (RuntimeError, NotImplementedError, TypeError, ValueError):
                ok = False
        _WORKS[key] = ok
    return _WORKS[key]


CPP_PAIRS_PER_EXPERT = 64
"""fp32 CPU steps with at most this many (token, slot) pairs per expert on average run their routed
experts in one C++ call (`moe_pairs_f32`: pairs grouped by expert, each expert's weights streamed
once for all its tokens). k2-small, 1 and 2 threads: 1.0-3.3x faster than grouped_mm from 8 to 256
tokens (up to 64 pairs per expert), measured."""


def _cpp_pairs_ok(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    return (_C is not None and x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous()
            and w13.dtype == w2.dtype == torch.float32 and w13.stride(2) == 1 and w13.stride(1) == w13.shape[2]
            and w2.stride(2) == 1 and w2.stride(1) == w2.shape[2])


def _cpp_pairs(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
               ids: torch.Tensor) -> torch.Tensor:
    """Every pair's gate|up and down products, activation and weighted sum in one C++ call (csrc/gemv.h)."""
    T, k = ids.shape
    out = torch.empty(T, x.shape[1])
    ids64, wts = ids.to(torch.int64).contiguous(), weights.float().contiguous()  # alive through the call
    _C.moe_pairs_f32_ptr(out.data_ptr(), x.data_ptr(), w13.data_ptr(), w2.data_ptr(), ids64.data_ptr(), wts.data_ptr(),
                         T, k, x.shape[1], w2.shape[2], w13.stride(0), w2.stride(0), w13.shape[0],
                         torch.get_num_threads())
    return out


def _per_pair(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
    """Fewer (token, slot) pairs than experts on CPU where the C++ call does not serve (not fp32, or
    no extension): one GEMV pair per pair through its expert's weights. CPU grouped_mm walks every
    group, empty or not, so here it would cost more than the GEMVs; this reads only the selected
    experts and needs no sort."""
    T, k = ids.shape
    ys = []
    for j, e in enumerate(ids.reshape(-1).tolist()):
        g, u = torch.mv(w13[e], x[j // k]).chunk(2)
        ys.append(torch.mv(w2[e], F.silu(g) * u))
    y = torch.stack(ys).view(T, k, -1)
    return torch.bmm(weights.float()[:, None], y.float())[:, 0].to(x.dtype)  # [T, 1, k] @ [T, k, D]: the weighted sum


def grouped_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                use_grouped_mm: bool | None = None) -> torch.Tensor:
    """All routed experts of a layer in two grouped GEMMs. x [T, D]; w13 [E, 2I, D] (gate rows
    then up rows, HF [out, in] layout); w2 [E, D, I]; weights/ids [T, k] -> [T, D].

    use_grouped_mm: None = F.grouped_mm where `grouped_mm_works` (should a real shape still be
    refused, e.g. a CUDA alignment rule the probe's shapes meet, the padded bmm serves from then
    on); True/False force one (tests, benchmarks)."""
    auto = use_grouped_mm is None
    if auto and x.device.type == "cpu":
        if ids.numel() <= CPP_PAIRS_PER_EXPERT * w13.shape[0] and _cpp_pairs_ok(x, w13, w2):
            return _cpp_pairs(x, w13, w2, weights, ids)
        if ids.numel() < w13.shape[0]:
            return _per_pair(x, w13, w2, weights, ids)
    rows = sort_by_expert(ids, w13.shape[0])
    xs = x.index_select(0, rows.tok)
    if auto and grouped_mm_works(x.device, x.dtype) or use_grouped_mm:
        offs = torch.cumsum(rows.counts, 0).to(torch.int32)
        try:
            g, u = F.grouped_mm(xs, w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
            return _combine(x, F.grouped_mm(F.silu(g) * u, w2.transpose(1, 2), offs=offs), weights, rows)
        except RuntimeError:
            if not auto:
                raise
            _WORKS[(x.device.type, x.dtype)] = False
    g, u = _padded_mm(xs, w13.transpose(1, 2), rows.counts).chunk(2, dim=-1)
    return _combine(x, _padded_mm(F.silu(g) * u, w2.transpose(1, 2), rows.counts), weights, rows)
