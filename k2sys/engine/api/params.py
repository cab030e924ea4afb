"""The per-request parameters every layer shares: `SamplingParams` and `LogprobOptions`.

One `SamplingParams` serves the client, the rollout and agent code, the HTTP server and the
engine's sampler: SGLang 0.5.23's `sampling_params` field names (`sampling_seed`, not `seed`), so
`to_sglang()` is a dict a real SGLang `/generate` accepts and `from_sglang()` parses one. It is a
pydantic model (strict types: no bool for an int, no string for a number) whose errors are a
`RequestError` naming the field and the fix (`sampling_params.top_p: ...`), the HTTP 400 message.

This module imports nothing of the engine but errors.py, so api/ and core/ both import it.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from k2sys.engine.errors import RequestError

__all__ = ["GREEDY_EPS", "LogprobOptions", "SamplingParams", "request_error"]

GREEDY_EPS = 1e-6
"""Temperatures below this are greedy (SGLang: temperature < 1e-6 means top_k = 1)."""

# SGLang `sampling_params` fields the native engine does not implement: accepted only at the value
# that means "off" (SGLang 0.5.23 SamplingParams); any other value is a 400 that names the field.
OFF_ONLY = {"beam_width": (None, 1), "watermark": (None,), "custom_params": (None, {}), "structural_tag": (None, "")}

# The fix a client needs for each kind of pydantic type error (pydantic's own text says only what is wrong).
_FIXES = {"int_type": "send an integer", "int_from_float": "send an integer", "float_type": "send a number",
          "finite_number": "send a finite number", "bool_type": "send true or false",
          "string_type": "send a string", "list_type": "send a list", "dict_type": "send an object",
          "missing": "this field is required", "model_type": "send an object",
          "literal_error": "use one of the values listed", "tuple_type": "send a list",
          "greater_than_equal": "send a larger value", "less_than_equal": "send a smaller value"}


def request_error(e: ValidationError, prefix: str = "", known: Any = None) -> RequestError:
    """A pydantic ValidationError -> the RequestError (HTTP 400) naming the first bad field (its
    location joined with '.') and the fix. Our own validators' RequestErrors come back unchanged."""
    err = e.errors(include_url=False)[0]
    ctx_err = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_err, RequestError):
        return ctx_err
    where = ".".join(str(x) for x in (prefix, *err["loc"]) if x != "")
    if err["type"] == "missing":
        return RequestError(f"{where}: missing; this field is required")
    if err["type"] == "extra_forbidden":
        fields = f"; known fields are {sorted(known)}" if known is not None else \
            f"; docs/engine_api.md lists the fields of {prefix or 'this body'}"
        return RequestError(f"{where}: unknown field{fields}")
    shown = repr(err.get("input"))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    msg = str(ctx_err) if ctx_err is not None else err["msg"]
    return RequestError(f"{where}: {msg}, got {shown}; {_FIXES.get(err['type'], 'see docs/engine_api.md')}")


class SamplingParams(BaseModel):
    """SGLang 0.5.23 `sampling_params`, the fields the native engine honours (docs/engine_api.md).

    Logits of one row go through, in this order: repetition_penalty (HF: over prompt + output
    tokens, x*p if x < 0 else x/p), frequency/presence penalties (OpenAI: minus f*count - p*[count>0]
    over output tokens), logit_bias (added), min_new_tokens / grammar masks (-inf), then temperature,
    then top-k / top-p / min-p. Every step is per row, so a row's tokens do not depend on its batch.
    Frozen (one object may be shared by many requests): `replace(**changes)` makes a checked copy.
    """
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)

    max_new_tokens: int = 128
    """0 = prefill only (e.g. for prompt log-probs)."""
    temperature: float = 1.0
    """0 (or < 1e-6) = greedy (then top_p/top_k/min_p are irrelevant)."""
    top_p: float = 1.0
    top_k: int = -1
    """-1 = the whole vocabulary."""
    min_p: float = 0.0
    n: int = 1
    """Samples per prompt; the engine shares the prompt's KV between them."""
    stop: list[str] = []
    stop_token_ids: list[int] = []
    stop_regex: list[str] = []
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

    def __init__(self, **data: Any) -> None:
        if "seed" in data:  # the protocol's name before SGLang's was adopted: still accepted, as from_sglang does
            seed = data.pop("seed")
            if data.get("sampling_seed") is not None and seed is not None:
                raise RequestError("sampling_params: give seed or sampling_seed (the same field), not both")
            if data.get("sampling_seed") is None:
                data["sampling_seed"] = seed
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise request_error(e, "sampling_params", _NAMES) from None

    # ---- normalization of what SGLang and Python callers send (before the type checks) --------------
    @field_validator("stop", "stop_regex", mode="before")
    @classmethod
    def _strings(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [v]
        return list(v) if isinstance(v, tuple) else ([] if v is None else v)

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _ids(cls, v: Any) -> Any:
        if isinstance(v, (set, frozenset)):
            return sorted(v)
        return list(v) if isinstance(v, tuple) else ([] if v is None else v)

    @field_validator("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
                     mode="before")
    @classmethod
    def _number(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_keys(cls, v: Any) -> Any:
        if not isinstance(v, Mapping):
            return v
        out = {}
        for k, b in v.items():
            ok = k.isdigit() if isinstance(k, str) else isinstance(k, int) and not isinstance(k, bool) and k >= 0
            if not ok:
                raise RequestError(f"sampling_params.logit_bias: key {str(k)[:40]!r} is not a token id >= 0; "
                                   "send {\"<token id>\": bias}")
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b):
                raise RequestError(f"sampling_params.logit_bias: value for token {k} must be a finite number, "
                                   f"got {str(b)[:40]!r}")
            out[int(k)] = float(b)
        return out or None

    @field_validator("regex", "json_schema", "ebnf", mode="before")
    @classmethod
    def _grammar(cls, v: Any) -> Any:
        return None if v == "" else v  # SGLang: an empty grammar means unset

    @model_validator(mode="after")
    def _ranges(self) -> SamplingParams:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise RequestError(f"sampling_params.{name}: {msg}")

        need(self.max_new_tokens >= 0, "max_new_tokens", f"must be an int >= 0, got {self.max_new_tokens}")
        need(self.temperature >= 0, "temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        need(0 < self.top_p <= 1, "top_p", f"must be in (0, 1] (1 = off), got {self.top_p}")
        need(self.top_k == -1 or self.top_k >= 1, "top_k", f"must be -1 (off) or >= 1, got {self.top_k}")
        need(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1] (0 = off), got {self.min_p}")
        need(self.n >= 1, "n", f"must be an int >= 1 (samples per prompt), got {self.n}")
        need(self.min_new_tokens >= 0, "min_new_tokens", f"must be an int >= 0, got {self.min_new_tokens}")
        need(self.min_new_tokens <= self.max_new_tokens, "min_new_tokens",
             f"must be <= max_new_tokens ({self.max_new_tokens}), got {self.min_new_tokens}")
        for i, s in enumerate(self.stop):
            need(s != "", f"stop[{i}]", "stop strings must be non-empty")
        for i, t in enumerate(self.stop_token_ids):
            need(t >= 0, f"stop_token_ids[{i}]", f"token ids are ints >= 0, got {t}")
        for i, pattern in enumerate(self.stop_regex):
            need(pattern != "", f"stop_regex[{i}]", "must be a non-empty string")
            try:
                re.compile(pattern)
            except re.error as e:
                need(False, f"stop_regex[{i}]", f"{pattern[:80]!r} is not a valid regular expression ({e})")
        need(self.sampling_seed is None or -2**63 <= self.sampling_seed < 2**63, "sampling_seed",
             f"must be a 64-bit int or null, got {self.sampling_seed}")
        need(-2 <= self.frequency_penalty <= 2, "frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        need(-2 <= self.presence_penalty <= 2, "presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        need(self.repetition_penalty > 0, "repetition_penalty", f"must be > 0 (1 = off), got {self.repetition_penalty}")
        grammars = [g for g in ("regex", "json_schema", "ebnf") if getattr(self, g) is not None]
        need(len(grammars) <= 1, "/".join(grammars), "only one of regex, json_schema, ebnf can be set")
        need(self.stream_interval is None or self.stream_interval >= 1, "stream_interval",
             f"must be an int >= 1 or null, got {self.stream_interval}")
        return self

    # ---- what the sampler asks --------------------------------------------------------------------
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

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with `changes`, validated like a new object (pydantic's model_copy would not check them)."""
        return type(self)(**{**self.model_dump(), **changes})

    # ---- SGLang's JSON -------------------------------------------------------------------------------
    def to_sglang(self) -> dict[str, Any]:
        """The `sampling_params` dict SGLang's /generate accepts: the five fields every request sets,
        plus every other field that is not at its default (logit_bias keys as strings, as in JSON)."""
        out: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                               "top_p": self.top_p, "top_k": self.top_k, "n": self.n}
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if name in out or value == info.get_default(call_default_factory=True):
                continue
            out[name] = {str(k): v for k, v in value.items()} if name == "logit_bias" else \
                list(value) if isinstance(value, list) else value
        return out

    @classmethod
    def from_sglang(cls, d: Mapping[str, Any] | None) -> SamplingParams:
        """Parse an SGLang `sampling_params` dict (`seed` is accepted as `sampling_seed`).

        null means the default (as SGLang treats it); fields SGLang defines that the native engine
        does not implement are accepted only at their "off" value; unknown fields are a 400."""
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise RequestError(f"sampling_params: must be an object, got {type(d).__name__}; send a JSON object")
        d = dict(d)
        if "seed" in d:
            seed = d.pop("seed")
            if d.get("sampling_seed") is not None and seed is not None:
                raise RequestError("sampling_params: give seed or sampling_seed, not both")
            if d.get("sampling_seed") is None:
                d["sampling_seed"] = seed
        for key in [k for k in d if k in OFF_ONLY]:
            value = d.pop(key)
            if value not in OFF_ONLY[key]:
                raise RequestError(f"sampling_params.{key}={str(value)[:60]!r} is not supported by the native engine; "
                                   f"omit it or send {OFF_ONLY[key][0]!r}")
        return cls(**{k: v for k, v in d.items() if v is not None})  # null = default, as SGLang treats it


_NAMES = set(SamplingParams.model_fields) | set(OFF_ONLY) | {"seed"}


class LogprobOptions(BaseModel):
    """What log-probabilities a request returns (SGLang GenerateReqInput's logprob fields).

    logprob_start_len: -1 = output tokens only; k >= 0 = also the prompt tokens from position k
    (input_token_logprobs; the first of them has no logprob, None, as in SGLang). Prompt log-probs
    are the model's log-softmax (temperature 1, no penalties); output ones are those of the
    distribution the token was sampled from (after penalties and biases, divided by temperature).
    Strict and frozen like SamplingParams; a bad field is a RequestError naming it.
    """
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, use_attribute_docstrings=True)

    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    token_ids_logprob: tuple[int, ...] | None = None
    return_text_in_logprobs: bool = False

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise request_error(e, "", type(self).model_fields) from None

    @field_validator("token_ids_logprob", mode="before")
    @classmethod
    def _ids(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    @model_validator(mode="after")
    def _ranges(self) -> LogprobOptions:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise RequestError(f"{name}: {msg}")

        need(self.logprob_start_len >= -1, "logprob_start_len",
             f"must be -1 (output only) or a prompt position >= 0, got {self.logprob_start_len}")
        need(self.top_logprobs_num >= 0, "top_logprobs_num", f"must be an int >= 0, got {self.top_logprobs_num}")
        ids = self.token_ids_logprob
        need(ids is None or all(t >= 0 for t in ids), "token_ids_logprob", f"must be a list of token ids >= 0, got {ids!r}")
        if not self.return_logprob:
            for name, off in (("logprob_start_len", -1), ("top_logprobs_num", 0), ("token_ids_logprob", None)):
                need(getattr(self, name) == off or (name == "token_ids_logprob" and not getattr(self, name)), name,
                     f"{getattr(self, name)!r} needs return_logprob=true (log-probs are returned only then)")
        return self

    def input_start(self, prompt_len: int) -> int | None:
        """First prompt position whose token is reported in input_token_logprobs, or None."""
        if not self.return_logprob or self.logprob_start_len < 0:
            return None
        if self.logprob_start_len > prompt_len:
            raise RequestError(f"logprob_start_len: {self.logprob_start_len} is past the prompt ({prompt_len} tokens); "
                               "use a smaller value or -1")
        return self.logprob_start_len
