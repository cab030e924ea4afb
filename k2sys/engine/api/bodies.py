"""Pydantic models of the HTTP request bodies the native server reads, one per body.

    raw bytes --api_fields.read_json (size, UTF-8, depth, number limits)--> dict
              --<Body>.parse--> a frozen, typed model   (or a 400 naming the field and the fix)

Every model forbids unknown fields and is strict (no bool for an int, no string for a number). Its
errors go through params.request_error, so a 400 reads `<body>.<field>: <problem>, got <value>;
<fix>`. Checks that need the engine (token ids against the vocabulary, prompts against the context)
stay in the route, which runs them on the parsed model.

Bodies SGLang and OpenAI define field by field (/generate here; /v1/completions and
/v1/chat/completions in openai_bodies.py) take their field set from the api_fields tables (`table_model`): a model declares the fields it
reads, and the table adds its "no effect" fields (any value) and "off only" fields (only the values
that mean off); a field declared here but missing from the table, or honoured in the table but not
declared here, fails at import, so the tables (and docs/engine_api.md made from them) stay true.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Iterable, Literal, Mapping

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model, field_validator,
                      model_validator)

from k2sys.engine.api.api_fields import GENERATE, NO_EFFECT, OFF_ONLY, FieldSpec, is_off, show
from k2sys.engine.api.params import request_error
from k2sys.engine.errors import ProtocolError, RequestError

__all__ = ["AbortBody", "Body", "ContinueBody", "DetokenizeBody", "EmptyBody", "GenerateBody", "GetWeightsBody",
           "LOAD_FORMATS", "MEMORY_TAGS", "MemoryBody", "PAUSE_MODES", "PauseBody", "TokenizeBody",
           "UpdateWeightsFromShmBody", "UpdateWeightsFromTensorPayload", "WeightSessionBody", "check_bucket_entries",
           "check_cuda_ipc", "fail", "is_int", "off_only", "table_model", "validate_tags", "weight_version_of"]

MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")
PAUSE_MODES = ("abort", "retract", "in_place")
LOAD_FORMATS = (None, "flattened_bucket")


def fail(field_name: str, problem: str, fix: str) -> ProtocolError:
    """The error of a bad payload field: `<field>: <problem>; <fix>` (HTTP 400)."""
    return ProtocolError(f"{field_name}: {problem}; {fix}")


def validate_tags(tags: Iterable[str] | None) -> tuple[str, ...]:
    """Memory tags in canonical order; None means all of them (SGLang's default)."""
    if tags is None:
        return MEMORY_TAGS
    if isinstance(tags, (str, bytes, Mapping)) or not isinstance(tags, Iterable):
        raise fail("tags", f"got {type(tags).__name__} {str(tags)[:40]!r}", "pass a list such as ['kv_cache']")
    got = list(tags)
    bad = [t for t in got if not isinstance(t, str) or t not in MEMORY_TAGS]
    if bad:
        raise fail("tags", f"unknown tag(s) {bad}", f"use a subset of {list(MEMORY_TAGS)}")
    if not got:
        raise fail("tags", "empty list", "pass None for all tags or name at least one")
    return tuple(t for t in MEMORY_TAGS if t in got)





class Body(BaseModel):
    """A request body: strict types, unknown fields refused, frozen once parsed."""
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)
    KIND: ClassVar[str] = "body"
    """The prefix of this body's error messages (its route)."""
    TABLE: ClassVar[bool] = False
    """Fields from an api_fields table (table_model): a 400 for an unknown field points to the docs."""

    @classmethod
    def parse(cls, body: Mapping[str, Any] | None, kind: str | None = None) -> Any:
        """The JSON object of a request -> the model; a RequestError (400) names the first bad field."""
        try:
            return cls.model_validate({} if body is None else body)
        except ValidationError as e:
            raise request_error(e, kind or cls.KIND, None if cls.TABLE else cls.model_fields) from None


def off_only(name: str, spec: FieldSpec, *, per_item: bool = False) -> Any:
    """The type of a field the native engine does not implement: only its "off" values pass (with
    per_item, also a list of them, one per prompt of a batch); any other value is a 400 naming it."""
    def check(v: Any) -> Any:
        if not is_off(v, spec, per_item):
            offs = " or ".join("null" if o is None else repr(o) for o in spec.off)
            note = f" ({spec.note})" if spec.note else ""
            raise RequestError(f"{name}={show(v)} is not supported by the native engine{note}; omit it or send {offs}")
        return v
    return Annotated[Any, BeforeValidator(check)]


def table_model(base: type[Body], table: Mapping[str, FieldSpec], *, per_item: bool = False) -> type[Body]:
    """`base` with the rest of `table`'s fields added: "no effect" ones at any value, "off only" ones
    at their off values. The honoured fields are the ones `base` declares (with their types)."""
    declared = set(base.model_fields)
    missing = sorted(declared - set(table))
    if missing:
        raise TypeError(f"{base.__name__} declares {missing}, which its api_fields table does not list")
    undeclared = sorted(k for k in table if k not in declared and table[k].status not in (NO_EFFECT, OFF_ONLY))
    if undeclared:
        raise TypeError(f"{base.__name__} does not declare the honoured fields {undeclared} of its api_fields table")
    extra: dict[str, Any] = {}
    for key, spec in table.items():
        if key in declared:
            continue
        kind = f"{base.KIND}.{key}"
        extra[key] = (Any, None) if spec.status == NO_EFFECT else (off_only(kind, spec, per_item=per_item), None)
    model = create_model(base.__name__, __base__=base, __module__=base.__module__, **extra)
    model.TABLE = True
    return model


def _strings(name: str) -> Any:
    """A string or a list of strings (one per prompt), refused as one field with one message."""
    def check(v: Any) -> Any:
        if v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)):
            return v
        raise RequestError(f"{name}: must be a string or a list of strings, got {show(v)}; send text")
    return Annotated[str | list[str] | None, BeforeValidator(check)]


# Field types built by off_only / _strings (named here: annotations are strings under `from __future__`).
_SELECTOR = off_only("begin_weight_update.selector", FieldSpec(OFF_ONLY, "all weights are updatable", (None, "all")))
_PROMPT = _strings("prompt")
_TOOL_CHOICE = off_only("tokenize.tool_choice", FieldSpec(OFF_ONLY, "", (None, "auto", "none")))
_REASONING = off_only("tokenize.reasoning_effort", FieldSpec(OFF_ONLY, "", (None,)))
_CONTINUE_FINAL = off_only("tokenize.continue_final_message", FieldSpec(OFF_ONLY, "", (None, False)))
_TEMPLATE_KWARGS = off_only("tokenize.chat_template_kwargs", FieldSpec(OFF_ONLY, "", (None, {})))


def _one_or_per_prompt(name: str, ok: Any, what: str) -> Any:
    """A /generate field that takes one value for every prompt or a list with one per prompt (null
    entries = the default); the lengths are matched to the prompts by GenerateRequest.parse_body."""
    def check(v: Any) -> Any:
        if v is None or ok(v) or (isinstance(v, list) and all(x is None or ok(x) for x in v)):
            return v
        raise RequestError(f"{name}: must be {what} or a list with one per prompt, got {show(v)}; "
                           "send one value for every prompt, or one per prompt")
    return Annotated[Any, BeforeValidator(check)]


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_RID = _one_or_per_prompt("rid", lambda v: isinstance(v, str), "a string (a batch: used as a prefix)")
_SAMPLING = _one_or_per_prompt("sampling_params", lambda v: isinstance(v, dict), "an object")
_FLAGS = _one_or_per_prompt("return_logprob", lambda v: isinstance(v, bool), "true or false")
_START = _one_or_per_prompt("logprob_start_len", is_int, "an int (-1: output tokens only)")
_TOP = _one_or_per_prompt("top_logprobs_num", is_int, "an int >= 0")
_EXTRA_KEY = _one_or_per_prompt("extra_key", lambda v: isinstance(v, str), "a string")
_SALT = _one_or_per_prompt("cache_salt", lambda v: isinstance(v, str), "a string")
_TEXT = _strings("text")


class _GenerateFields(Body):
    """SGLang's GenerateReqInput: the fields the native engine reads. Per-prompt fields take one value
    or one per prompt; the prompts themselves are checked against the vocabulary and the context by
    GenerateRequest.parse_body (they need the engine), lengths first."""
    KIND = "generate"
    rid: _RID = None
    text: _TEXT = None
    input_ids: list[Any] | None = None
    """A list of token ids, or a list of such lists (a batch)."""
    sampling_params: _SAMPLING = None
    """An object (SamplingParams) or one per prompt."""
    return_logprob: _FLAGS = None
    logprob_start_len: _START = None
    top_logprobs_num: _TOP = None
    token_ids_logprob: list[Any] | None = None
    """Token ids, or a list with one list per prompt."""
    return_text_in_logprobs: bool | None = None
    stream: bool | None = None
    extra_key: _EXTRA_KEY = None
    cache_salt: _SALT = None
    return_prompt_token_ids: bool | None = None

    @model_validator(mode="after")
    def _one_prompt_kind(self) -> _GenerateFields:
        if (self.text is None) == (self.input_ids is None):
            raise fail("input_ids/text", "exactly one must be given", "send token ids or a prompt string")
        return self


GenerateBody = table_model(_GenerateFields, GENERATE, per_item=True)
"""The /generate body: every field of api_fields.GENERATE, nothing else."""


# ---- SGLang's control routes ---------------------------------------------------------------------
class PauseBody(Body):
    """/pause_generation (PauseGenerationReqInput)."""
    KIND = "pause_generation"
    mode: Literal["abort", "retract", "in_place"] = "abort"
    """abort: running requests end (their prefixes come back in paused_requests); retract / in_place: they wait."""


class ContinueBody(Body):
    """/continue_generation (ContinueGenerationReqInput: all fields defaulted). Any object is accepted,
    as SGLang does: its fields (none of which the native engine needs) vary between versions."""
    model_config = ConfigDict(extra="ignore")
    KIND = "continue_generation"


class AbortBody(Body):
    """/abort_request (AbortReq): a rid, or abort_all=true."""
    KIND = "abort_request"
    rid: str | None = None
    """"" is no rid, as in SGLang."""
    abort_all: bool | None = None
    finished_reason: dict[str, Any] | None = None
    """Accepted for SGLang clients; aborted requests finish with {"type": "abort"}."""
    abort_message: str | None = None

    @model_validator(mode="after")
    def _target(self) -> AbortBody:
        if not self.abort_all and not self.rid:
            raise RequestError("abort_request.rid/abort_all: neither is given; send a rid, or abort_all=true")
        return self


class MemoryBody(Body):
    """/release_memory_occupation and /resume_memory_occupation: tags (null = all)."""
    KIND = "memory_occupation"
    tags: list[str] | None = None

    @field_validator("tags")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else list(validate_tags(v))


class EmptyBody(Body):
    """/end_weight_update and /abort_weight_update: no fields."""
    KIND = "weight_update"


class WeightSessionBody(Body):
    """/begin_weight_update (BeginWeightUpdateReqInput): every update replaces whole tensors."""
    KIND = "begin_weight_update"
    selector: _SELECTOR = None


class GetWeightsBody(Body):
    """/get_weights_by_name: the first truncate_size values of one HF parameter."""
    KIND = "get_weights_by_name"
    name: str
    """An HF parameter name."""
    truncate_size: Annotated[int, Field(ge=1)] | None = None
    """null = 100."""

    @property
    def size(self) -> int:
        return 100 if self.truncate_size is None else self.truncate_size


class TokenizeBody(Body):
    """/tokenize: {prompt: str | [str]} or {messages, tools} (SGLang's TokenizeReqInput)."""
    KIND = "tokenize"
    model: Any = None
    """One model is served: any name is accepted."""
    prompt: _PROMPT = None
    messages: Any = None
    """Checked by openai_api.normalize_messages (roles, content parts)."""
    tools: Any = None
    """Checked by openai_api.check_tools."""
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    tool_choice: _TOOL_CHOICE = None
    reasoning_effort: _REASONING = None
    continue_final_message: _CONTINUE_FINAL = None
    chat_template_kwargs: _TEMPLATE_KWARGS = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeBody:
        if (self.prompt is None) == (self.messages is None):
            raise RequestError("tokenize.prompt/messages: exactly one must be given; send a prompt or messages")
        return self


class DetokenizeBody(Body):
    """/detokenize: {tokens: [int] | [[int]], skip_special_tokens}; the ids are checked against the
    vocabulary by the route (api_fields.check_token_ids)."""
    KIND = "detokenize"
    model: Any = None
    tokens: list[Any]
    skip_special_tokens: bool | None = None

    @property
    def batched(self) -> bool:
        return bool(self.tokens) and isinstance(self.tokens[0], list)


# ---- weight updates --------------------------------------------------------------------------------
class UpdateWeightsFromTensorPayload(Body):
    """/update_weights_from_tensor (SGLang's UpdateWeightsFromTensorReqInput): what the client sends
    and the server parses (`parse`, a 400 naming the field); `to_sglang()` is the JSON body."""
    KIND = "update_weights_from_tensor"
    serialized_named_tensors: tuple[str, ...]
    """One base64 payload per TP rank (SGLang); a single entry is used by every rank."""
    load_format: Literal["flattened_bucket"] | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    disable_draft_model: bool | None = None
    """SGLang fields with no meaning here (no draft model; the allocator is the engine's): accepted as bools."""
    torch_empty_cache: bool | None = None

    def __init__(self, **data: Any) -> None:  # Python callers get the same RequestError as HTTP ones
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise request_error(e, type(self).KIND, type(self).model_fields) from None

    @classmethod
    def parse(cls, body: Mapping[str, Any] | None, kind: str | None = None) -> Any:
        return cls(**dict(body or {}))

    @field_validator("serialized_named_tensors", mode="before")
    @classmethod
    def _tensors(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)) and v and all(isinstance(s, str) and s for s in v):
            return tuple(v)
        raise fail("serialized_named_tensors", f"must be a non-empty list of base64 strings, got {show(v)}",
                   "serialize with serialize_named_tensors() or FlattenedBucket.serialize() (one per TP rank)")

    @field_validator("load_format", mode="before")
    @classmethod
    def _format(cls, v: Any) -> Any:
        if v not in LOAD_FORMATS:
            raise fail("load_format", f"{show(v)} is unsupported", f"use one of {list(LOAD_FORMATS)}")
        return v

    @field_validator("flush_cache", "abort_all_requests", mode="before")
    @classmethod
    def _null_is_default(cls, v: Any, info: Any) -> Any:
        return cls.model_fields[info.field_name].default if v is None else v

    @field_validator("weight_version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        return weight_version_of(v)

    def to_sglang(self) -> dict[str, Any]:
        return {"serialized_named_tensors": list(self.serialized_named_tensors), "load_format": self.load_format,
                "flush_cache": self.flush_cache, "abort_all_requests": self.abort_all_requests,
                "weight_version": self.weight_version}

    @classmethod
    def from_sglang(cls, d: Mapping[str, Any]) -> UpdateWeightsFromTensorPayload:
        return cls.parse(d)


def weight_version_of(v: Any) -> str | None:
    """A weight_version field: a string (an int is taken as its decimal string) or null."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    raise fail("weight_version", f"{str(v)[:40]!r} ({type(v).__name__}) is not a version", "send a string or null")


_ENTRY_DTYPES = ("float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2", "int8", "uint8",
                 "int16", "int32", "int64", "bool")
_MAX_DIMS = 8


def check_bucket_entries(entries: Any, buffer_bytes: int | None = None, field_name: str = "entries") -> None:
    """Bucket metadata from a client ({name, dtype, shape, offset} per tensor), checked before any of
    it is used: names unique non-empty strings, a known dtype, a shape of at most 8 dims of ints >= 0,
    an int offset aligned for the dtype, and (given buffer_bytes) every tensor inside the buffer."""
    if not isinstance(entries, (list, tuple)) or not entries:
        raise fail(field_name, "must be a non-empty list of {name, dtype, shape, offset}",
                    "build it with FlattenedBucket / ShmSegment.write")
    seen: set[str] = set()
    sizes = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1,
             "int8": 1, "uint8": 1, "int16": 2, "int32": 4, "int64": 8, "bool": 1}
    for i, e in enumerate(entries):
        where = f"{field_name}[{i}]"
        if not isinstance(e, Mapping):
            raise fail(where, f"got {type(e).__name__}", "each entry is {name, dtype, shape, offset}")
        extra = sorted(str(k)[:40] for k in set(e) - {"name", "dtype", "shape", "offset"})
        if extra:
            raise fail(where, f"unknown field(s) {extra}", "each entry is {name, dtype, shape, offset}")
        name, dtype, shape, offset = e.get("name"), e.get("dtype"), e.get("shape"), e.get("offset")
        if not isinstance(name, str) or not name or len(name) > 512:
            raise fail(f"{where}.name", f"{str(name)[:40]!r} is not a tensor name", "send the HF parameter name")
        if name in seen:
            raise fail(f"{where}.name", f"{name!r} appears twice", "send each tensor once per bucket")
        seen.add(name)
        if dtype not in _ENTRY_DTYPES:
            raise fail(f"{where}.dtype", f"{str(dtype)[:40]!r} is not supported", f"use one of {list(_ENTRY_DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
                or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 40 for x in shape)):
            raise fail(f"{where}.shape", f"{str(shape)[:40]!r} is not a shape",
                        f"send a list of at most {_MAX_DIMS} ints >= 0")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or offset % sizes[dtype]:
            raise fail(f"{where}.offset", f"{str(offset)[:40]!r} is not a byte offset aligned for {dtype}",
                        f"send an int >= 0, a multiple of {sizes[dtype]}")
        nbytes = math.prod(shape) * sizes[dtype]
        if buffer_bytes is not None and offset + nbytes > buffer_bytes:
            raise fail(f"{where}", f"bytes [{offset}, {offset + nbytes}) of {name!r} are outside the "
                        f"{buffer_bytes}-byte buffer", "send the buffer's real size and offsets")


_IPC_FIELDS = {"size": "ints", "stride": "ints", "offset": int, "dtype": str, "device": int, "handle": str,
               "storage_size_bytes": int, "storage_offset_bytes": int, "ref_counter_handle": str,
               "ref_counter_offset": int, "event_handle": (str, type(None)), "event_sync_required": bool}


def check_cuda_ipc(h: Any) -> None:
    """The JSON fields of a CUDA IPC handle (k2sys.engine.transport.shm.cuda_ipc_handle), types only."""
    if not isinstance(h, Mapping):
        raise fail("cuda_ipc", f"got {type(h).__name__}", "send the object k2sys.engine.transport.shm.cuda_ipc_handle makes")
    for name, kind in _IPC_FIELDS.items():
        v = h.get(name)
        if kind == "ints":
            ok = isinstance(v, list) and len(v) <= _MAX_DIMS and all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 48 for x in v)
        elif kind is int:
            ok = isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 48
        else:
            ok = isinstance(v, kind)
        if not ok:
            raise fail(f"cuda_ipc.{name}", f"{str(v)[:40]!r} is missing or of the wrong type",
                        "build the handle with k2sys.engine.transport.shm.cuda_ipc_handle")
    if h["dtype"] not in _ENTRY_DTYPES:
        raise fail("cuda_ipc.dtype", f"{h['dtype'][:40]!r} is not supported", f"use one of {list(_ENTRY_DTYPES)}")


class UpdateWeightsFromShmBody(Body):
    """/update_weights_from_shm (one bucket; k2sys.engine.transport.shm.ShmUpdatePayload is what the
    reader applies): every field and entry is checked here, before the segment is opened."""
    KIND = "update_weights_from_shm"
    entries: list[Any]
    """{name, dtype, shape, offset} per tensor (check_bucket_entries)."""
    transport: Literal["shm", "cuda_ipc"] = "shm"
    shm_name: str | None = None
    shm_size: Annotated[int, Field(ge=1)] | None = None
    """The segment's size in bytes (transport shm)."""
    cuda_ipc: dict[str, Any] | None = None
    """A CUDA IPC handle (transport cuda_ipc; check_cuda_ipc)."""
    weight_version: str | None = None
    release: bool | None = None
    """Unmap the segment after this bucket (null = true)."""

    @field_validator("weight_version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        return weight_version_of(v)

    @model_validator(mode="after")
    def _buffers(self) -> UpdateWeightsFromShmBody:
        if self.transport == "cuda_ipc" or self.cuda_ipc is not None:
            check_cuda_ipc(self.cuda_ipc)
        check_bucket_entries(self.entries, (self.shm_size or 0) if self.transport == "shm" else None)
        return self

    def payload_json(self) -> dict[str, Any]:
        """The fields the client set, as ShmUpdatePayload.from_json reads them."""
        return self.model_dump(exclude_none=True)
