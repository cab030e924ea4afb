"""Weight quantization formats k2sys reads, writes and serves (FP8 e4m3fn with 128x128 block scales)."""

from k2sys.quant.fp8 import (FP8_BLOCK, FP8_DTYPE, FP8_MAX, SCALE_SUFFIX, dequantize_fp8_block, fp8_scale_shape,
                             is_fp8_weight_name, quantize_fp8_block, quantize_fp8_block_reference,
                             quantize_fp8_blocks, quantize_fp8_state, scale_inv_name)

__all__ = [
    "FP8_BLOCK", "FP8_DTYPE", "FP8_MAX", "SCALE_SUFFIX", "dequantize_fp8_block", "fp8_scale_shape",
    "is_fp8_weight_name", "quantize_fp8_block", "quantize_fp8_block_reference", "quantize_fp8_blocks",
    "quantize_fp8_state", "scale_inv_name",
]
