"""Native engine configuration and the request types that cross its edge.

`EngineConfig` sizes the paged KV cache and the scheduler; `SamplingParams` carries SGLang's
sampling field names (sglang 0.5.23 `SamplingParams`), so an SGLang `/generate` payload parses
here unchanged. Both validate at construction and name the field and the fix on error.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from k2sys.engine.errors import EngineError, RequestError

__all__ = ["EngineConfig", "EngineError", "LogprobOptions", "SamplingParams", "RequestError"]


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


# SGLang `sampling_params` fields the native engine does not implement: accepted only at the value
# that means "off" (SGLang 0.5.23 SamplingParams); any other value is a 400 that names the field.
_OFF_ONLY = {
    "beam_width": (None, 1),
    "watermark": (None,),
    "custom_params": (None, {}),
    "structural_tag": (None, ""),
}
GREEDY_EPS = 1e-6
"""Temperatures below this are greedy (SGLang: temperature < 1e-6 means top_k = 1)."""


@dataclass(kw_only=True)
class SamplingParams:
    """SGLang 0.5.23 `sampling_params`, the fields the native engine honours (docs/engine_api.md).

    Logits of one row go through, in this order: repetition_penalty (HF: over prompt + output
    tokens, x*p if x < 0 else x/p), frequency/presence penalties (OpenAI: minus f*count - p*[count>0]
    over output tokens), logit_bias (added), min_new_tokens / grammar masks (-inf), then temperature,
    then top-k / top-p / min-p. Every step is per row, so a row's tokens do not depend on its batch.
    """
    max_new_tokens: int = 128
    temperature: float = 1.0
    """0 (or < 1e-6) = greedy (then top_p/top_k/min_p are irrelevant)."""
    top_p: float = 1.0
    top_k: int = -1
    """-1 = the whole vocabulary."""
    min_p: float = 0.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    stop_regex: list[str] = field(default_factory=list)
    """Python regular expressions searched in the decoded output; the first match stops the request."""
    ignore_eos: bool = False
    min_new_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    """Accepted for SGLang clients; like SGLang with a fast (Rust) tokenizer, decoding does not use it."""
    no_stop_trim: bool = False
    sampling_seed: int | None = None
    """Per-request seed: the same seed, prompt and weights give the same tokens in any batch."""
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    """token id -> value added to its logit (JSON keys are strings of ids, as in OpenAI and SGLang)."""
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    """Structured output: at most one of regex / json_schema / ebnf constrains the tokens (xgrammar)."""
    stream_interval: int | None = None
    """Stream an update every this many tokens (None = every token); the final update is always sent."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if isinstance(self.stop_regex, str):
            self.stop_regex = [self.stop_regex]
        self.stop_regex = list(self.stop_regex or [])

        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise RequestError(f"sampling_params.{name}: {msg}")

        def number(name: str, lo: float | None = None, hi: float | None = None) -> None:
            v = getattr(self, name)
            need(not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v), name,
                 f"must be a finite number, got {v!r}")
            need((lo is None or v >= lo) and (hi is None or v <= hi), name,
                 f"must be in [{lo}, {hi}], got {v!r}")
            setattr(self, name, float(v))

        def integer(name: str, lo: int) -> None:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= lo, name, f"must be an int >= {lo}, got {v!r}")

        integer("max_new_tokens", 0)
        number("temperature", 0.0)
        number("top_p")
        need(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        need(isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and (self.top_k == -1 or self.top_k >= 1),
             "top_k", f"must be -1 (off) or >= 1, got {self.top_k!r}")
        number("min_p", 0.0, 1.0)
        integer("n", 1)
        integer("min_new_tokens", 0)
        need(self.min_new_tokens <= self.max_new_tokens, "min_new_tokens",
             f"must be <= max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens}")
        need(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        need(isinstance(self.stop_token_ids, (list, tuple, set)) and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids", f"must be a list of token ids >= 0, got {self.stop_token_ids!r}")
        self.stop_token_ids = sorted(set(self.stop_token_ids)) if isinstance(self.stop_token_ids, set) \
            else list(self.stop_token_ids)
        for i, pattern in enumerate(self.stop_regex):
            need(isinstance(pattern, str) and pattern != "", f"stop_regex[{i}]", "must be a non-empty string")
            try:
                re.compile(pattern)
            except re.error as e:
                raise RequestError(f"sampling_params.stop_regex[{i}]: {pattern!r} is not a valid regular "
                                   f"expression ({e})") from None
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
            need(isinstance(getattr(self, name), bool), name, f"must be true or false, got {getattr(self, name)!r}")
        need(self.sampling_seed is None or (isinstance(self.sampling_seed, int) and not isinstance(self.sampling_seed, bool)
                                            and -2**63 <= self.sampling_seed < 2**63), "sampling_seed",
             f"must be a 64-bit int or null, got {self.sampling_seed!r}")
        number("frequency_penalty", -2.0, 2.0)
        number("presence_penalty", -2.0, 2.0)
        number("repetition_penalty")
        need(self.repetition_penalty > 0, "repetition_penalty", f"must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.logit_bias is not None:
            need(isinstance(self.logit_bias, dict), "logit_bias", "must be an object {token_id: bias}")
            bias: dict[int, float] = {}
            for k, v in self.logit_bias.items():
                ok = k.isdigit() if isinstance(k, str) else isinstance(k, int) and not isinstance(k, bool) and k >= 0
                need(ok, "logit_bias", f"key {k!r} is not a token id >= 0")
                tid = int(k)
                need(not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v), "logit_bias",
                     f"value for token {k} must be a finite number, got {v!r}")
                bias[tid] = float(v)
            self.logit_bias = bias or None
        grammars = [g for g in ("regex", "json_schema", "ebnf") if getattr(self, g) not in (None, "")]
        for g in ("regex", "json_schema", "ebnf"):
            if getattr(self, g) == "":
                setattr(self, g, None)  # SGLang: an empty grammar means unset
            elif getattr(self, g) is not None:
                need(isinstance(getattr(self, g), str), g, f"must be a string, got {type(getattr(self, g)).__name__}")
        need(len(grammars) <= 1, "/".join(grammars), "only one of regex, json_schema, ebnf can be set")
        need(self.stream_interval is None or (isinstance(self.stream_interval, int) and self.stream_interval >= 1),
             "stream_interval", f"must be an int >= 1 or null, got {self.stream_interval!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1

    @property
    def grammar(self) -> tuple[str, str] | None:
        """(kind, source) of the structured-output constraint, if any."""
        for kind in ("regex", "json_schema", "ebnf"):
            if getattr(self, kind) is not None:
                return kind, getattr(self, kind)
        return None

    @property
    def needs_history(self) -> bool:
        """Whether sampling reads the request's tokens (penalties)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SamplingParams":
        """Parse an SGLang `sampling_params` dict (`seed` is accepted as `sampling_seed`).

        null means the default (as SGLang treats it); fields SGLang defines that the native engine
        does not implement are accepted only at their "off" value; unknown fields are a 400."""
        if d is not None and not isinstance(d, dict):
            raise RequestError(f"sampling_params: must be an object, got {type(d).__name__}")
        d = dict(d or {})
        if "seed" in d:
            if "sampling_seed" in d and d["sampling_seed"] is not None and d["seed"] is not None:
                raise RequestError("sampling_params: give seed or sampling_seed, not both")
            seed = d.pop("seed")
            if d.get("sampling_seed") is None:
                d["sampling_seed"] = seed
        names = {f.name for f in dataclasses.fields(cls)}
        for key in list(d):
            if key in _OFF_ONLY:
                value = d.pop(key)
                if value not in _OFF_ONLY[key]:
                    raise RequestError(f"sampling_params.{key}={value!r} is not supported by the native engine; "
                                       f"omit it or send {_OFF_ONLY[key][0]!r}")
            elif key not in names:
                raise RequestError(f"sampling_params.{key}: unknown field; known fields are "
                                   f"{sorted(names | set(_OFF_ONLY) | {'seed'})}")
        for key in [k for k, v in d.items() if v is None]:
            d.pop(key)  # null = default, as SGLang treats it
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class LogprobOptions:
    """What log-probabilities a request returns (SGLang GenerateReqInput's logprob fields).

    logprob_start_len: -1 = output tokens only; k >= 0 = also the prompt tokens from position k
    (input_token_logprobs; the first of them has no logprob, None, as in SGLang). Prompt log-probs
    are the model's log-softmax (temperature 1, no penalties); output ones are those of the
    distribution the token was sampled from (after penalties and biases, divided by temperature).
    """
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    token_ids_logprob: tuple[int, ...] | None = None
    return_text_in_logprobs: bool = False

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise RequestError(f"{name}: {msg}")

        need(isinstance(self.return_logprob, bool), "return_logprob", f"must be true or false, got {self.return_logprob!r}")
        s = self.logprob_start_len
        need(isinstance(s, int) and not isinstance(s, bool) and s >= -1, "logprob_start_len",
             f"must be -1 (output only) or a prompt position >= 0, got {s!r}")
        k = self.top_logprobs_num
        need(isinstance(k, int) and not isinstance(k, bool) and k >= 0, "top_logprobs_num", f"must be an int >= 0, got {k!r}")
        if self.token_ids_logprob is not None:
            ids = self.token_ids_logprob
            need(isinstance(ids, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                        for t in ids), "token_ids_logprob",
                 f"must be a list of token ids >= 0, got {ids!r}")
            object.__setattr__(self, "token_ids_logprob", tuple(ids))
        need(isinstance(self.return_text_in_logprobs, bool), "return_text_in_logprobs",
             f"must be true or false, got {self.return_text_in_logprobs!r}")
        if not self.return_logprob:
            for name, off in (("logprob_start_len", -1), ("top_logprobs_num", 0), ("token_ids_logprob", None)):
                need(getattr(self, name) == off or (name == "token_ids_logprob" and not getattr(self, name)), name,
                     f"{getattr(self, name)!r} needs return_logprob=true (log-probs are returned only then)")

    def input_start(self, prompt_len: int) -> int | None:
        """First prompt position whose token is reported in input_token_logprobs, or None."""
        if not self.return_logprob or self.logprob_start_len < 0:
            return None
        if self.logprob_start_len > prompt_len:
            raise RequestError(f"logprob_start_len: {self.logprob_start_len} is past the prompt ({prompt_len} tokens); "
                               "use a smaller value or -1")
        return self.logprob_start_len
