"""Native engine configuration and the request types that cross its edge.

`EngineConfig` sizes the paged KV cache and the scheduler; `SamplingParams` carries SGLang's
sampling field names (sglang 0.5.23 `SamplingParams`), so an SGLang `/generate` payload parses
here unchanged. Both validate at construction and name the field and the fix on error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EngineConfig", "EngineError", "SamplingParams", "RequestError"]


class EngineError(RuntimeError):
    """The engine cannot do what was asked in its current state (e.g. weights released)."""


class RequestError(ValueError):
    """A request is malformed; the message names the field and the fix (HTTP 400)."""


@dataclass(kw_only=True)
class EngineConfig:
    dtype: str | None = None
    """Compute dtype: float32 / bfloat16 / float16; None keeps the checkpoint's."""
    device: str = "cpu"
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
    moe_kernels: str = "auto"
    """MoE layers: auto (Triton router + fused MoE on CUDA, grouped torch GEMMs elsewhere),
    triton (always; CPU only under TRITON_INTERPRET=1, for tests) or torch."""
    quantization: str = "none"
    """Weight format served (SGLang's flag name): none keeps the compute dtype; fp8 holds every
    attention/MLP linear weight as float8_e4m3fn with 128x128 block scales (`X.weight` +
    `X.weight_scale_inv`, the DeepSeek-V3 / Kimi-K2 release layout). A release FP8 checkpoint is
    served as is; full-precision weights (at start or pushed by the trainer) are quantized once."""

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise RequestError(f"EngineConfig.{name}: {msg}")

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


# Fields SGLang accepts that we parse but that only have one supported value here.
_FIXED_DEFAULTS = {
    "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
    "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None, "stop_regex": None,
    "logit_bias": None, "custom_params": None, "stream_interval": None,
    "spaces_between_special_tokens": True,
}


@dataclass(kw_only=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    """0 = greedy (then top_p/top_k are irrelevant)."""
    top_p: float = 1.0
    top_k: int = -1
    """-1 = the whole vocabulary."""
    min_p: float = 0.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_new_tokens: int = 0
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None
    """Per-request seed: the same seed, prompt and weights give the same tokens in any batch."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]

        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise RequestError(f"sampling_params.{name}: {msg}")

        need(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0, "max_new_tokens",
             f"must be an int >= 0, got {self.max_new_tokens!r}")
        need(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        need(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        need(self.top_k == -1 or self.top_k >= 1, "top_k", f"must be -1 (off) or >= 1, got {self.top_k}")
        need(0 <= self.min_p < 1, "min_p", f"must be in [0, 1), got {self.min_p}")
        need(isinstance(self.n, int) and self.n >= 1, "n", f"must be an int >= 1, got {self.n!r}")
        need(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        need(0 <= self.min_new_tokens, "min_new_tokens", "must be >= 0")
        need(self.sampling_seed is None or isinstance(self.sampling_seed, int), "sampling_seed",
             f"must be an int or null, got {self.sampling_seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SamplingParams":
        """Parse an SGLang `sampling_params` dict (`seed` is accepted as `sampling_seed`)."""
        d = dict(d or {})
        if "seed" in d:
            d.setdefault("sampling_seed", d.pop("seed"))
        names = {f.name for f in dataclasses.fields(cls)}
        for key in list(d):
            if key in _FIXED_DEFAULTS:
                value = d.pop(key)
                if value is not None and value != _FIXED_DEFAULTS[key]:
                    raise RequestError(f"sampling_params.{key}={value!r} is not supported by the native engine; "
                                       f"leave it at {_FIXED_DEFAULTS[key]!r}")
            elif key not in names:
                raise RequestError(f"sampling_params.{key}: unknown field; known fields are {sorted(names)}")
        for key in [k for k, v in d.items() if v is None]:
            if key not in ("sampling_seed",):
                d.pop(key)  # null = default, as SGLang treats it
        try:
            return cls(**d)
        except TypeError as e:  # wrong value types surface here
            raise RequestError(f"sampling_params: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
