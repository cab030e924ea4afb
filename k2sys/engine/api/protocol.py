"""The one `InferenceEngine` protocol and the request/response types at the process edge.

Both engines (the native one and SGLang) sit behind `InferenceEngine`, and both speak the same
HTTP dialect: SGLang's routes and JSON payloads for the subset we use. Request bodies are parsed
by the pydantic models of api/bodies.py (re-exported here where callers use them); the dataclasses
here are the typed per-request objects, validated at construction (a bad field raises
`ProtocolError` naming the field and the fix), converting to/from SGLang's JSON field names, so
the client, the native server and the adapter share one definition of every payload.

SGLang field names were read from sgl-project/sglang (the copies in our reference index:
`python/sglang/srt/managers/io_struct.py` at commit 001067fffe33 (2026, msgspec structs),
`python/sglang/srt/entrypoints/http_server.py`, `python/sglang/srt/sampling/sampling_params.py`
at 00c17cafcb9e, `python/sglang/srt/weight_sync/tensor_bucket.py`) and cross-checked against
users of sglang 0.5.23 (miles, NeMo-RL). Payloads used:

    /generate                   GenerateReqInput: rid, text | input_ids, sampling_params,
                                return_logprob, stream -> {"text", "output_ids", "meta_info":
                                {"id", "finish_reason": {"type": stop|length|abort, ...},
                                "prompt_tokens", "completion_tokens", "weight_version",
                                "output_token_logprobs": [[logprob, token_id, text|null]]}}
    sampling_params             SamplingParams (api/params.py): SGLang's field names, the whole
                                set the native engine honours (sampling_seed is the seed)
    /release_memory_occupation  ReleaseMemoryOccupationReqInput: tags (None = all)
    /resume_memory_occupation   ResumeMemoryOccupationReqInput: tags
    /update_weights_from_tensor UpdateWeightsFromTensorReqInput: serialized_named_tensors
                                (one base64 string per TP rank), load_format
                                (None | "flattened_bucket"), flush_cache, abort_all_requests,
                                weight_version
    /update_weights_from_distributed, /init_weights_update_group   SGLang-only (NCCL broadcast
                                from the trainer): their payloads live in sglang_adapter.py
    /begin_weight_update, /end_weight_update   sessions from sglang PRs #28710/#28001 (June
                                2026; required by 0.5.23 per docs/FACTS.md): every update_weights_from_*
                                must sit inside one. The io_struct copy we read predates them, so
                                their fields were read from their users (BeginWeightUpdateReqInput
                                has only defaulted fields): we send `{}`.
    /pause_generation           PauseGenerationReqInput: mode abort|retract|in_place (HTTP only)
    /continue_generation        ContinueGenerationReqInput (all defaults)
    /abort_request              AbortReq: rid, abort_all
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

from k2sys.engine.api.api_fields import check_sampling_types, check_token_ids
from k2sys.engine.api.bodies import (LOAD_FORMATS, MEMORY_TAGS, PAUSE_MODES, GenerateBody,  # noqa: F401 - re-exported
                                     UpdateWeightsFromTensorPayload, check_bucket_entries, check_cuda_ipc, validate_tags,
                                     weight_version_of)
from k2sys.engine.api.bodies import fail as _fail
from k2sys.engine.api.params import LogprobOptions, SamplingParams
from k2sys.engine.errors import ProtocolError, RequestError  # noqa: F401 - ProtocolError: re-exported

if TYPE_CHECKING:  # only for annotations: client.py imports this module
    import torch

    from k2sys.ckpt.bucket import FlattenedBucket

FINISH_REASONS = ("stop", "length", "abort")


def _int_list(name: str, value: Any, *, allow_empty: bool) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise _fail(name, f"expected a list of ints, got {type(value).__name__}", "pass token ids as a list")
    out = list(value)
    if out and (set(map(type, out)) != {int} or min(out) < 0):  # C speed for long prompts; the loop names the culprit
        for i, v in enumerate(out):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise _fail(f"{name}[{i}]", f"{str(v)[:40]!r} is not a non-negative int", "token ids are ints >= 0")
    if not out and not allow_empty:
        raise _fail(name, "is empty", "give at least one token")
    return out


def _check_unknown(kind: str, payload: Mapping[str, Any], known: Iterable[str]) -> None:
    extra = sorted(set(payload) - set(known))
    if extra:
        raise _fail(kind, f"unknown field(s) {extra}", f"allowed: {sorted(known)}")


def fit_new_tokens(engine: Any, context_len: int, want: int) -> int:
    """max_new_tokens for a request whose context holds `context_len` tokens: `want`, lowered to what
    the engine's context length leaves (engines refuse prompt + max_new_tokens beyond it, as SGLang
    and OpenAI do); at least 1. Engines that do not say their context length get `want`."""
    ctx = getattr(engine, "max_model_len", None)
    if isinstance(ctx, int) and ctx > context_len:
        want = min(want, ctx - context_len)
    return max(want, 1)


@dataclass(frozen=True, kw_only=True)
class GenerateRequest:
    """One prompt of SGLang's GenerateReqInput: what the client sends, the server parses and the
    in-process engine runs (`submit_kwargs`). A batched /generate body is several of these
    (`parse_body`); the logprob fields keep SGLang's names and meaning (LogprobOptions)."""
    rid: str = field(default_factory=lambda: uuid.uuid4().hex)
    input_ids: tuple[int, ...] | None = None
    text: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    token_ids_logprob: tuple[int, ...] | None = None
    return_text_in_logprobs: bool = False
    extra_key: str | None = None
    cache_salt: str | None = None
    """With extra_key: the prefix-cache namespace (only requests with the same pair share blocks)."""
    fit_context: bool = field(default=True, compare=False)
    """Lower max_new_tokens to what the context leaves (SGLang's default of 128 does); parse_body sets
    False when the client gave max_new_tokens, which is then refused if it does not fit. How the
    engine treats the request, not part of what was asked: equality ignores it."""

    def __post_init__(self) -> None:
        if not isinstance(self.rid, str) or not self.rid:
            raise _fail("rid", f"{str(self.rid)[:60]!r} is not a non-empty string", "omit rid to get a random one")
        if (self.input_ids is None) == (self.text is None):
            raise _fail("input_ids/text", "exactly one must be given", "pass token ids or a prompt string, not both")
        if self.input_ids is not None:
            object.__setattr__(self, "input_ids", tuple(_int_list("input_ids", self.input_ids, allow_empty=False)))
        if self.text is not None and not isinstance(self.text, str):
            raise _fail("text", f"expected a string, got {type(self.text).__name__}", "pass the prompt as str")
        if not isinstance(self.sampling, SamplingParams):
            raise _fail("sampling", f"expected SamplingParams, got {type(self.sampling).__name__}",
                        "build it with SamplingParams(...)")
        if self.token_ids_logprob is not None:
            object.__setattr__(self, "token_ids_logprob",
                               tuple(_int_list("token_ids_logprob", self.token_ids_logprob, allow_empty=True)))
        for name in ("extra_key", "cache_salt"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise _fail(name, f"{str(getattr(self, name))[:60]!r} is not a string", "send a string (or one per prompt)")
        self.logprobs  # noqa: B018 - checks the logprob fields together (they depend on return_logprob)

    @property
    def logprobs(self) -> LogprobOptions:
        return LogprobOptions(return_logprob=self.return_logprob, logprob_start_len=self.logprob_start_len,
                              top_logprobs_num=self.top_logprobs_num, token_ids_logprob=self.token_ids_logprob,
                              return_text_in_logprobs=self.return_text_in_logprobs)

    def submit_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of NativeEngine.submit / submit_many for this request."""
        salt = None if not (self.extra_key or self.cache_salt) else f"{self.extra_key or ''}\x00{self.cache_salt or ''}"
        prompt = {"input_ids": self.input_ids} if self.input_ids is not None else {"text": self.text}
        return {**prompt, "params": self.sampling, "rid": self.rid, "logprobs": self.logprobs, "cache_salt": salt,
                "fit_context": self.fit_context}

    def to_sglang(self, stream: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"rid": self.rid, "sampling_params": self.sampling.to_sglang(),
                               "return_logprob": self.return_logprob, "stream": stream}
        if self.input_ids is not None:
            out["input_ids"] = list(self.input_ids)
        else:
            out["text"] = self.text
        for name, off in _OPTIONAL_FIELDS:  # sent only when set: SGLang versions before them accept the body
            if getattr(self, name) != off:
                value = getattr(self, name)
                out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_sglang(cls, payload: Mapping[str, Any]) -> list[GenerateRequest]:
        """Parse a /generate body (single or batched) into requests; `stream` is read by the caller."""
        return cls.parse_body(payload)[0]

    @classmethod
    def parse_body(cls, body: Mapping[str, Any], *, vocab_size: int | None = None,
                   max_model_len: int | None = None) -> tuple[list[GenerateRequest], bool, bool]:
        """A /generate body -> (one request per prompt, batched, stream): the one parser of
        GenerateReqInput (the server, the in-process engine and tests use it).

        Fields follow SGLang's GenerateReqInput (bodies.GenerateBody, made from api_fields.GENERATE:
        unknown fields and not-implemented ones at a value other than off are a 400); per-prompt fields
        take one value for all prompts or a list with one per prompt. Given vocab_size / max_model_len, token ids are checked against the
        vocabulary and prompts against the context (lengths first, so a huge prompt is refused before
        its tokens are looked at)."""
        if not isinstance(body, Mapping):
            raise _fail("body", f"expected a JSON object, got {type(body).__name__}", "send a JSON object")
        req = GenerateBody.parse(body)
        text, ids = req.text, req.input_ids
        if text is not None:
            batched = isinstance(text, list)
            prompts = text if batched else [text]
            key = "text"
        else:
            if not ids:
                raise RequestError("input_ids: must be a non-empty list of token ids (or a list of such lists)")
            batched = isinstance(ids[0], list)
            prompts = ids if batched else [ids]
            for i, p in enumerate(prompts):
                where = f"input_ids[{i}]" if batched else "input_ids"
                if not isinstance(p, list) or not p:
                    raise RequestError(f"{where}: each prompt must be a non-empty list of ints")
                if max_model_len is not None and len(p) >= max_model_len:
                    raise RequestError(f"{where}: prompt of {len(p)} tokens does not fit max_model_len="
                                       f"{max_model_len}; shorten it")
                if not set(map(type, p)) == {int}:
                    raise RequestError(f"{where}: each prompt must be a non-empty list of ints")
                if vocab_size is not None:
                    check_token_ids(p, where, vocab_size)
            key = "input_ids"
        if batched and not prompts:
            raise _fail(key, "empty batch", "send at least one prompt")
        k = len(prompts)

        def per_prompt(name: str, default: Any, nested: bool = False) -> list:
            """One value per prompt: a list of k values in a batch (for `nested` fields, whose single
            value is itself a list, a list of k lists), else the single value for every prompt."""
            v = getattr(req, name)
            if v is None:
                return [default] * k
            if isinstance(v, list) and (name == "sampling_params" or (batched and (not nested or (v and isinstance(v[0], list))))):
                if len(v) != k:
                    raise RequestError(f"{name}: {len(v)} entries for {k} prompts; send one per prompt or a single value")
                return [default if x is None else x for x in v]
            return [v] * k

        rids = req.rid
        rid_list = [f"{rids}-{i}" for i in range(k)] if isinstance(rids, str) and batched else per_prompt("rid", None)
        for r in rid_list:
            if r is not None and not isinstance(r, str):
                raise RequestError(f"rid: must be a string (a batch: one string, used as a prefix, or one per prompt), "
                                   f"got {str(r)[:60]!r}")
        sps = per_prompt("sampling_params", None)
        for i, sp in enumerate(sps):
            check_sampling_types(sp, "sampling_params" if len(sps) == 1 else f"sampling_params[{i}]")
        stream, text_in_lp = bool(req.stream), bool(req.return_text_in_logprobs)
        lps, starts, tops = per_prompt("return_logprob", False), per_prompt("logprob_start_len", -1), \
            per_prompt("top_logprobs_num", 0)
        token_ids = per_prompt("token_ids_logprob", None, nested=True)
        keys, salts = per_prompt("extra_key", None), per_prompt("cache_salt", None)
        out = []
        for i in range(k):
            if token_ids[i] is not None and vocab_size is not None:
                check_token_ids(token_ids[i], "token_ids_logprob", vocab_size)
            # SGLang's default max_new_tokens (128) stops at the context length; a value the client gave
            # is refused (400) if prompt + max_new_tokens exceeds it, as SGLang does
            fit = sps[i] is None or sps[i].get("max_new_tokens") is None
            out.append(cls(rid=rid_list[i] or uuid.uuid4().hex, sampling=SamplingParams.from_sglang(sps[i]),
                           return_logprob=lps[i], logprob_start_len=starts[i], top_logprobs_num=tops[i],
                           token_ids_logprob=token_ids[i], return_text_in_logprobs=text_in_lp, extra_key=keys[i],
                           cache_salt=salts[i], fit_context=fit, **{key: prompts[i]}))
        return out, batched, stream


# GenerateReqInput fields beyond the ones every body carries, with their "not set" value.
_OPTIONAL_FIELDS = (("logprob_start_len", -1), ("top_logprobs_num", 0), ("token_ids_logprob", None),
                    ("return_text_in_logprobs", False), ("extra_key", None), ("cache_salt", None))


@dataclass(frozen=True, kw_only=True)
class GenerateOutput:
    rid: str
    output_ids: tuple[int, ...] = ()
    text: str = ""
    output_logprobs: tuple[float, ...] | None = None
    """Log-probability of each sampled token under the sampling policy (None unless asked)."""
    finish_reason: str | None = None
    """stop | length | abort; None while a streamed request is still running."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    weight_version: str | None = None
    matched_stop: int | str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_ids", tuple(_int_list("output_ids", list(self.output_ids), allow_empty=True)))
        if self.output_logprobs is not None:
            lps = tuple(float(x) for x in self.output_logprobs)
            if len(lps) != len(self.output_ids):
                raise _fail("output_logprobs", f"has {len(lps)} entries for {len(self.output_ids)} tokens",
                            "send one logprob per output token")
            object.__setattr__(self, "output_logprobs", lps)
        if self.finish_reason is not None and self.finish_reason not in FINISH_REASONS:
            raise _fail("finish_reason", f"{self.finish_reason!r} is unknown", f"use one of {list(FINISH_REASONS)}")
        for name in ("prompt_tokens", "completion_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise _fail(name, f"{v!r} is not an int >= 0", "report token counts as ints")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def to_sglang(self) -> dict[str, Any]:
        reason: dict[str, Any] | None = None
        if self.finish_reason is not None:
            reason = {"type": self.finish_reason}
            if self.finish_reason == "stop" and self.matched_stop is not None:
                reason["matched"] = self.matched_stop
            if self.finish_reason == "length":
                reason["length"] = self.completion_tokens
        meta: dict[str, Any] = {"id": self.rid, "finish_reason": reason, "prompt_tokens": self.prompt_tokens,
                                "completion_tokens": self.completion_tokens, "weight_version": self.weight_version}
        if self.output_logprobs is not None:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(self.output_logprobs, self.output_ids)]
        return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": meta}

    @classmethod
    def from_sglang(cls, item: Mapping[str, Any]) -> GenerateOutput:
        if not isinstance(item, Mapping) or not isinstance(item.get("meta_info"), Mapping):
            raise _fail("meta_info", "missing from the /generate response item",
                        "the server must answer in SGLang's {text, output_ids, meta_info} form")
        meta = item["meta_info"]
        reason = meta.get("finish_reason")
        kind, matched = None, None
        if isinstance(reason, Mapping):
            kind, matched = reason.get("type"), reason.get("matched")
        elif isinstance(reason, str):
            kind = reason
        lps = meta.get("output_token_logprobs")
        ids = item.get("output_ids")
        if ids is None and lps is not None:  # servers started with skip_tokenizer_init omit nothing; others may
            ids = [row[1] for row in lps]
        version = meta.get("weight_version")
        return cls(rid=str(meta.get("id", "")), output_ids=tuple(ids or ()), text=item.get("text") or "",
                   output_logprobs=None if lps is None else tuple(row[0] for row in lps), finish_reason=kind,
                   prompt_tokens=int(meta.get("prompt_tokens") or 0),
                   completion_tokens=int(meta.get("completion_tokens") or len(ids or ())),
                   weight_version=None if version is None else str(version), matched_stop=matched)


@dataclass(frozen=True, kw_only=True)
class PausedRequest:
    """An unfinished trajectory taken out of an engine: enough to continue it with new weights."""
    rid: str
    input_ids: tuple[int, ...]
    """The prompt the request started from."""
    output_ids: tuple[int, ...] = ()
    output_logprobs: tuple[float, ...] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    return_logprob: bool = False
    weight_version: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_ids", tuple(_int_list("input_ids", self.input_ids, allow_empty=False)))
        object.__setattr__(self, "output_ids", tuple(_int_list("output_ids", self.output_ids, allow_empty=True)))
        if self.output_logprobs is not None:
            object.__setattr__(self, "output_logprobs", tuple(float(x) for x in self.output_logprobs))
            if len(self.output_logprobs) != len(self.output_ids):
                raise _fail("output_logprobs", f"has {len(self.output_logprobs)} entries for "
                            f"{len(self.output_ids)} tokens", "keep one logprob per output token")

    @property
    def remaining_tokens(self) -> int:
        return self.sampling.max_new_tokens - len(self.output_ids)

    def resume_request(self, rid: str | None = None) -> GenerateRequest:
        """The request that continues this trajectory from its token prefix (prompt + output so far)."""
        if self.remaining_tokens <= 0:
            raise _fail("output_ids", f"already has {len(self.output_ids)} tokens of max_new_tokens="
                        f"{self.sampling.max_new_tokens}", "treat the trajectory as finished (length)")
        sampling = self.sampling.replace(max_new_tokens=self.remaining_tokens, n=1)
        return GenerateRequest(rid=rid or self.rid, input_ids=self.input_ids + self.output_ids,
                               sampling=sampling, return_logprob=self.return_logprob)

    @classmethod
    def from_output(cls, request: GenerateRequest, output: GenerateOutput) -> PausedRequest:
        if request.input_ids is None:
            raise _fail("input_ids", "the request was given as text", "send token ids to resume from a prefix")
        return cls(rid=output.rid or request.rid, input_ids=request.input_ids, output_ids=output.output_ids,
                   output_logprobs=output.output_logprobs, sampling=request.sampling,
                   return_logprob=request.return_logprob, weight_version=output.weight_version)

    def to_json(self) -> dict[str, Any]:
        return {"rid": self.rid, "input_ids": list(self.input_ids), "output_ids": list(self.output_ids),
                "output_logprobs": None if self.output_logprobs is None else list(self.output_logprobs),
                "sampling_params": self.sampling.to_sglang(), "return_logprob": self.return_logprob,
                "weight_version": self.weight_version}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PausedRequest:
        # finish_reason is accepted and dropped: a paused request is unfinished by definition
        _check_unknown("paused_request", d, ("rid", "input_ids", "output_ids", "output_logprobs",
                                             "sampling_params", "return_logprob", "weight_version", "finish_reason"))
        return cls(rid=d["rid"], input_ids=d["input_ids"], output_ids=d.get("output_ids") or (),
                   output_logprobs=d.get("output_logprobs"), sampling=SamplingParams.from_sglang(d.get("sampling_params")),
                   return_logprob=bool(d.get("return_logprob", False)), weight_version=d.get("weight_version"))


def pause_payload(mode: str) -> dict[str, Any]:
    if mode not in PAUSE_MODES:
        raise _fail("mode", f"{mode!r} is unknown", f"use one of {list(PAUSE_MODES)}")
    return {"mode": mode}


def memory_payload(tags: Iterable[str] | None) -> dict[str, Any]:
    return {"tags": list(validate_tags(tags))}


def abort_payload(rid: str | None) -> dict[str, Any]:
    return {"rid": "", "abort_all": True} if rid is None else {"rid": rid, "abort_all": False}


@runtime_checkable
class InferenceEngine(Protocol):
    """What the coordinator needs from a rollout engine (native or SGLang, in-process or HTTP).

    Weight updates happen inside one session: begin_weight_update -> update_weights (any number
    of calls, HF names, any order) -> end_weight_update, which returns the new version.
    """

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateOutput]: ...

    async def async_generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateOutput]: ...

    def abort(self, rid: str | None = None) -> None: ...

    def pause(self, mode: str = "abort") -> list[PausedRequest]: ...

    def continue_generation(self) -> None: ...

    def release_memory(self, tags: Iterable[str] | None = None) -> None: ...

    def resume_memory(self, tags: Iterable[str] | None = None) -> None: ...

    def begin_weight_update(self) -> None: ...

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]] | Iterable[FlattenedBucket], *,
                       weight_version: str | None = None) -> None: ...

    def end_weight_update(self) -> str | None: ...

    def flush_cache(self) -> None: ...

    def health(self) -> bool: ...

    @property
    def weight_version(self) -> str | None: ...


WeightSource = Callable[[], Iterable[Any]]


def colocated_update(engine: InferenceEngine, weights: Iterable[Any] | WeightSource, *,
                     train_step: Callable[[], Any] | None = None, pause_mode: str = "abort",
                     weight_version: str | None = None) -> tuple[list[PausedRequest], str | None]:
    """One colocated train/rollout switch, in the order SGLang needs (docs/FACTS.md):

    pause -> release(all) -> train_step() -> resume(weights) -> begin -> update(buckets) -> end
    -> resume(kv_cache, cuda_graph) -> flush_cache -> continue.

    Weights come back before the KV cache so the update never has to fit beside a full KV
    pool. `weights` may be a callable so the buckets are produced after training; each item it
    yields is one update call (a FlattenedBucket, a (name, tensor) pair or a list of pairs).
    Returns the paused trajectories and the new weight version. If an update fails the session
    is still closed, and the engine stays paused with its KV cache released: the caller decides
    (retry the update, or resume and continue on the old weights).
    """
    paused = engine.pause(pause_mode)
    engine.release_memory(MEMORY_TAGS)
    if train_step is not None:
        train_step()
    engine.resume_memory(["weights"])
    engine.begin_weight_update()
    try:
        source = weights() if callable(weights) else weights
        for item in source:
            engine.update_weights(_as_update_call(item), weight_version=weight_version)
    finally:
        # close the session even on failure so the engine is not left refusing the next update
        version = engine.end_weight_update()
    engine.resume_memory(["kv_cache", "cuda_graph"])
    engine.flush_cache()
    engine.continue_generation()
    return paused, version


def _as_update_call(item: Any) -> list[Any]:
    """One item of a weight source is one update call: a bucket, one (name, tensor) pair, or a list of pairs."""
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return [item]
    if isinstance(item, (list, tuple)):
        return list(item)
    return [item]

