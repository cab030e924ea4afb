"""Receivers: where an update's bytes land, inside a begin -> apply* -> commit | abort session.

    begin(specs) -> apply(name, slices) ... -> commit()      new weights visible, version + 1
                                           -> abort()       previous weights and version kept

The pipeline writes into `target(name)` tensors with one batched native copy per bucket when a
receiver offers them (the staged receivers below do); otherwise it calls apply(name, slices)
with (box, source view) pairs. Staged receivers write into private staging tensors and touch
the live weights only in commit(), which is what makes abort() safe on every rank.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol, Sequence, runtime_checkable

import torch

from k2sys import ext
from k2sys.ckpt.layout import Layout
from k2sys.ckpt.types import Box, TensorSpec, UpdateError


@runtime_checkable
class WeightReceiver(Protocol):
    """What an update target implements (see module doc). `layout` is its destination layout."""

    layout: Layout

    def begin(self, specs: Mapping[str, TensorSpec]) -> None: ...

    def apply(self, name: str, slices: Sequence[tuple[Box, torch.Tensor]]) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class StagedReceiver:
    """Base: stage every destination tensor, hand the complete set over in commit().

    Staging tensors are kept between updates (same specs -> same memory), so steady-state
    updates allocate nothing. Subclasses implement `_publish(staged)`.
    """

    def __init__(self, layout: Layout, device: str | torch.device = "cpu"):
        self.layout = layout
        self.device = torch.device(device)
        self._staging: dict[str, torch.Tensor] = {}
        self._open = False
        self.version = 0

    def begin(self, specs: Mapping[str, TensorSpec]) -> None:
        if self._open:
            raise UpdateError("receiver: begin() called while an update is open; commit() or abort() it first")
        for name, s in specs.items():
            t = self._staging.get(name)
            if t is None or tuple(t.shape) != s.shape or t.dtype != s.dtype:
                self._staging[name] = torch.empty(s.shape, dtype=s.dtype, device=self.device)
        for name in set(self._staging) - set(specs):
            del self._staging[name]
        self._open = True

    def target(self, name: str) -> torch.Tensor:
        if not self._open:
            raise UpdateError("receiver: no update is open (call begin())")
        return self._staging[name]

    def apply(self, name: str, slices: Sequence[tuple[Box, torch.Tensor]]) -> None:
        dst = self.target(name)
        if dst.device.type == "cpu" and all(src.device.type == "cpu" for _, src in slices):
            ext.batched_view_copy_([(box.view(dst), src) for box, src in slices])
        else:
            for box, src in slices:
                box.view(dst).copy_(src)

    def commit(self) -> None:
        if not self._open:
            raise UpdateError("receiver: commit() without begin()")
        try:
            self._publish(self._staging)
        finally:  # a failed publish ends the update too (version kept); the next begin() may retry
            self._open = False
        self.version += 1

    def abort(self) -> None:
        self._open = False  # staging is simply not published; live weights were never touched

    def _publish(self, staged: Mapping[str, torch.Tensor]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class InProcessReceiver(StagedReceiver):
    """A dict of live tensors (tests, and in-process engines that read weights from a dict).

    in_place=True: commit() copies staging into the existing live tensors (their storage stays
    the same, so holders of references see the new values). in_place=False: commit() swaps the
    staging and live dicts (no copy; the previous weights become the next update's staging), for
    consumers that look tensors up in `weights` on each use.
    """

    def __init__(self, layout: Layout, device: str | torch.device = "cpu", in_place: bool = True):
        super().__init__(layout, device)
        self.in_place = in_place
        self.weights: dict[str, torch.Tensor] = {}

    def _publish(self, staged: Mapping[str, torch.Tensor]) -> None:
        if not self.in_place:
            old = self.weights
            self.weights = dict(staged)
            self._staging = {n: t for n, t in old.items() if n in staged}  # begin() fills in the rest
            return
        dsts, srcs = [], []
        for name, t in staged.items():
            live = self.weights.get(name)
            if live is None or live.shape != t.shape or live.dtype != t.dtype:
                self.weights[name] = t.clone()
            elif t.device.type == "cpu":
                dsts.append(live)
                srcs.append(t)
            else:
                live.copy_(t)
        if dsts:
            ext.batched_host_copy(dsts, srcs)


class EngineReceiver(StagedReceiver):
    """Adapter for an inference engine with a weight-update session API.

    The engine exposes begin_weight_update(), update_weights_from_tensor(named_tensors) (or
    update_weights(named_tensors), k2sys.engine's protocol) and end_weight_update() (the native
    engine; SGLang >= 0.5.23 refuses updates outside such a session). Names passed are the local
    names of `layout`: give an hf_layout when the engine loads HF-named full tensors itself, an
    engine_tp_layout when it takes its own shards. Nothing reaches the engine before commit(),
    so an aborted update leaves it untouched.

    An `HTTPEngine` (k2sys serve or SGLang over HTTP) works as is: its update_weights picks the
    transport (shared memory on the same host, else HTTP bodies); `send_kwargs` are passed to
    every send call, e.g. {"transport": "http"} to force one.

    A send that fails inside the session: the engine's abort_weight_update() is called when it
    has one; otherwise end_weight_update() closes the session. The native engine then discards
    the session if the engine itself rejected a tensor, but a failure on the sending side (a
    dropped connection after some buckets) cannot be told apart from success by an engine
    without an abort call.
    """

    def __init__(self, engine: Any, layout: Layout, device: str | torch.device = "cpu", bucket_tensors: int = 0,
                 send_kwargs: Optional[Mapping[str, Any]] = None):
        for m in ("begin_weight_update", "end_weight_update"):
            if not callable(getattr(engine, m, None)):
                raise TypeError(f"EngineReceiver: engine {type(engine).__name__} lacks {m}()")
        # SGLang-style name first; k2sys's InferenceEngine protocol calls it update_weights.
        self._send = getattr(engine, "update_weights_from_tensor", None) or getattr(engine, "update_weights", None)
        if not callable(self._send):
            raise TypeError(f"EngineReceiver: engine {type(engine).__name__} has neither "
                            f"update_weights_from_tensor() nor update_weights()")
        super().__init__(layout, device)
        self.engine = engine
        self.bucket_tensors = bucket_tensors  # 0 = all tensors in one call
        self.send_kwargs = dict(send_kwargs or {})

    def _publish(self, staged: Mapping[str, torch.Tensor]) -> None:
        items = list(staged.items())
        step = self.bucket_tensors or max(len(items), 1)
        self.engine.begin_weight_update()
        try:
            for i in range(0, len(items), step):
                self._send(items[i:i + step], **self.send_kwargs)
        except BaseException:
            abort = getattr(self.engine, "abort_weight_update", None)
            try:
                (abort if callable(abort) else self.engine.end_weight_update)()
            except Exception:  # the send's error is the one to report
                pass
            raise
        self.engine.end_weight_update()


def as_receiver(engine: Any, layout: Optional[Layout] = None, device: str | torch.device = "cpu") -> WeightReceiver:
    """`engine` itself when it is a WeightReceiver, else an EngineReceiver around it.

    The layout comes from the argument or the engine's `weight_layout()` method."""
    if isinstance(engine, WeightReceiver) and (layout is None or layout is engine.layout):
        return engine
    if layout is None:
        get = getattr(engine, "weight_layout", None)
        if not callable(get):
            raise TypeError(f"update_weights: pass layout= for engine {type(engine).__name__} (it has no weight_layout())")
        layout = get()
    return EngineReceiver(engine, layout, device)
