"""Weight updates of the native engine: the session protocol behind NativeEngine's update calls.

    begin_weight_update -> (update_weights | weight_target + weights_ready)... -> end_weight_update
                                                                              (or abort_weight_update)

A session writes each tensor into engine-owned memory once: the live weight storage when the tensor
is stale (weights released and resumed: the colocated cycle, nothing serves from it), else a staging
tensor that end_weight_update copies in on the scheduler thread (the old weights keep serving until
then). A bad name, shape or dtype fails the session and leaves the old weights in use. An engine
serving FP8 (EngineConfig.quantization="fp8") quantizes the full-precision linear weights of each
update call (one bucket) in one `quantize_fp8_blocks` call while staging them.

`WeightUpdates` is a mixin of NativeEngine (k2sys.engine.core.engine): it uses the engine's runner,
its scheduler-thread `_call`, `_session_lock` and `_session`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch

from k2sys.engine.errors import EngineError, RequestError

log = logging.getLogger("k2sys.engine.core.engine")
_EXACT_WIDENINGS = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32)}
"""Arriving dtype -> engine dtype conversions an update may do: every value is kept exactly (the
engine holds its router in float32 while a bf16 trainer sends bf16). Anything else is refused."""


@dataclass
class Session:
    """One weight update session (see the module doc)."""

    direct: set[str]
    """Stale tensors at begin: written straight into the live storage."""
    written: set[str] = field(default_factory=set)
    staged: dict[str, torch.Tensor] = field(default_factory=dict)
    pending: dict[str, torch.Tensor] = field(default_factory=dict)
    """Full-precision buffers of FP8 weights handed out by weight_target, quantized when ready."""
    quantized: set[str] = field(default_factory=set)
    fp8_raw: set[str] = field(default_factory=set)
    error: str | None = None
    version: str | None = None
    copied: int = 0
    """Bytes the engine copied itself (update_weights, quantization, publishing staged tensors)."""
    touched: float = field(default_factory=time.monotonic)
    """When a call last used the session (weight_update_timeout_s counts from here)."""


class WeightUpdates:
    """NativeEngine's weight-update calls (see the module doc)."""

    def begin_weight_update(self, weight_version: str | None = None) -> None:
        """Open a session; `weight_version` names the version it sets (else the counter's next)."""
        with self._session_lock:
            self._expire_session()
            if self._session is not None:
                idle = time.monotonic() - self._session.touched
                limit = (f"; it is discarded after {self.weight_update_timeout_s:g} s without a call"
                         if self.weight_update_timeout_s is not None else "")
                raise EngineError(f"begin_weight_update: a session is already open (last used {idle:.0f} s ago"
                                  f"{limit}); call end_weight_update() or abort_weight_update() first")
            if "weights" in self._released:
                raise EngineError("begin_weight_update: weights are released; resume_memory(['weights']) first")
            self._session = Session(direct=set(self._stale),
                                     version=None if weight_version is None else str(weight_version))
            self._expired = None

    def _expire_session(self) -> None:
        """Discard the open session if it has been idle past weight_update_timeout_s (lock held)."""
        s, limit = self._session, self.weight_update_timeout_s
        if s is not None and limit is not None and time.monotonic() - s.touched > limit:
            log.warning("weight update session idle for more than %g s: discarded (weights unchanged)", limit)
            self._session = None
            self._expired = (f"the last session was discarded after {limit:g} s without a call; begin a new one "
                             "and send the whole update again")

    def _open_session(self, what: str) -> "Session":
        self._expire_session()
        s = self._session
        if s is None:
            raise EngineError(f"{what}: no weight update session; call begin_weight_update() first "
                              "(SGLang >= 0.5.23 refuses updates outside a session too)"
                              + (f" ({self._expired})" if self._expired else ""))
        if s.error is not None:
            raise EngineError(f"{what}: this session already failed ({s.error}); end it and start a new one")
        s.touched = time.monotonic()
        return s

    def _dest(self, s: "Session", name: str) -> torch.Tensor:
        """The engine-owned tensor `name` is written into in session s (see the section comment)."""
        if name in s.direct:
            s.written.add(name)
            return self.runner.params[name]
        t = s.staged.get(name)
        if t is None:
            t = s.staged[name] = torch.empty_like(self.runner.params[name])
        return t

    def _quantizes(self, name: str, dtype: torch.dtype) -> bool:
        """Serving FP8, a full-precision linear weight is quantized on arrival."""
        if not self.runner.fp8:  # asked per tensor per update: no import on the full-precision path
            return False
        from k2sys.quant import FP8_DTYPE, is_fp8_weight_name

        return (self.runner.fp8 and is_fp8_weight_name(name) and name in self.runner.params
                and dtype != FP8_DTYPE)

    def check_weight(self, name: str, dtype: torch.dtype, shape: Sequence[int]) -> None:
        """Raise RequestError unless an update can bring `name` as `dtype`/`shape` (checked once per
        plan by the checkpoint engine's NativeEngineSink, before any byte moves)."""
        self._check_spec(name, dtype, tuple(shape), quantized=self._quantizes(name, dtype))

    def check_update(self, named: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Raise (RequestError / EngineError) unless update_weights(named) would be accepted now: an open
        session and every name, dtype and shape known. Nothing is written (a caller that must abort
        requests before an update checks first, so a refused update aborts nothing)."""
        with self._session_lock:
            self._open_session("update_weights")
        for name, t in named:
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise RequestError(f"weights: expected (name, tensor) pairs, got ({type(name).__name__}, "
                                   f"{type(t).__name__})")
            self.check_weight(name, t.dtype, t.shape)

    def weight_target(self, name: str, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """Writable engine memory for `name` arriving as `dtype`/`shape` in the open session (the
        checkpoint engine writes straight into it, then calls weights_ready). Serving FP8, a
        full-precision linear weight lands in a full-precision buffer that weights_ready quantizes."""
        with self._session_lock:
            s = self._open_session("weight_target")
            try:
                self._check_spec(name, dtype, tuple(shape), quantized=self._quantizes(name, dtype))
                if self._quantizes(name, dtype):
                    self._check_fp8_full(s, name)
                    buf = s.pending.get(name)
                    if buf is None or buf.dtype != dtype:
                        buf = s.pending[name] = torch.empty(tuple(shape), dtype=dtype, device=self.runner.device)
                    return buf
                self._note_fp8_raw(s, name, dtype)
                if dtype != self.runner.params[name].dtype:  # an exact widening, done when ready
                    buf = s.pending.get(name)
                    if buf is None or buf.dtype != dtype:
                        buf = s.pending[name] = torch.empty(tuple(shape), dtype=dtype, device=self.runner.device)
                    return buf
                return self._dest(s, name)
            except (RequestError, EngineError) as e:
                s.error = str(e)
                raise

    def weights_ready(self, names: Sequence[str]) -> None:
        """The tensors `names` (handed out by weight_target) are complete. Serving FP8, the
        full-precision linear weights among them are quantized in one quantize_fp8_blocks call."""
        with self._session_lock:
            s = self._open_session("weights_ready")
            try:
                arrived = [(n, s.pending.pop(n)) for n in names if n in s.pending]
                full = [(n, t) for n, t in arrived if self._quantizes(n, t.dtype)]
                for n, t in arrived:
                    if not self._quantizes(n, t.dtype):  # exact widening (_EXACT_WIDENINGS)
                        dst = self._dest(s, n)
                        dst.copy_(t)
                        s.copied += dst.numel() * dst.element_size()
                if full:
                    self._quantize_into(s, full)
            except (RequestError, EngineError) as e:
                s.error = str(e)
                raise

    def update_weights(self, weights: Iterable[Any], *, weight_version: str | None = None) -> None:
        """Write (name, tensor) pairs or FlattenedBuckets (HF names, any order) in the open session.

        Serving FP8, a linear weight may come in full precision (float32/bfloat16/float16, as the
        trainer has it): the engine quantizes all of this call's such tensors in one
        quantize_fp8_blocks call (C++ threads on CPU, Triton on CUDA) and stores `X.weight` and
        `X.weight_scale_inv`. Or it may come already in FP8 with its `X.weight_scale_inv` in the same
        session (the release layout); then both are stored as sent."""
        with self._session_lock:
            s = self._open_session("update_weights")
            try:
                full: list[tuple[str, torch.Tensor]] = []
                for name, t in self._named(weights):
                    if not isinstance(t, torch.Tensor):
                        raise RequestError(f"weights[{name!r}]: expected a tensor, got {type(t).__name__}")
                    quant = self._quantizes(name, t.dtype)
                    self._check_spec(name, t.dtype, tuple(t.shape), quantized=quant)
                    if quant:
                        self._check_fp8_full(s, name)
                        full.append((name, t.detach()))
                        continue
                    self._note_fp8_raw(s, name, t.dtype)
                    dst = self._dest(s, name)
                    dst.copy_(t.detach())
                    s.copied += dst.numel() * dst.element_size()
                if full:
                    self._quantize_into(s, full)
            except (RequestError, EngineError) as e:
                s.error = str(e)
                raise
            if weight_version is not None:
                s.version = str(weight_version)

    update_weights_from_tensor = update_weights

    @staticmethod
    def _named(weights: Iterable[Any]) -> Iterator[tuple[str, torch.Tensor]]:
        for item in weights:
            if hasattr(item, "unpack") and hasattr(item, "entries"):  # a FlattenedBucket
                yield from item.unpack()
            elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                yield item
            else:
                raise RequestError(f"weights: expected (name, tensor) pairs or FlattenedBuckets, got {type(item).__name__}")

    def _check_spec(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], quantized: bool = False) -> None:
        params = self.runner.params
        if name not in params:
            near = [n for n in params if n.split(".")[-2:] == name.split(".")[-2:]][:3]
            raise RequestError(f"weights: unknown tensor {name!r}; names are HF DeepseekV3 names"
                               + (f" (e.g. {near})" if near else ""))
        want = params[name]
        if shape != tuple(want.shape):
            raise RequestError(f"weights[{name!r}]: shape {shape} does not match the model's {tuple(want.shape)}")
        if quantized:
            if dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise RequestError(f"weights[{name!r}]: {dtype} cannot be quantized to fp8; send float32, "
                                   "bfloat16 or float16 (or float8_e4m3fn with its weight_scale_inv)")
        elif dtype != want.dtype and (dtype, want.dtype) not in _EXACT_WIDENINGS:
            raise RequestError(f"weights[{name!r}]: dtype {dtype} does not match the engine's {want.dtype}; "
                               f"cast before sending")

    @staticmethod
    def _check_fp8_full(s: "Session", name: str) -> None:
        from k2sys.quant import scale_inv_name

        if scale_inv_name(name) in s.fp8_raw:
            raise RequestError(f"weights[{name!r}]: full-precision weight after its {scale_inv_name(name)!r} "
                               "was sent; send either fp8 + scale_inv or the full-precision weight")

    def _note_fp8_raw(self, s: "Session", name: str, dtype: torch.dtype) -> None:
        """Serving FP8: an FP8 weight or a weight_scale_inv arriving as sent (the release layout)."""
        if not self.runner.fp8:
            return
        from k2sys.quant import FP8_DTYPE, SCALE_SUFFIX

        if not self.runner.fp8 or not (name.endswith(SCALE_SUFFIX) or dtype == FP8_DTYPE):
            return
        w = name.removesuffix(SCALE_SUFFIX)
        if w in s.quantized:
            raise RequestError(f"weights[{name!r}]: {w!r} came in full precision in this session and the engine made "
                               "its scales; send either fp8 + scale_inv or the full-precision weight")
        s.fp8_raw.add(name)

    def _quantize_into(self, s: "Session", full: list[tuple[str, torch.Tensor]]) -> None:
        """One quantize_fp8_blocks call per device for these full-precision weights; the FP8 bytes
        and scales land in the session's memory for `X.weight` and `X.weight_scale_inv`."""
        from k2sys.quant import quantize_fp8_blocks, scale_inv_name

        by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
        for name, t in full:
            by_device.setdefault(t.device, []).append((name, t))
        for items in by_device.values():
            names = [n for n, _ in items]
            for name in names:
                if scale_inv_name(name) in s.fp8_raw:
                    raise RequestError(f"weights[{name!r}]: sent in full precision together with its "
                                       f"{scale_inv_name(name)!r}; send either fp8 + scale_inv or the full-precision "
                                       "weight")
            try:
                pairs = quantize_fp8_blocks([t for _, t in items], self.runner.fp8_block, names=names)
            except ValueError as e:
                raise RequestError(f"weights: {e}") from None
            for name, (q, scale) in zip(names, pairs):
                for n, v in ((name, q), (scale_inv_name(name), scale)):
                    dst = self._dest(s, n)
                    dst.copy_(v)
                    s.copied += dst.numel() * dst.element_size()
                s.quantized.add(name)
                s.fp8_raw.discard(name)

    @staticmethod
    def _fp8_session_error(s: "Session") -> str | None:
        """Why an FP8 session cannot be applied: a weight sent in fp8 without its scales, or scales
        without their weight (one would be read with the other's stale partner)."""
        from k2sys.quant import SCALE_SUFFIX

        raw = s.fp8_raw
        for name in sorted(raw):
            partner = name.removesuffix(SCALE_SUFFIX) if name.endswith(SCALE_SUFFIX) else name + SCALE_SUFFIX
            if partner not in raw:
                return (f"{name!r} was sent without {partner!r}; an fp8 weight and its weight_scale_inv go "
                        "together in one session (or send the weight in full precision and the engine quantizes it)")
        return None

    def end_weight_update(self) -> str:
        """Apply the whole session at once (or nothing, if any part failed); returns the new version."""
        with self._session_lock:
            self._expire_session()
            s, self._session = self._session, None
        if s is None:
            raise EngineError("end_weight_update: no open session; call begin_weight_update() first"
                              + (f" ({self._expired})" if self._expired else ""))
        if s.error is None and s.pending:
            s.error = (f"{len(s.pending)} tensors were handed out by weight_target but never reported ready "
                       f"(e.g. {sorted(s.pending)[:3]})")
        if s.error is None and self.runner.fp8:
            s.error = self._fp8_session_error(s)
        if s.error is not None:
            raise EngineError(f"end_weight_update: session discarded, weights unchanged (version "
                              f"{self._weight_version}): {s.error}")

        def run() -> str:
            if "weights" in self._released:
                raise EngineError("end_weight_update: weights were released during the session; nothing applied")
            # staged tensors are copied in; directly written ones only refresh their packed copies,
            # deferred: the engine thread rebuilds them when idle, or a step on first use
            self.runner.load_weights({**{n: self.runner.params[n] for n in s.written}, **s.staged}, pack="defer")
            s.copied += sum(t.numel() * t.element_size() for t in s.staged.values())
            self.cache.allocator.flush_prefix_cache()  # KV computed with the old weights is stale
            self._stale -= s.written | set(s.staged)
            self.version += 1
            self._weight_version = s.version or str(self.version)
            self.last_update = {"bytes_copied": s.copied, "direct_tensors": len(s.written),
                                "staged_tensors": len(s.staged), "weight_version": self._weight_version}
            return self._weight_version
        return self._call(run)

    def abort_weight_update(self) -> None:
        """Discard the open session (the sender failed part-way): nothing staged is applied and the
        previous weights and version stay in use (tensors written in place stay stale). A no-op
        without an open session."""
        with self._session_lock:
            self._session = None

    @property
    def weight_version(self) -> str:
        return self._weight_version

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        if name not in self.runner.params:
            raise RequestError(f"name: unknown tensor {name!r}; use an HF DeepseekV3 parameter name")
        if "weights" in self._released:
            raise EngineError("get_weights_by_name: weights are released; resume them first")
        return self._call(lambda: self.runner.params[name].float().reshape(-1)[:truncate_size].tolist())
