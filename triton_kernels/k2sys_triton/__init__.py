"""k2sys Triton kernels, installed as the `k2sys_triton` package.

The folder is named triton_kernels in the source tree, but it must never be imported under
that name: triton-lang ships its own `triton_kernels` package, which SGLang imports. Use
`k2sys.kernels` (the public facade) or `k2sys_triton` directly.
"""

from ._interp import HAS_TRITON, KERNELS_INTERPRETED
from .align import MoEAlignment, max_padded_rows, moe_align_block_size, moe_align_block_size_torch
from .experts import grouped_experts, grouped_experts_torch, stack_views
from .configs import MoEKernelConfig, get_config, heuristic_config
from .fp8 import dequantize_fp8_block, quantize_fp8_block
from .fused_moe import FusedMoEFunction, fused_moe, fused_moe_torch
from .router import k2_router_topk, k2_router_topk_torch

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
    "grouped_experts_torch",
    "stack_views",
    "fused_moe",
    "fused_moe_torch",
    "k2_router_topk",
    "k2_router_topk_torch",
]
