"""Native extensions, with honest availability flags.

HAS_CPP   the C++ core (k2sys._C) imported: threaded host copies for onload/reshard.
HAS_CUDA  the CUDA module (k2sys._cuda) imported *and* a CUDA device is visible.
CUDA_BUILT the CUDA module was compiled into this install (it may still have no device).

The C++ core is required: there is no pure-Python stand-in for it, so `require_cpp()` raises
with the rebuild command instead of silently running a slow path.
"""

from __future__ import annotations

import torch

try:
    from k2sys import _C  # type: ignore[attr-defined]

    HAS_CPP = True
    _CPP_ERROR = None
except ImportError as e:  # pragma: no cover - only on a broken install
    _C = None
    HAS_CPP = False
    _CPP_ERROR = str(e)

try:
    from k2sys import _cuda  # type: ignore[attr-defined]

    CUDA_BUILT = True
    HAS_CUDA = _cuda.device_count() > 0
except ImportError:
    _cuda = None
    CUDA_BUILT = False
    HAS_CUDA = False

REBUILD_HINT = "rebuild the extensions with `pip install -e .` (needs CMake >= 3.24 and a C++17 compiler)"


def require_cpp():
    """The k2sys._C module, or an ImportError that says how to build it."""
    if not HAS_CPP:
        raise ImportError(f"k2sys._C is not built ({_CPP_ERROR}); {REBUILD_HINT}")
    return _C


def require_cuda():
    """The k2sys._cuda module with a visible device, or an error that says what is missing."""
    if not CUDA_BUILT:
        raise ImportError(f"k2sys._cuda was not built (no CUDA toolkit at build time); {REBUILD_HINT}")
    if not HAS_CUDA:
        raise RuntimeError("k2sys._cuda is built but no CUDA device is visible")
    return _cuda


def _check_pair(dst: torch.Tensor, src: torch.Tensor) -> int:
    if not (dst.is_contiguous() and src.is_contiguous()):
        raise ValueError("host_copy_: dst and src must be contiguous (call .contiguous())")
    nbytes = dst.numel() * dst.element_size()
    if nbytes != src.numel() * src.element_size():
        raise ValueError(
            f"host_copy_: dst has {nbytes} bytes, src has {src.numel() * src.element_size()}; sizes must match"
        )
    return nbytes


def host_copy_(dst: torch.Tensor, src: torch.Tensor, threads: int = 0, chunk_bytes: int = 0) -> torch.Tensor:
    """Copy the bytes of contiguous CPU tensor `src` into `dst` with the C++ thread pool.

    Dtypes may differ (it is a byte copy, like a view); sizes in bytes must agree.
    threads <= 0 uses all hardware threads.
    """
    if dst.device.type != "cpu" or src.device.type != "cpu":
        raise ValueError("host_copy_: both tensors must be on the CPU; use k2sys.ext.h2d_copy_ for device copies")
    nbytes = _check_pair(dst, src)
    require_cpp().copy_ptr(dst.data_ptr(), src.data_ptr(), nbytes, threads, chunk_bytes)
    return dst


def batched_host_copy(dsts: list[torch.Tensor], srcs: list[torch.Tensor], threads: int = 0) -> None:
    """Many host copies in one C++ call, balanced over the pool by bytes."""
    if len(dsts) != len(srcs):
        raise ValueError(f"batched_host_copy: {len(dsts)} destinations for {len(srcs)} sources")
    sizes = [_check_pair(d, s) for d, s in zip(dsts, srcs)]
    require_cpp().batched_copy_ptr(
        [d.data_ptr() for d in dsts], [s.data_ptr() for s in srcs], sizes, threads, 0
    )


def h2d_copy_(dst: torch.Tensor, src: torch.Tensor, chunk_bytes: int = 32 << 20, ring: int = 3) -> torch.Tensor:
    """Host -> device copy through the pinned staging ring (direct when `src` is pinned)."""
    if dst.device.type != "cuda" or src.device.type != "cpu":
        raise ValueError("h2d_copy_: dst must be a CUDA tensor and src a CPU tensor")
    nbytes = _check_pair(dst, src)
    require_cuda().h2d_pipelined(
        dst.data_ptr(), src.data_ptr(), nbytes, src.is_pinned(), dst.device.index or 0, chunk_bytes, ring
    )
    return dst


def summary() -> dict:
    """What is built and usable, for `k2sys env`."""
    return {
        "cpp": HAS_CPP,
        "cpp_error": _CPP_ERROR,
        "cuda_built": CUDA_BUILT,
        "cuda_usable": HAS_CUDA,
        "cpp_threads": _C.hardware_threads() if HAS_CPP else None,
    }
