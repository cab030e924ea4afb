"""`NativeEngine`: the embedded inference engine behind the `InferenceEngine` protocol.

    callers (any thread) --submit / control commands--> scheduler thread (owns all state)
        loop: run queued commands -> scheduler.step() -> listeners push outputs to callers

Every state change (new request, abort, pause, memory release, applying a weight update) runs
on the scheduler thread between two forward steps, so no lock guards the model or the cache.
Weight updates are staged by the caller's thread (validated and copied aside) and applied all
at once by `end_weight_update`: a bad name, shape or dtype leaves the old weights in use
(the session protocol: weight_update.py, a mixin of NativeEngine).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from k2sys.engine.api.protocol import PAUSE_MODES, GenerateOutput, GenerateRequest, PausedRequest, validate_tags
from k2sys.engine.core.config import EngineConfig, EngineError, LogprobOptions, RequestError, SamplingParams
from k2sys.engine.core.kv_cache import PagedLatentCache
from k2sys.engine.core.model_runner import ModelRunner
from k2sys.engine.core.scheduler import Request, Scheduler, Sequence as Seq
from k2sys.engine.core.weight_update import Session, WeightUpdates
from k2sys.models import K2Config, K2ForCausalLM, param_shapes

__all__ = ["NativeEngine", "RequestHandle"]

log = logging.getLogger(__name__)
_PAUSED_KEYS = ("rid", "input_ids", "output_ids", "output_logprobs", "sampling_params", "return_logprob",
                "weight_version")
_LONG_TEXT = 1 << 16
"""Characters from which encode() tokenizes with the GIL released."""
MAX_TOP_K = 1 << 30
"""Largest top_k (SGLang's own value for "the whole vocabulary")."""
MAX_N = 1 << 16
"""Most samples of one prompt (a request forks into n sequences at the end of its prefill)."""
MAX_LOGIT_BIAS = 1e20
"""|logit_bias| bound: larger biases overflow float32 logits (inf, NaN) once divided by the temperature."""
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RequestHandle:
    """A submitted request: blocking `result()`, or `updates` (a queue of (sample_idx, output dict,
    finished) tuples; None marks the end) for streaming."""
    request: Request
    engine: "NativeEngine"
    done: threading.Event = field(default_factory=threading.Event)
    outputs: dict[int, dict] = field(default_factory=dict)
    updates: "queue.Queue[tuple[int, dict, bool] | None]" = field(default_factory=queue.Queue)
    on_update: Callable[[int, dict, bool], None] | None = None
    _callbacks: list[Callable[[], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _listen(self, seq: Seq, finished: bool) -> None:
        out = self.engine._output(seq)
        self.outputs[seq.sample_idx] = out
        if self.on_update is not None:
            self.on_update(seq.sample_idx, out, finished)
        self.updates.put((seq.sample_idx, out, finished))
        if self.request.finished:
            with self._lock:
                self.done.set()
                callbacks, self._callbacks = self._callbacks, []
            self.updates.put(None)
            for cb in callbacks:
                cb()

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        """Call `fn()` once every sample has finished (at once if they have; else on the scheduler thread)."""
        with self._lock:
            if not self.done.is_set():
                self._callbacks.append(fn)
                return
        fn()

    def result(self, timeout: float | None = None) -> list[dict]:
        """SGLang-shaped outputs, one per sample, once every sample has finished."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.request.rid!r} not finished after {timeout} s")
        return [self.outputs[i] for i in sorted(self.outputs)]

    def stream(self) -> Iterator[tuple[int, dict, bool]]:
        while (item := self.updates.get()) is not None:
            yield item


def _resolve(fut: "asyncio.Future") -> None:
    if not fut.done():
        fut.set_result(None)


class NativeEngine(WeightUpdates):
    def __init__(self, state_dict: dict[str, torch.Tensor], model_config: K2Config,
                 config: EngineConfig | None = None, tokenizer: Any = None, model_path: str | None = None):
        self.config = config = (config or EngineConfig()).resolved()  # device=auto decided here
        self.model_config, self.tokenizer, self.model_path = model_config, tokenizer, model_path
        dtype = _DTYPES[config.dtype or model_config.torch_dtype]
        self.max_model_len = config.max_model_len or model_config.max_position_embeddings
        self.runner = ModelRunner(model_config, state_dict, dtype, config.device, max_positions=self.max_model_len,
                                  moe_kernels=config.moe_kernels, quantization=config.quantization)
        self.cache = PagedLatentCache(model_config.num_hidden_layers, config.num_blocks, config.block_size,
                                      model_config.kv_lora_rank, model_config.qk_rope_head_dim, dtype, config.device)
        self.scheduler = Scheduler(config, self.runner, self.cache, self.max_model_len, model_config.eos_token_id,
                                   self._detokenize if tokenizer is not None else None)
        self.version = 0
        self._weight_version: str = "0"
        self._released: set[str] = set()
        self._stale: set[str] = set()
        self._session: Session | None = None  # the open weight update (weight_update.py)
        self.last_update: dict[str, Any] = {}
        """Copy figures of the last applied weight update (bytes_copied by the engine, tensors
        written in place / staged); in stats() and the server's /get_server_info."""
        self._session_lock = threading.Lock()
        self.weight_update_timeout_s: float | None = None
        """An open weight update session no call has used for this long is discarded (its sender is
        gone), so it cannot block later updates; None = never (`k2sys serve` sets it)."""
        self._expired: str | None = None
        self._paused: str | None = None
        self._commands: list[tuple[Callable[[], Any], Future]] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._draining = False
        self._thread = threading.Thread(target=self._loop, name="k2sys-engine", daemon=True)
        self._thread.start()

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, config: EngineConfig | None = None, **overrides: Any) -> "NativeEngine":
        """Load an HF DeepseekV3/Kimi-K2 checkpoint directory (+ its tokenizer when present).

        FP8 block-scaled release checkpoints are dequantized exactly, or kept in FP8 (weights +
        weight_scale_inv, the release layout) when the engine serves FP8 (config.quantization="fp8")."""
        from k2sys.models.checkpoint import HFCheckpoint

        if config is None:
            config = EngineConfig(**overrides)
        path = Path(path)
        ckpt = HFCheckpoint(path, _DTYPES[config.dtype] if config.dtype else None)
        try:
            cfg = ckpt.config
            if getattr(config, "quantization", "none") == "fp8" and ckpt.has_fp8:
                state = ckpt.raw_state_dict()
            else:
                state = ckpt.state_dict()  # model tensors only: MTP layers are dropped
        finally:
            ckpt.close()
        tokenizer = None
        if (path / "tokenizer.json").exists() or (path / "tiktoken.model").exists():
            from k2sys.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(path)
        return cls(state, cfg, config, tokenizer, model_path=str(path))

    @classmethod
    def from_model(cls, model: K2ForCausalLM, config: EngineConfig | None = None, tokenizer: Any = None) -> "NativeEngine":
        state = {k: v for k, v in model.state_dict().items() if k in param_shapes(model.config)}
        return cls(state, model.config, config, tokenizer)

    # ---- the scheduler thread ------------------------------------------------------------------
    def _can_step(self) -> bool:
        return self._paused is None and not self._released and self.scheduler.has_work()

    def _loop(self) -> None:
        if self.runner.device.type == "cpu" and self.config.cpu_threads is not None:
            torch.set_num_threads(self.config.cpu_threads)
        while True:
            with self._cv:
                while not self._commands and not self._can_step() and not self._stopping:
                    if self.runner.packs_pending:
                        break
                    self._cv.wait()
                commands, self._commands = self._commands, []
                stopping = self._stopping
            if not commands and not stopping and not self._can_step() and self.runner.packs_pending:
                # idle after a weight update: rebuild one deferred packed copy, then look for work
                # again (a step packs any it needs itself; release_memory drops the rest)
                self.runner.pack_pending(1)
                continue
            for fn, fut in commands:
                try:
                    fut.set_result(fn())
                except BaseException as e:  # the caller gets the error; the loop keeps serving
                    fut.set_exception(e)
            if stopping and not commands:
                return
            if self._can_step():
                if self._stale:
                    self.scheduler.abort(None, f"weights are stale ({len(self._stale)} tensors released and not "
                                               "updated since); run a weight update session first")
                    continue
                try:
                    self.scheduler.step()
                except Exception as e:
                    log.exception("engine step failed; aborting in-flight requests")
                    self.scheduler.abort(None, f"engine error: {type(e).__name__}: {e}")

    def _call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        if threading.current_thread() is self._thread:
            return fn()
        fut: Future = Future()
        with self._cv:
            if self._stopping and not self._thread.is_alive():
                raise EngineError("engine is shut down")
            self._commands.append((fn, fut))
            self._cv.notify()
        return fut.result(timeout)

    def begin_shutdown(self, message: str = "server shutting down") -> None:
        """Abort everything in flight without waiting (safe from a signal handler)."""
        with self._cv:
            self._draining = True
            self._commands.append((lambda: self.scheduler.abort(None, message), Future()))
            self._cv.notify()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort everything in flight (callers get finish_reason abort) and stop the thread."""
        if not self._thread.is_alive():
            return
        try:
            self._call(lambda: self.scheduler.abort(None, "server shutting down"), timeout)
        finally:
            with self._cv:
                self._stopping = True
                self._cv.notify()
            self._thread.join(timeout)

    # ---- tokenizer ---------------------------------------------------------------------------
    def _detokenize(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("text: this model has no tokenizer.json; send input_ids instead")
        if len(text) >= _LONG_TEXT and hasattr(self.tokenizer, "encode_batch"):
            # the same ids; Hugging Face tokenizers' encode_batch releases the GIL (encode holds it), so a
            # long prompt tokenized on a worker thread does not stall the server's event loop
            return list(self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def max_token_bytes(self) -> int:
        """Bytes of the longest vocabulary token: a text of B bytes has at least B / this many tokens."""
        n = self.__dict__.get("_max_token_bytes")
        if n is None:
            try:
                longest = max((len(self.token_bytes(t)) for t in range(self.model_config.vocab_size)), default=1)
            except Exception:  # noqa: BLE001 - token bytes unknown for this tokenizer: a safe bound
                longest = 1024
            n = self.__dict__["_max_token_bytes"] = max(longest, 32)  # added/special tokens may be longer still
        return n

    def detokenize(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self.tokenizer is None:
            raise RequestError("tokens: this model has no tokenizer; text is not available")
        return self._detokenize(list(ids), skip_special_tokens)

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token (a piece of a UTF-8 character stays a piece)."""
        from k2sys.engine.core.grammar import vocabulary_bytes

        table = self.__dict__.get("_vocab_bytes")
        if table is None and self.tokenizer is not None:
            table = self.__dict__["_vocab_bytes"] = vocabulary_bytes(self.tokenizer, self.model_config.vocab_size)
        return table[token] if table is not None else str(token).encode()

    def token_id(self, token: str) -> int | None:
        return None if self.tokenizer is None else self.tokenizer.token_to_id(token)

    def decode_token(self, token: int) -> str:
        """One token's text (special tokens included), cached per id."""
        cache = self.__dict__.setdefault("_token_text", {})
        text = cache.get(token)
        if text is None:
            text = cache[token] = (self.tokenizer.decode([token], skip_special_tokens=False)
                                   if self.tokenizer else str(token))
        return text

    # ---- chat (OpenAI /v1/chat/completions) ------------------------------------------------
    def chat_format(self):
        """The tokenizer's chat format: the checkpoint's own template, or our K2 format (k2sys.tokenizer.formats)."""
        if self.tokenizer is None:
            raise RequestError("messages: this model has no tokenizer; use /generate with input_ids")
        from k2sys.tokenizer import chat_format_for

        try:
            return chat_format_for(self.tokenizer)
        except ValueError as e:
            raise RequestError(f"messages: {e}; or use /v1/completions with a prompt") from None

    def render_chat(self, messages: list[dict], tools: list[dict] | None, *, suffix: str = "",
                    add_generation_prompt: bool = True, add_special_tokens: bool = False) -> list[int]:
        """Prompt ids for a chat in the model's chat format, with the assistant generation prompt
        and `suffix` (text the reply is made to start with, e.g. forced tool-call markup)."""
        fmt = self.chat_format()
        try:
            if not suffix and add_generation_prompt and not add_special_tokens:
                return fmt.prompt_ids(messages, tools)
            text = fmt.render(messages, tools, add_generation_prompt=add_generation_prompt) + suffix
        except (ValueError, TypeError, KeyError) as e:
            raise RequestError(f"messages: {e}") from None
        return self.encode(text, add_special_tokens=add_special_tokens)

    def chat_stop_ids(self) -> list[int]:
        if self.tokenizer is None:
            return []
        try:
            return list(self.chat_format().stop_token_ids)
        except RequestError:
            return []

    def parse_chat_output(self, text: str) -> tuple[dict, bool]:
        """Generated assistant text -> (OpenAI message, has tool calls), tool calls in the model's own format."""
        import json as _json

        parsed = self.chat_format().parse_assistant(text)
        msg: dict[str, Any] = {"role": "assistant", "content": parsed.content or None}
        if parsed.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": _json.dumps(c.arguments)}}
                                 for c in parsed.tool_calls]
        return msg, bool(parsed.tool_calls)

    # ---- generation --------------------------------------------------------------------------
    def submit(self, input_ids: Sequence[int] | None = None, params: SamplingParams | None = None, *,
               text: str | None = None, rid: str | None = None, return_logprob: bool = False,
               on_update: Callable[[int, dict, bool], None] | None = None, logprobs: LogprobOptions | None = None,
               cache_salt: str | None = None) -> RequestHandle:
        """Queue one prompt (n samples); returns at once. on_update runs on the scheduler thread.

        logprobs (instead of return_logprob) asks for prompt log-probs and top-k alternatives;
        cache_salt keeps the request's prefix-cache blocks apart from requests with another salt."""
        return self.submit_many([dict(input_ids=input_ids, params=params, text=text, rid=rid,
                                      return_logprob=return_logprob, on_update=on_update, logprobs=logprobs,
                                      cache_salt=cache_salt)])[0]

    def submit_many(self, items: Sequence[dict]) -> list[RequestHandle]:
        """Queue several prompts in one scheduler command, so they join the same step; each item
        holds submit()'s keyword arguments. All are validated before any is queued."""
        if self._draining:
            raise EngineError("engine is shutting down; not accepting requests")
        handles = [self._make_handle(**kw) for kw in items]

        def add() -> None:
            rids = [h.request.rid for h in handles]
            dup = [r for r in rids if r in self.scheduler.requests] or [r for r in rids if rids.count(r) > 1]
            if dup:
                raise RequestError(f"rid: {dup[0]!r} is already in flight; use a unique rid")
            for h in handles:
                self.scheduler.add(h.request)
        self._call(add)
        return handles

    def _make_handle(self, input_ids: Sequence[int] | None = None, params: SamplingParams | None = None, *,
                     text: str | None = None, rid: str | None = None, return_logprob: bool = False,
                     on_update: Callable[[int, dict, bool], None] | None = None,
                     logprobs: LogprobOptions | None = None, cache_salt: str | None = None,
                     fit_context: bool = True) -> RequestHandle:
        """fit_context: max_new_tokens is lowered to what the context leaves (generation stops there,
        finish_reason "length"), as for SGLang's default when a client gives none. The HTTP routes pass
        False for a value the client gave: prompt + max_new_tokens beyond the context is then refused."""
        params = params or SamplingParams()
        if logprobs is None:
            logprobs = LogprobOptions(return_logprob=bool(return_logprob))
        elif return_logprob and not logprobs.return_logprob:
            raise RequestError("return_logprob: True here but False in logprobs; give one of them")
        if (input_ids is None) == (text is None):
            raise RequestError("input_ids/text: give exactly one")
        ids = self.encode(text) if text is not None else [int(t) for t in input_ids]
        if not ids:
            raise RequestError("input_ids: empty prompt; give at least one token")
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise RequestError(f"input_ids: token ids must be in [0, {vocab}); got {min(ids)}..{max(ids)}")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"input_ids: prompt of {len(ids)} tokens does not fit max_model_len="
                               f"{self.max_model_len}; shorten it")
        if len(ids) > self.cache.num_blocks * self.cache.block_size:
            raise RequestError(f"input_ids: prompt of {len(ids)} tokens exceeds the KV cache "
                               f"({self.config.max_total_tokens} tokens)")
        room = self.max_model_len - len(ids)
        if fit_context and params.max_new_tokens > room:
            params = params.replace(max_new_tokens=room, min_new_tokens=min(params.min_new_tokens, room))
        self._check_ranges(params, logprobs, len(ids))
        if params.stop and self.tokenizer is None:
            raise RequestError("sampling_params.stop: stop strings need a tokenizer; use stop_token_ids")
        if params.stop_regex and self.tokenizer is None:
            raise RequestError("sampling_params.stop_regex: stop patterns need a tokenizer; use stop_token_ids")
        for name, toks in (("sampling_params.logit_bias", params.logit_bias or ()),
                           ("sampling_params.stop_token_ids", params.stop_token_ids),
                           ("token_ids_logprob", logprobs.token_ids_logprob or ())):
            bad = [t for t in toks if t >= vocab]
            if bad:
                raise RequestError(f"{name}: token id(s) {bad[:5]} are outside the vocabulary [0, {vocab})")
        grammar_factory = None
        if params.grammar is not None:
            from k2sys.engine.core.grammar import grammar_factory_for

            grammar_factory = grammar_factory_for(self, params)
        cache_root = None
        if cache_salt is not None:
            if not isinstance(cache_salt, str):
                raise RequestError(f"cache_salt: must be a string, got {type(cache_salt).__name__}")
            import hashlib

            cache_root = hashlib.blake2b(b"salt:" + cache_salt.encode(), digest_size=16).digest()
        req = Request(rid=rid or uuid.uuid4().hex, input_ids=ids, params=params, logprobs=logprobs,
                      cache_root=cache_root, grammar_factory=grammar_factory)
        handle = RequestHandle(request=req, engine=self, on_update=on_update)
        req.listener = handle._listen
        return handle

    def _check_ranges(self, params: SamplingParams, logprobs: LogprobOptions, prompt_len: int) -> None:
        """Values SamplingParams accepts but the engine cannot serve: refused here, before the request
        joins a batch, because a value that breaks a step would abort every request in it."""
        vocab, kv = self.model_config.vocab_size, self.cache.num_blocks * self.cache.block_size
        if params.top_k > MAX_TOP_K:
            raise RequestError(f"sampling_params.top_k: {params.top_k} is too large; use -1 (off) or at most "
                               f"{MAX_TOP_K} (values above the vocabulary size {vocab} keep every token)")
        if not 1e-3 <= params.repetition_penalty <= 2.0:
            raise RequestError(f"sampling_params.repetition_penalty: must be in [0.001, 2] (1 = off, as SGLang "
                               f"bounds it), got {params.repetition_penalty}")
        big = [t for t, b in (params.logit_bias or {}).items() if abs(b) > MAX_LOGIT_BIAS]
        if big:
            raise RequestError(f"sampling_params.logit_bias: the bias of token {big[0]} is beyond +-{MAX_LOGIT_BIAS:g}; "
                               "use a smaller magnitude (e.g. -100 bans a token)")
        if params.n > MAX_N:
            raise RequestError(f"sampling_params.n: {params.n} samples of one prompt is more than {MAX_N}; lower n "
                               "(or send the prompt again)")
        if logprobs.top_logprobs_num > vocab:
            raise RequestError(f"top_logprobs_num: {logprobs.top_logprobs_num} is more than the vocabulary size "
                               f"({vocab}); lower it")
        if prompt_len + params.max_new_tokens > self.max_model_len:  # SGLang and OpenAI refuse it too
            raise RequestError(f"sampling_params.max_new_tokens: a prompt of {prompt_len} tokens + {params.max_new_tokens} "
                               f"new tokens exceeds the context length max_model_len={self.max_model_len}; lower "
                               f"max_new_tokens to at most {self.max_model_len - prompt_len} (or shorten the prompt)")
        grow = params.max_new_tokens
        if prompt_len + grow > kv:
            raise RequestError(f"sampling_params.max_new_tokens: a prompt of {prompt_len} tokens + {grow} new tokens "
                               f"needs {prompt_len + grow} tokens of KV cache but it holds {kv}; lower max_new_tokens "
                               f"to at most {max(kv - prompt_len, 0)} (or raise max_total_tokens)")

    def _output(self, seq: Seq) -> dict:
        """SGLang /generate item for one sample (cumulative so far)."""
        req = seq.request
        text = seq.text if seq.finished else self.scheduler.running_text(seq)
        meta: dict[str, Any] = {
            "id": req.sample_rid(seq.sample_idx), "finish_reason": seq.finish_reason,
            "prompt_tokens": len(req.input_ids), "completion_tokens": len(seq.output_ids), "cached_tokens": seq.cached_tokens,
            "weight_version": self._weight_version, "e2e_latency": time.time() - req.created,
        }
        if req.return_logprob:
            meta.update(self._logprob_meta(seq))
        return {"text": text, "output_ids": list(seq.output_ids), "meta_info": meta}

    def _logprob_meta(self, seq: Seq) -> dict[str, Any]:
        """SGLang's logprob fields of meta_info: [logprob, token_id, text or None] triples; the
        first prompt entry (and its alternatives) is None, as SGLang reports it.

        Outputs are cumulative and a streaming request gets one per token, so the entries are built
        once and kept with the sequence (prompt ones with the request), each output getting its own
        copy of the lists (a pointer copy): rebuilding every triple per token cost O(tokens^2) per
        request on the scheduler thread (a third of a step of 32 concurrent agent episodes)."""
        req = seq.request
        opts = req.logprobs
        txt = self.decode_token if opts.return_text_in_logprobs else (lambda t: None)
        out_cache = seq.__dict__.setdefault("_lp_entries", {})
        in_cache = req.__dict__.setdefault("_lp_entries", {})

        def grown(cache: dict, key: str, n: int, tok_at, make) -> list:
            """cache[key] extended to n entries (entry i = make(i)); rebuilt if the source was cut
            or rewritten (its last kept entry's token changed)."""
            built = cache.get(key)
            if built is None or len(built) > n or (built and tok_at(len(built) - 1) != built[-1][0]):
                built = []
            for i in range(len(built), n):
                built.append((tok_at(i), make(i)))
            cache[key] = built
            return [e for _, e in built]

        prompt = req.input_ids
        start = req.input_start
        got = len(req.input_lp)
        shown = [] if start is None else prompt[start:start + 1 + got]
        head = [[None, t, txt(t)] for t in shown[:1]]
        outs = seq.output_ids
        meta: dict[str, Any] = {
            "input_token_logprobs": head + grown(in_cache, "lp", len(shown) - 1 if shown else 0,
                                                 lambda i: shown[i + 1],
                                                 lambda i: [req.input_lp[i], shown[i + 1], txt(shown[i + 1])]),
            "output_token_logprobs": grown(out_cache, "lp", min(len(outs), len(seq.output_logprobs)),
                                           lambda i: outs[i], lambda i: [seq.output_logprobs[i], outs[i], txt(outs[i])]),
            "output_token_logprobs_length": len(outs),
        }
        if opts.top_logprobs_num:
            meta["input_top_logprobs"] = [None for _ in shown[:1]] + grown(
                in_cache, "top", len(req.input_top), lambda i: shown[i + 1] if i + 1 < len(shown) else None,
                lambda i: [[v, t, txt(t)] for v, t in req.input_top[i]])
            meta["output_top_logprobs"] = grown(out_cache, "top", min(len(outs), len(seq.output_top)),
                                                lambda i: outs[i],
                                                lambda i: [[v, t, txt(t)] for v, t in seq.output_top[i]])
        if opts.token_ids_logprob is not None:
            ids = list(opts.token_ids_logprob)

            def row(vals: Sequence[float]) -> list[list]:
                return [[v, t, txt(t)] for v, t in zip(vals, ids)]
            meta["input_token_ids_logprobs"] = [None for _ in shown[:1]] + grown(
                in_cache, "ids", len(req.input_ids_lp), lambda i: shown[i + 1] if i + 1 < len(shown) else None,
                lambda i: row(req.input_ids_lp[i]))
            meta["output_token_ids_logprobs"] = grown(out_cache, "ids", min(len(outs), len(seq.output_ids_lp)),
                                                      lambda i: outs[i], lambda i: row(seq.output_ids_lp[i]))
        return meta

    def generate_sglang(self, prompts: Sequence[Sequence[int] | str], params: SamplingParams,
                        return_logprob: bool = False, rids: Sequence[str] | None = None) -> list[dict]:
        """Blocking batch generate; outputs are prompt-major (prompt 0's n samples first)."""
        handles = self.submit_many([{("text" if isinstance(p, str) else "input_ids"): p, "params": params,
                                     "rid": rids[i] if rids else None, "return_logprob": return_logprob}
                                    for i, p in enumerate(prompts)])
        return [o for h in handles for o in h.result()]

    def _submit_protocol(self, requests: Sequence[GenerateRequest]) -> list[RequestHandle]:
        return self.submit_many([r.submit_kwargs() for r in requests])

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateOutput]:
        handles = self._submit_protocol(requests)
        return [GenerateOutput.from_sglang(o) for h in handles for o in h.result()]

    async def async_generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateOutput]:
        """Awaits completion without holding a thread per request (any number may be in flight)."""
        loop = asyncio.get_running_loop()
        handles = await loop.run_in_executor(None, self._submit_protocol, requests)
        outs = []
        for h in handles:
            fut = loop.create_future()
            h.add_done_callback(lambda fut=fut: loop.call_soon_threadsafe(_resolve, fut))
            await fut
            outs.extend(h.result())
        return [GenerateOutput.from_sglang(o) for o in outs]

    # ---- partial rollout ---------------------------------------------------------------------
    def abort(self, rid: str | None = None) -> None:
        """Abort one request (its rid, or one sample's "rid-i") or every request (None)."""
        def run() -> None:
            target = rid
            if rid is not None and rid not in self.scheduler.requests and "-" in rid:
                target = rid.rsplit("-", 1)[0]  # a sample of an n > 1 request aborts its whole group
            self.scheduler.abort(target)
        self._call(run)

    def abort_nowait(self, rids: Sequence[str], message: str = "client disconnected") -> None:
        """Abort these exact rids on the scheduler thread without waiting for it: safe from code that
        cannot block or await (an HTTP handler being cancelled because its client went away)."""
        rids = list(rids)
        if not rids:
            return

        def run() -> None:
            for rid in rids:
                self.scheduler.abort(rid, message)
        with self._cv:
            self._commands.append((run, Future()))
            self._cv.notify()

    def pause(self, mode: str = "abort") -> list[PausedRequest]:
        """Stop scheduling (requests submitted meanwhile queue until continue_generation).

        abort: in-flight requests finish with "abort" and come back as PausedRequests, to be
        resumed from their token prefix (next iteration, new weights). retract: they give up
        their KV and wait in the queue; in_place: they keep their KV; both return [] because
        the engine itself resumes them on continue_generation (as HTTPEngine documents).
        """
        detail = self.pause_detail(mode)
        if mode != "abort":
            return []
        return [PausedRequest.from_json({k: d[k] for k in _PAUSED_KEYS}) for d in detail]

    def pause_detail(self, mode: str) -> list[dict]:
        """pause() returning every in-flight sample's state: rid, input_ids, output_ids,
        output_logprobs, sampling_params, finish_reason (abort in abort mode, else None)."""
        if mode not in PAUSE_MODES:
            raise RequestError(f"mode: {mode!r} is unknown; use one of {list(PAUSE_MODES)}")

        def run() -> list[dict]:
            self._paused = mode
            seqs = list(self.scheduler.running) + list(self.scheduler.waiting)
            if mode == "abort":
                self.scheduler.abort(None, "paused (mode=abort)")
            elif mode == "retract":
                self.scheduler.retract_all()
            items = []
            for seq in sorted(seqs, key=lambda q: q.order):
                # an n > 1 request still prefilling has one sequence standing for all n samples
                n = 1 if seq.request.forked else seq.request.params.n
                items.extend(self._paused_item(seq, i if n > 1 else seq.sample_idx) for i in range(n))
            return items
        return self._call(run)

    def _paused_item(self, seq: Seq, sample_idx: int) -> dict:
        p = seq.request.params
        # one sample, all its other sampling fields (its remaining budget is the resumer's to compute)
        sampling = p.replace(max_new_tokens=max(p.max_new_tokens, 1), n=1).to_sglang()
        return {"rid": seq.request.sample_rid(sample_idx), "input_ids": list(seq.request.input_ids),
                "output_ids": list(seq.output_ids),
                "output_logprobs": list(seq.output_logprobs), "sampling_params": sampling,
                "return_logprob": seq.request.return_logprob, "weight_version": self._weight_version,
                "finish_reason": seq.finish_reason}

    def continue_generation(self, abort_if_released: bool = False) -> None:
        """Resume scheduling. Requests wait while memory is released (until resume_memory); with
        abort_if_released (the HTTP server's choice: its callers must get an answer) they finish
        with "abort" naming why instead."""
        def run() -> None:
            self._paused = None
            if abort_if_released and self._released and self.scheduler.has_work():
                self.scheduler.abort(None, f"memory is released ({', '.join(sorted(self._released))}) and generation "
                                           "was continued without resume_memory_occupation")
        self._call(run)

    @property
    def paused(self) -> str | None:
        return self._paused

    # ---- memory ------------------------------------------------------------------------------
    def release_memory(self, tags: Iterable[str] | None = None) -> None:
        """Free KV cache and/or weight storage for real (tags: kv_cache, weights; cuda_graph is a no-op).

        CPU: the storages go to the process's host arena (k2sys.host_arena), and while another side
        of this process uses the arena the engine also keeps its oneDNN-packed weight copies (stale
        until the next update rewrites them in place; `memory_bytes()["packed_parked"]`)."""
        tags = validate_tags(tags)

        with self._session_lock:
            self._expire_session()
        if "weights" in tags and self._session is not None:  # a session may be writing into them
            raise EngineError("release_memory: a weight update session is open; end or abort it first")

        def run() -> None:
            if self.scheduler.running:
                raise EngineError(f"release_memory: {len(self.scheduler.running)} requests hold KV; "
                                  "pause_generation(mode='retract' or 'abort') first")
            for tag in tags:
                if tag in self._released or tag == "cuda_graph":
                    continue
                if tag == "kv_cache":
                    self.cache.release(user=self)
                elif tag == "weights":
                    # CPU: the storages' memory goes to the process's host arena (a colocated trainer
                    # onloads into it, touched). The packed copies: kept (parked, stale) while the arena
                    # keeps memory for another side of this process, so the update after the switch
                    # rewrites them in place instead of page-faulting new ones; freed otherwise.
                    from k2sys.host_arena import host_arena

                    arena = host_arena()
                    arena.release([b.untyped_storage() for b in self.runner.bases], user=self)
                    self.runner.release_weights(keep_packed=arena.shared())
                self._released.add(tag)
            self._empty_device_cache()
        self._call(run)

    def resume_memory(self, tags: Iterable[str] | None = None) -> None:
        """Give storage back; resumed weights are stale until a weight update covers them."""
        tags = validate_tags(tags)

        def run() -> None:
            for tag in tags:
                if tag not in self._released:
                    continue
                if tag == "kv_cache":
                    self.cache.resume(user=self)
                elif tag == "weights":  # what runner.resume_weights does, from the arena's memory
                    from k2sys.host_arena import host_arena

                    bases = self.runner.bases
                    host_arena().resume([b.untyped_storage() for b in bases],
                                        [b.numel() * b.element_size() for b in bases], user=self)
                    self._stale = set(self.runner.params)
                    self.cache.allocator.flush_prefix_cache()
                self._released.discard(tag)
        self._call(run)

    def _empty_device_cache(self) -> None:
        if self.runner.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def released(self) -> set[str]:
        return set(self._released)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held, with the packed copies a weight update deferred built first (the footprint
        the engine settles at, not a moment of it). While the weights are released in a colocated
        CPU process, "packed_parked" counts the packed copies kept for the next update (see
        release_memory); the key is present only then."""
        self.settle()
        out = {"weights": self.runner.weight_bytes, "kv_cache": self.cache.nbytes}
        parked = self.runner.parked_bytes
        if parked:
            out["packed_parked"] = parked
        return out

    def settle(self) -> None:
        """Finish the work a weight update deferred (the CPU packed copies of the new weights), now,
        on the engine thread. Until then a batched step builds the copies it needs itself, so this is
        only for callers that must count the whole cost of a switch (benchmarks/bench_switch.py)."""
        if self.runner.packs_pending and self._thread.is_alive():
            self._call(self.runner.pack_pending)

    def flush_cache(self) -> None:
        """Drop cached KV (SGLang semantics: only when no request holds KV)."""
        def run() -> None:
            if self.scheduler.running:
                raise EngineError(f"flush_cache: {len(self.scheduler.running)} requests are running; "
                                  "pause or wait for them first")
            if "kv_cache" not in self._released:
                self.cache.allocator.reset()
        self._call(run)

    # ---- status ------------------------------------------------------------------------------
    def health(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def stats(self) -> dict[str, Any]:
        sch = self.scheduler
        return {"running": len(sch.running), "waiting": len(sch.waiting), "generated_tokens": sch.generated_tokens,
                "steps": sch.steps, "free_blocks": self.cache.allocator.num_free, "paused": self._paused,
                "released": sorted(self._released), "stale_tensors": len(self._stale),
                "weight_version": self._weight_version, "weight_update": dict(self.last_update), "prefix_cache": {
                    "cached_blocks": self.cache.allocator.num_cached, "hit_tokens": sch.cached_tokens,
                    "evictions": self.cache.allocator.evictions}}

    def __enter__(self) -> "NativeEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

