"""One way to launch a k2sys Triton kernel, so every launch can also be recorded instead of run.

Every launcher in this package calls `launch(kernel, grid, *args, **kwargs)` (kwargs: the kernel's
constexprs plus the launch options num_warps / num_stages). Normally that is `kernel[grid](...)`.
Inside `collect_launches()` nothing runs: each call is recorded as a `Launch` (kernel, grid,
arguments, options). The compile check (`k2sys_triton.compile_check`) drives the real launchers on
meta tensors under `collect_launches()` and compiles exactly the argument sets they would launch
with, at Kimi-K2 shapes, for a GPU this machine does not need to have.

`target_arch(device)` is the compute capability launchers pick code paths for (fp8 weights are
read as bits before sm_89); `override_arch` / `collect_launches(arch=...)` set it for the compile
check and for tests in the CPU interpreter.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator

__all__ = ["Launch", "launch", "record", "collect_launches", "LAUNCH_OPTIONS", "target_arch", "override_arch"]

LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_SINK: contextvars.ContextVar[list | None] = contextvars.ContextVar("k2sys_triton_launch_sink", default=None)
_ARCH: contextvars.ContextVar[int | None] = contextvars.ContextVar("k2sys_triton_target_arch", default=None)


def target_arch(device) -> int | None:
    """Compute capability (e.g. 90) the kernels for `device` are built for: the override if one is
    active, the CUDA device's own, or None (CPU interpreter: no architecture limits)."""
    forced = _ARCH.get()
    if forced is not None:
        return forced
    if device.type == "cuda":
        import torch

        major, minor = torch.cuda.get_device_capability(device)
        return major * 10 + minor
    return None


@contextlib.contextmanager
def override_arch(arch: int | None) -> Iterator[None]:
    """Launchers choose code paths as for a GPU of compute capability `arch` (compile check, tests)."""
    token = _ARCH.set(arch)
    try:
        yield
    finally:
        _ARCH.reset(token)


@dataclass(frozen=True)
class Launch:
    """A recorded launch: `kernel[grid](*args, **kwargs, **options)`."""

    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict
    options: dict = field(default_factory=dict)

    def bound(self) -> dict[str, Any]:
        """Every kernel parameter by name (defaults applied), in the kernel's parameter order."""
        b = inspect.signature(self.kernel.fn).bind(*self.args, **self.kwargs)  # jit or interpreted
        b.apply_defaults()
        return dict(b.arguments)


def launch(kernel, grid, *args, **kwargs) -> None:
    options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
    sink = _SINK.get()
    if sink is not None:
        sink.append(Launch(kernel, tuple(grid), args, kwargs, options))
        return
    kernel[grid](*args, **kwargs, **options)


def record(ln: Launch) -> None:
    """Add a launch built by hand to the active collect_launches() (for kernels whose launchers
    call `kernel[grid]` themselves)."""
    sink = _SINK.get()
    if sink is None:
        raise RuntimeError("launch.record: no collect_launches() is active")
    sink.append(ln)


@contextlib.contextmanager
def collect_launches(arch: int | None = None) -> Iterator[list[Launch]]:
    """Record launches (in order) instead of running them, in this thread/context only; with `arch`,
    the launchers pick their code paths for that compute capability (see target_arch)."""
    sink: list[Launch] = []
    token = _SINK.set(sink)
    try:
        with override_arch(arch) if arch is not None else contextlib.nullcontext():
            yield sink
    finally:
        _SINK.reset(token)
