"""Native engine configuration and the request types that cross its edge.

`EngineConfig` sizes the paged KV cache and the scheduler; it validates at construction and names
the field and the fix on error. `SamplingParams` and `LogprobOptions` (the one definition, in
k2sys.engine.api.params) are re-exported for the engine modules that import them from here.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal

from k2sys.engine.errors import EngineError, RequestError
# The request parameters live with the API types (api/ and core/ both read them); re-exported here.
from k2sys.engine.api.params import GREEDY_EPS, LogprobOptions, SamplingParams  # noqa: F401

__all__ = ["EngineConfig", "EngineError", "LogprobOptions", "SamplingParams", "RequestError"]


@dataclass(kw_only=True)
class EngineConfig:
    """The native engine's one config: `k2sys serve --config JSON` reads it ({"engine": {...}}), its
    flags override single fields, and the RL job nests it as `engine.*` (k2sys.coordinator.sections)."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Compute dtype: float32 / bfloat16 / float16; None keeps the checkpoint's."""
    device: str = "cpu"
    """cpu, cuda, cuda:N, or auto (cuda when the process sees a GPU, else cpu; `resolved()` picks)."""
    block_size: int = 16
    """Tokens per KV block (the unit of allocation and of prefix sharing)."""
    max_total_tokens: int = 65536
    """KV cache capacity in tokens over all requests (num_blocks = this / block_size)."""
    max_num_batched_tokens: int = 2048
    """Token budget of one forward step: decode tokens first, then prefill chunks."""
    max_running_requests: int = 512
    max_model_len: int | None = None
    """Longest prompt + generation; None = the model's max_position_embeddings."""
    served_model_name: str = "k2sys-native"
    cpu_threads: int | None = 1
    """Intra-op threads of the engine thread on CPU; None keeps torch's default. One is fastest
    for small models: thread wake-ups cost more than they save on tiny matmuls (measured)."""
    enable_prefix_caching: bool = True
    """Reuse the KV of full blocks whose tokens (and all tokens before them) match an earlier
    request's; flushed whenever the weights change."""
    moe_kernels: Literal["auto", "triton", "torch"] = "auto"
    """MoE layers: auto (Triton router + fused MoE on CUDA, grouped torch GEMMs elsewhere),
    triton (always; CPU only under TRITON_INTERPRET=1, for tests) or torch."""
    quantization: Literal["none", "fp8"] = "none"
    """Weight format served (SGLang's flag name): none keeps the compute dtype; fp8 holds every
    attention/MLP linear weight as float8_e4m3fn with 128x128 block scales (`X.weight` +
    `X.weight_scale_inv`, the DeepSeek-V3 / Kimi-K2 release layout). A release FP8 checkpoint is
    served as is; full-precision weights (at start or pushed by the trainer) are quantized once."""

    def __post_init__(self) -> None:
        EngineConfig.validate(self)  # the engine's own rules (a subclass's validate() may add deployment ones)

    def validate(self, where: str = "EngineConfig") -> None:
        """Raise RequestError naming `where.<field>` and the fix (the RL job passes where="engine")."""
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise RequestError(f"{where}.{name}: {msg}")

        need(isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
             "device", f"use cpu, cuda, cuda:N or auto, got {self.device!r}")
        need(self.dtype in (None, "float32", "bfloat16", "float16"), "dtype",
             f"use float32, bfloat16, float16 or None, got {self.dtype!r}")
        need(self.block_size > 0 and (self.block_size & (self.block_size - 1)) == 0, "block_size",
             f"must be a positive power of two, got {self.block_size}")
        need(self.max_total_tokens >= self.block_size, "max_total_tokens",
             f"must be >= block_size ({self.block_size}), got {self.max_total_tokens}")
        need(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1")
        need(self.max_running_requests >= 1, "max_running_requests", "must be >= 1")
        need(self.cpu_threads is None or self.cpu_threads >= 1, "cpu_threads", "must be >= 1 or None")
        need(self.max_model_len is None or self.max_model_len >= 2, "max_model_len", "must be >= 2 or None")
        need(self.moe_kernels in ("auto", "triton", "torch"), "moe_kernels",
             f"use auto, triton or torch, got {self.moe_kernels!r}")
        need(self.quantization in ("none", "fp8"), "quantization",
             f"use none or fp8 (block-128 e4m3, as Kimi-K2 / DeepSeek-V3 are released), got {self.quantization!r}")

    @property
    def num_blocks(self) -> int:
        return self.max_total_tokens // self.block_size

    def to_dict(self) -> dict[str, Any]:
        """The EngineConfig fields only (also of a subclass that adds its own), as JSON-able values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(EngineConfig)}

    def resolved(self) -> "EngineConfig":
        """A plain EngineConfig of these fields with device=auto decided for this process."""
        d = self.to_dict()
        if d["device"] == "auto":
            import torch

            d["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        return EngineConfig(**d)
