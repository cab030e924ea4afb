"""MoE kernels for the native engine and the trainer: Triton on GPU, torch references on CPU.

The kernels live in the `k2sys_triton` package (source folder triton_kernels/k2sys_triton);
this facade is the import path the rest of k2sys uses.

HAS_TRITON      triton imports (the `kernels` extra is installed).
HAS_TRITON_GPU  triton imports *and* a CUDA device is visible: the fused kernels can run.

`resolve_moe_kernels(mode, device, field)` turns the config switch shared by the engine
(`EngineConfig.moe_kernels`) and the trainer (`TrainerConfig.moe_kernels`) into a yes/no:
  auto    Triton where it runs compiled (CUDA device + triton), the torch/megatron path elsewhere
  triton  Triton always: CUDA, or CPU under TRITON_INTERPRET=1 (tests: ~9 ms per program)
  torch   never Triton (the engine's grouped torch path, megatron's own experts in the trainer)

The torch references of the kernels (`k2_router_topk_torch`, `fused_moe_torch`,
`grouped_experts_torch`) take the kernels' arguments, checks and output dtypes, and compute with
the one torch definition of the MoE math, `k2sys.models.moe` (route_topk, moe_experts).

`moe_forward` is the dispatcher: the Triton fused MoE on CUDA tensors when HAS_TRITON_GPU
(unless use_triton=False), the per-expert torch reference otherwise. The CPU interpreter
(TRITON_INTERPRET=1) is for tests only, so the dispatcher never picks it.
"""

from __future__ import annotations

import torch

from collections.abc import Sequence

from k2sys.models.moe import moe_experts, route_topk
from k2sys_triton import (
    HAS_TRITON,
    KERNELS_INTERPRETED,
    FusedMoEFunction,
    MoEAlignment,
    MoEKernelConfig,
    check_expert_lists,
    check_moe_args,
    check_router_args,
    dequantize_fp8_block,
    fused_moe,
    get_config,
    grouped_experts,
    k2_router_topk,
    moe_align_block_size,
    moe_align_block_size_torch,
    quantize_fp8_block,
    stack_views,
)

HAS_TRITON_GPU = HAS_TRITON and torch.cuda.is_available()

__all__ = [
    "HAS_TRITON",
    "HAS_TRITON_GPU",
    "KERNELS_INTERPRETED",
    "MOE_KERNEL_MODES",
    "FusedMoEFunction",
    "MoEAlignment",
    "MoEKernelConfig",
    "dequantize_fp8_block",
    "fused_moe",
    "fused_moe_torch",
    "get_config",
    "grouped_experts",
    "grouped_experts_torch",
    "k2_router_topk",
    "k2_router_topk_torch",
    "moe_align_block_size",
    "moe_align_block_size_torch",
    "moe_forward",
    "quantize_fp8_block",
    "resolve_moe_kernels",
    "stack_views",
    "uses_triton",
]

MOE_KERNEL_MODES = ("auto", "triton", "torch")


def resolve_moe_kernels(mode: str, device: str | torch.device, field: str = "moe_kernels") -> bool:
    """Whether the MoE layers on `device` run the Triton kernels for switch value `mode`.

    Raises ValueError naming `field` for an unknown mode, or for mode="triton" where the
    kernels cannot launch (no triton; CPU without TRITON_INTERPRET=1 set before import).
    """
    if mode not in MOE_KERNEL_MODES:
        raise ValueError(f"{field}: expected one of {', '.join(MOE_KERNEL_MODES)}, got {mode!r}")
    dev = torch.device(device)
    if mode == "torch":
        return False
    if mode == "auto":
        return HAS_TRITON_GPU and dev.type == "cuda"
    if not HAS_TRITON:
        raise ValueError(f"{field}=triton: triton is not installed; `pip install k2sys[kernels]` or use auto/torch")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{field}=triton: device {dev} but CUDA is not available; use auto or torch")
    if dev.type == "cpu" and not KERNELS_INTERPRETED:
        raise ValueError(
            f"{field}=triton on CPU runs only in triton's interpreter: set TRITON_INTERPRET=1 before "
            "starting (tests only), or use auto/torch"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{field}=triton: unsupported device {dev}; use CUDA, or auto/torch")
    return True


def uses_triton(hidden: torch.Tensor, use_triton: bool | None = None) -> bool:
    """Whether moe_forward takes the Triton path for this tensor (None = auto: on when CUDA)."""
    if use_triton is None:
        return HAS_TRITON_GPU and hidden.is_cuda
    if use_triton and not (HAS_TRITON_GPU and hidden.is_cuda):
        raise RuntimeError(
            "moe_forward(use_triton=True) needs triton and a CUDA tensor "
            f"(HAS_TRITON={HAS_TRITON}, cuda={torch.cuda.is_available()}, hidden on {hidden.device}); "
            "pass use_triton=None to fall back to the torch reference"
        )
    return bool(use_triton)


def moe_forward(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """Routed-expert MLP output [T, H]: w13 [E, 2I, H] (gate rows, then up), w2 [E, H, I]."""
    if uses_triton(hidden, use_triton):
        return fused_moe(hidden, w13, w2, topk_weights, topk_ids, w13_scale=w13_scale, w2_scale=w2_scale)
    return fused_moe_torch(hidden, w13, w2, topk_weights, topk_ids, w13_scale=w13_scale, w2_scale=w2_scale)


def k2_router_topk_torch(
    router_logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
    norm_topk_prob: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of k2_router_topk: (topk_weights [T, top_k] fp32, topk_ids [T, top_k] int32),
    in the kernel's order (lower index wins ties)."""
    check_router_args(router_logits, e_score_correction_bias, top_k, n_group, topk_group)
    weights, ids = route_topk(router_logits, e_score_correction_bias, top_k, n_group, topk_group,
                              routed_scaling_factor, norm_topk_prob)
    return weights, ids.to(torch.int32)


def fused_moe_torch(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of fused_moe (differentiable): [T, H] in hidden's dtype, routed outputs
    summed in fp32; FP8 weights are dequantized whole first."""
    check_moe_args(hidden, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    if w13_scale is not None:
        w13 = dequantize_fp8_block(w13, w13_scale, hidden.dtype)
        w2 = dequantize_fp8_block(w2, w2_scale, hidden.dtype)
    return moe_experts(hidden, w13, w2, topk_weights, topk_ids)


def grouped_experts_torch(
    hidden: torch.Tensor,
    probs: torch.Tensor,
    tokens_per_expert: torch.Tensor | Sequence[int],
    w13: Sequence[torch.Tensor],
    w2: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Torch reference of grouped_experts (differentiable): [P, H], row p = probs[p] x its expert's
    MLP, rows already grouped by expert (top_k = 1 with the expert of each row implied)."""
    check_expert_lists(hidden, probs, w13, w2)
    counts = torch.as_tensor(tokens_per_expert).reshape(-1).long().cpu()
    if counts.numel() != len(w13) or int(counts.sum()) != hidden.shape[0]:
        raise ValueError(f"tokens_per_expert {counts.tolist()} must have {len(w13)} entries summing to "
                         f"{hidden.shape[0]}")
    ids = torch.repeat_interleave(torch.arange(len(w13)), counts).to(hidden.device)
    return moe_experts(hidden, w13, w2, probs[:, None], ids[:, None])
