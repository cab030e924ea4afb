"""Where the kernels may run, and the small helpers every launcher shares.

Triton kernels launch on CUDA tensors, or on CPU tensors when `TRITON_INTERPRET=1` was set
before triton was imported (the interpreter runs each program instance in numpy, ~9 ms each:
tests only). The interpreter does bf16 arithmetic on raw bits, so launchers pass
`UPCAST=True` for bf16 and kernels lift tiles to fp32 before any arithmetic.

triton is an optional dependency (`pip install k2sys[kernels]`): without it this module
provides a stand-in whose `jit` returns a function that raises with the install hint, so
the torch references beside the launchers stay importable on a bare CPU install.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on installs without triton
    HAS_TRITON = False

    class _MissingTriton:
        """Stand-in for `triton` / `triton.language` so kernel definitions still parse."""

        constexpr = None

        def __getattr__(self, name):
            return None

        @staticmethod
        def jit(fn=None, **_kw):
            def _raise(*_a, **_k):
                raise ImportError("triton is not installed: `pip install k2sys[kernels]` (or triton>=3.4)")

            return _raise if fn is not None else (lambda f: _raise)

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

    triton = _MissingTriton()  # type: ignore[assignment]
    tl = _MissingTriton()  # type: ignore[assignment]

__all__ = ["triton", "tl", "HAS_TRITON", "KERNELS_INTERPRETED", "interpreting", "check_launchable", "upcast_flag", "next_pow2", "cdiv"]


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# triton decides interpreter-or-compiler when @triton.jit runs, i.e. when the kernel modules
# are imported (right after this one): setting the variable later changes nothing.
KERNELS_INTERPRETED = interpreting()


def check_launchable(op: str, *tensors: torch.Tensor) -> None:
    """Raise unless the tensors can feed a Triton launch here: same device, CUDA or interpreter."""
    if not HAS_TRITON:
        raise ImportError(
            f"{op}: triton is not installed; `pip install k2sys[kernels]` or use k2sys.kernels.{op}_torch")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cpu" and not KERNELS_INTERPRETED:
        late = " (it is set now, but was not when k2sys_triton was imported)" if interpreting() else ""
        raise RuntimeError(
            f"{op}: CPU tensors need TRITON_INTERPRET=1 set before k2sys_triton is imported{late} "
            f"(tests only); use k2sys.kernels.{op}_torch or k2sys.kernels.moe_forward on CPU"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: unsupported device {device}; use CUDA or the CPU interpreter")


def upcast_flag(dtype: torch.dtype) -> bool:
    """Whether kernels must lift tiles to fp32 before arithmetic (bf16 under the interpreter)."""
    return dtype == torch.bfloat16 and KERNELS_INTERPRETED


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
