"""k2sys Triton kernels, installed as the `k2sys_triton` package.

The folder is named triton_kernels in the source tree, but it must never be imported under
that name: triton-lang ships its own `triton_kernels` package, which SGLang imports. Use
`k2sys.kernels` (the public facade) or `k2sys_triton` directly.

Kernels only: the torch references (`k2_router_topk_torch`, `fused_moe_torch`,
`grouped_experts_torch`) are in `k2sys.kernels`, over the one torch definition of the MoE math in
`k2sys.models.moe`; this package imports nothing from k2sys.
"""

from ._interp import HAS_TRITON, KERNELS_INTERPRETED
from .align import MoEAlignment, max_padded_rows, moe_align_block_size, moe_align_block_size_torch
from .experts import check_expert_lists, grouped_experts, stack_views
from .configs import MoEKernelConfig, get_config, heuristic_config
from .fp8 import dequantize_fp8_block, quantize_fp8_block
from .fused_moe import FusedMoEFunction, check_moe_args, fused_moe
from .router import check_router_args, k2_router_topk

__all__ = [
    "HAS_TRITON",
    "KERNELS_INTERPRETED",
    "MoEAlignment",
    "max_padded_rows",
    "moe_align_block_size",
    "moe_align_block_size_torch",
    "MoEKernelConfig",
    "get_config",
    "heuristic_config",
    "quantize_fp8_block",
    "dequantize_fp8_block",
    "FusedMoEFunction",
    "grouped_experts",
    "check_expert_lists",
    "stack_views",
    "fused_moe",
    "check_moe_args",
    "k2_router_topk",
    "check_router_args",
]
