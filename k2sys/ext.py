"""Native extensions, with honest availability flags.

HAS_CPP   the C++ core (k2sys._C) imported: threaded host copies for onload/reshard.
HAS_CUDA  the CUDA module (k2sys._cuda) imported *and* a CUDA device is visible.
CUDA_BUILT the CUDA module was compiled into this install (it may still have no device).

The C++ core is required: there is no pure-Python stand-in for it, so `require_cpp()` raises
with the rebuild command instead of silently running a slow path.
"""

from __future__ import annotations

from typing import Optional

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


# ---------------------------------------------------------------- fp32 GEMV (batch-1 decode)


def _threads(threads: int) -> int:
    return threads if threads > 0 else torch.get_num_threads()


def gemv(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
         threads: int = 0) -> torch.Tensor:
    """y = w @ x (+ bias) for fp32 CPU tensors: w [N, K] with unit column stride (any row stride), x [K] or
    [1, K] contiguous -> y shaped like x's rows ([N] or [1, N]). The C++ kernel streams each weight row once
    (csrc/gemv.h); threads <= 0: torch's intra-op thread count. Equals F.linear up to fp32 summation order."""
    if w.dtype != torch.float32 or x.dtype != torch.float32 or w.device.type != "cpu" or x.device.type != "cpu":
        raise ValueError(f"gemv: fp32 CPU tensors only, got w {w.dtype} on {w.device}, x {x.dtype} on {x.device}")
    if w.dim() != 2 or w.stride(1) != 1 or (w.shape[0] > 1 and w.stride(0) < w.shape[1]):
        raise ValueError(f"gemv: w must be [N, K] with unit column stride, got shape {tuple(w.shape)} "
                         f"strides {w.stride()}")
    n, k = w.shape
    if x.shape not in ((k,), (1, k)) or not x.is_contiguous():
        raise ValueError(f"gemv: x must be a contiguous [{k}] or [1, {k}], got {tuple(x.shape)}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != torch.float32 or not bias.is_contiguous()):
        raise ValueError(f"gemv: bias must be a contiguous fp32 [{n}], got {tuple(bias.shape)} {bias.dtype}")
    shape = (n,) if x.dim() == 1 else (1, n)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    elif out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"gemv: out must be a contiguous fp32 {shape}, got {tuple(out.shape)} {out.dtype}")
    require_cpp().gemv_f32_ptr(out.data_ptr(), w.data_ptr(), x.data_ptr(), 0 if bias is None else bias.data_ptr(),
                               n, k, w.stride(0), _threads(threads))
    return out


def moe_pairs(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
              threads: int = 0) -> torch.Tensor:
    """The routed experts of a few tokens as GEMV pairs in one C++ call (fp32 CPU):
    out[t] = sum_j weights[t, j] * w2[e] (silu(g) * u), [g; u] = w13[e] x[t], e = ids[t, j] (< 0: skipped).
    x [T, D]; w13 [E, 2I, D] and w2 [E, D, I], each expert's matrix contiguous; weights [T, k], ids [T, k]
    -> [T, D]. Reads only the selected experts' weights."""
    for name, t in (("x", x), ("w13", w13), ("w2", w2)):
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"moe_pairs: {name} must be fp32 on the CPU, got {t.dtype} on {t.device}")
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"moe_pairs: x must be a contiguous [T, D], got {tuple(x.shape)}")
    T, D = x.shape
    if w13.dim() != 3 or w13.shape[2] != D or w13.shape[1] % 2 or w13.stride(2) != 1 or w13.stride(1) != D:
        raise ValueError(f"moe_pairs: w13 must be [E, 2I, {D}] with contiguous experts, got {tuple(w13.shape)} "
                         f"strides {w13.stride()}")
    E, inter = w13.shape[0], w13.shape[1] // 2
    if w2.shape != (E, D, inter) or w2.stride(2) != 1 or w2.stride(1) != inter:
        raise ValueError(f"moe_pairs: w2 must be [{E}, {D}, {inter}] with contiguous experts, got "
                         f"{tuple(w2.shape)} strides {w2.stride()}")
    if ids.dim() != 2 or ids.shape[0] != T or weights.shape != ids.shape:
        raise ValueError(f"moe_pairs: ids and weights must both be [{T}, k], got {tuple(ids.shape)} and "
                         f"{tuple(weights.shape)}")
    ids = ids.to(torch.int64).contiguous()
    weights = weights.to(torch.float32).contiguous()
    out = torch.empty(T, D, dtype=torch.float32)
    require_cpp().moe_pairs_f32_ptr(out.data_ptr(), x.data_ptr(), w13.data_ptr(), w2.data_ptr(), ids.data_ptr(),
                                    weights.data_ptr(), T, ids.shape[1], D, inter, w13.stride(0), w2.stride(0), E,
                                    _threads(threads))
    return out


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the rows of an fp32 CPU x [T, D] (unit column stride, any row stride) with weight w [D], in
    C++ (one pass, no temporaries): F.rms_norm up to fp32 summation order."""
    if x.dtype != torch.float32 or w.dtype != torch.float32 or x.device.type != "cpu" or w.device.type != "cpu":
        raise ValueError(f"rms_norm: fp32 CPU tensors only, got x {x.dtype} on {x.device}, w {w.dtype} on {w.device}")
    if x.dim() != 2 or x.stride(1) != 1 or w.shape != (x.shape[1],) or not w.is_contiguous():
        raise ValueError(f"rms_norm: x must be [T, D] with unit column stride and w a contiguous [D]; got x "
                         f"{tuple(x.shape)} strides {x.stride()}, w {tuple(w.shape)}")
    y = torch.empty(x.shape, dtype=torch.float32)
    require_cpp().rms_norm_f32_ptr(y.data_ptr(), x.data_ptr(), w.data_ptr(), x.shape[0], x.shape[1], x.stride(0),
                                   float(eps))
    return y


def route_topk(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int = 1, topk_group: int = 1,
               routed_scaling_factor: float = 1.0, norm_topk_prob: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The K2 router in C++ for fp32 CPU logits [T, E] -> (weights [T, top_k] fp32, ids [T, top_k] int64): the
    contract of k2sys.models.moe.route_topk (ties to the lower index, ids in descending choice order), not
    differentiable. For the engine's decode steps, where the torch router's ~15 small ops cost more than the math."""
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"route_topk: logits must be an fp32 CPU [T, E] with unit column stride, got "
                         f"{logits.dtype} {tuple(logits.shape)} on {logits.device}")
    T, E = logits.shape
    if bias is not None:
        if bias.shape != (E,) or bias.device.type != "cpu":
            raise ValueError(f"route_topk: bias must be a CPU [{E}], got {tuple(bias.shape)} on {bias.device}")
        bias = bias.to(torch.float32).contiguous()
    weights = torch.empty(T, top_k, dtype=torch.float32)
    ids = torch.empty(T, top_k, dtype=torch.int64)
    require_cpp().route_topk_f32_ptr(weights.data_ptr(), ids.data_ptr(), logits.data_ptr(),
                                     0 if bias is None else bias.data_ptr(), T, E, logits.stride(0), int(top_k),
                                     int(n_group), int(topk_group), float(routed_scaling_factor), bool(norm_topk_prob))
    return weights, ids


# ---------------------------------------------------------------- crc32c

def crc32c(data, crc: int = 0, impl: str = "auto") -> int:
    """crc32c (Castagnoli) of a contiguous tensor's bytes or a bytes-like object.

    CPU data: C++ (SSE4.2 when present, `impl="table"` forces the portable slicing-by-8 path).
    CUDA tensors: per-segment crcs on the GPU, folded on the host (same value as on the CPU).
    `crc` continues a previous result, so crc32c(b, crc32c(a)) == crc32c(a + b).
    """
    if isinstance(data, torch.Tensor):
        if not data.is_contiguous():
            raise ValueError("crc32c: tensor must be contiguous (call .contiguous())")
        nbytes = data.numel() * data.element_size()
        if data.device.type == "cuda":
            if crc:
                raise ValueError("crc32c: continuing a crc is only supported for CPU data")
            return require_cuda().crc32c_device(data.data_ptr(), nbytes, data.device.index or 0, 0)
        return require_cpp().crc32c_ptr(data.data_ptr(), nbytes, crc, impl)
    return require_cpp().crc32c(data, crc, impl)


def crc32c_many(tensors: list[torch.Tensor], threads: int = 0, impl: str = "auto") -> list[int]:
    """crc32c of each contiguous CPU tensor, hashed in parallel chunks and combined in C++."""
    for i, t in enumerate(tensors):
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"crc32c_many: tensor {i} must be a contiguous CPU tensor")
    return require_cpp().crc32c_batched_ptr(
        [t.data_ptr() for t in tensors], [t.numel() * t.element_size() for t in tensors], threads, impl
    )


def crc32c_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """crc32c of A||B from crc32c(A), crc32c(B) and len(B)."""
    return require_cpp().crc32c_combine(crc_a, crc_b, len_b)


# ---------------------------------------------------------------- staging pool

class StagingBuffer:
    """A leased staging buffer: `.tensor` is a uint8 view of the first `nbytes` bytes.

    Give it back with release() (or use it as a context manager); the memory is then reused
    by the next lease of a similar size, so the tensor must not be used after release.
    """

    def __init__(self, pool: "StagingPool", addr: int, nbytes: int, capacity: int):
        self._pool, self.addr, self.nbytes, self.capacity = pool, addr, nbytes, capacity
        mv = _C.memoryview_at(addr, nbytes) if nbytes else memoryview(bytearray(0))
        self.tensor = torch.frombuffer(mv, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)

    def release(self) -> None:
        if self._pool is not None:
            self._pool.release(self)
            self._pool = None
            self.tensor = None

    def __enter__(self) -> "StagingBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class StagingPool:
    """Aligned host buffers reused across updates (C++ HostPool; cudaHostAlloc when pinned=True).

    Leases are binned by power-of-two capacity; stats() counts allocations vs reuses so a
    caller can check that steady-state updates allocate nothing.
    """

    def __init__(self, pinned: bool = False, alignment: int = 4096):
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"StagingPool: alignment must be a power of two, got {alignment}")
        self.pinned = pinned
        self._pool = require_cuda().PinnedPool(alignment) if pinned else require_cpp().HostPool(alignment)
        self._live: dict[int, StagingBuffer] = {}

    def acquire(self, nbytes: int) -> StagingBuffer:
        if nbytes < 0:
            raise ValueError(f"StagingPool.acquire: nbytes must be >= 0, got {nbytes}")
        addr = self._pool.acquire(max(nbytes, 1))
        buf = StagingBuffer(self, addr, nbytes, self._pool.capacity_of(addr))
        self._live[addr] = buf
        return buf

    def release(self, buf: StagingBuffer) -> None:
        if self._live.pop(buf.addr, None) is None:
            raise ValueError("StagingPool.release: buffer does not belong to this pool or was released twice")
        self._pool.release(buf.addr)

    def stats(self) -> dict:
        return dict(self._pool.stats())

    def trim(self) -> None:
        """Free cached (unleased) buffers, e.g. before the trainer takes the memory back."""
        self._pool.trim()


# ---------------------------------------------------------------- pipelined onload

class Onloader:
    """Pipelined onload with one API on both devices (a ring of `ring` staging chunks).

    device "cpu": C++ worker threads copy host->host (the CPU stand-in for H2D, same
    semantics); device "cuda[:i]": the CUDA H2D ring on a copy stream with events.
    submit() returns a ticket at once; done()/wait() are event query/synchronize.
    Tensors are kept alive until their ticket has been waited on.
    """

    def __init__(self, device: str | torch.device = "cpu", chunk_bytes: int = 16 << 20, ring: int = 4,
                 threads: int = 0):
        if chunk_bytes <= 0 or ring < 1:
            raise ValueError(f"Onloader: chunk_bytes must be > 0 and ring >= 1 (got {chunk_bytes}, {ring})")
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self._impl = require_cuda().H2DOnloader(self.device.index or 0, chunk_bytes, ring)
        elif self.device.type == "cpu":
            self._impl = require_cpp().CpuOnloader(chunk_bytes, ring, threads)
        else:
            raise ValueError(f"Onloader: device must be cpu or cuda, got {self.device}")
        self._keep: dict[int, tuple] = {}

    def submit(self, dst: torch.Tensor, src: torch.Tensor, src_pinned: bool | None = None) -> int:
        if src.device.type != "cpu" or dst.device.type != self.device.type:
            raise ValueError(f"Onloader.submit: src must be on the CPU and dst on {self.device}")
        nbytes = _check_pair(dst, src)
        pinned = src.is_pinned() if src_pinned is None else src_pinned
        if self.device.type == "cpu" and src_pinned is None:
            pinned = True  # host memory is directly readable on the CPU path
        t = self._impl.submit(dst.data_ptr(), src.data_ptr(), nbytes, pinned)
        self._keep[t] = (dst, src)
        return t

    def done(self, ticket: int) -> bool:
        return self._impl.done(ticket)

    def wait(self, ticket: int) -> None:
        self._impl.wait(ticket)
        for t in [t for t in self._keep if t <= ticket]:
            del self._keep[t]

    def synchronize(self) -> None:
        self._impl.synchronize()
        self._keep.clear()

    def copy_(self, dst: torch.Tensor, src: torch.Tensor, src_pinned: bool | None = None) -> torch.Tensor:
        self.wait(self.submit(dst, src, src_pinned))
        return dst


# ---------------------------------------------------------------- strided batched copy

STRIDED_COLS = 12  # [dst, src, run_bytes, n0, n1, n2, dst_s0, dst_s1, dst_s2, src_s0, src_s1, src_s2]


def strided_rows(shape, dst_strides, src_strides, itemsize: int, dst_base: int = 0, src_base: int = 0) -> list[list[int]]:
    """Rows (see csrc/strided_copy.h) that copy a box of `shape` between two strided layouts.

    Strides are in elements. Unit dims are dropped, mergeable dims coalesced so the innermost
    dim becomes one contiguous byte run; more than 3 outer dims are unrolled into several rows.
    """
    if not (len(shape) == len(dst_strides) == len(src_strides)):
        raise ValueError("strided_rows: shape and strides must have the same length")
    dims = [(n, d * itemsize, s * itemsize) for n, d, s in zip(shape, dst_strides, src_strides) if n != 1]
    if any(n == 0 for n in shape):
        return []
    merged: list[list[int]] = []
    for n, d, s in dims:
        if merged and merged[-1][1] == d * n and merged[-1][2] == s * n:
            merged[-1][0] *= n
            merged[-1][1], merged[-1][2] = d, s
        else:
            merged.append([n, d, s])
    if merged and merged[-1][1] == itemsize and merged[-1][2] == itemsize:
        run = merged[-1][0] * itemsize
        outer = merged[:-1]
    else:
        run = itemsize
        outer = merged
    rows = []
    lead, tail = outer[:-3] if len(outer) > 3 else [], outer[-3:]
    tail = [[1, 0, 0]] * (3 - len(tail)) + tail

    def emit(dst_off: int, src_off: int, k: int) -> None:
        if k == len(lead):
            rows.append([dst_base + dst_off, src_base + src_off, run, *(t[0] for t in tail),
                         *(t[1] for t in tail), *(t[2] for t in tail)])
            return
        n, d, s = lead[k]
        for i in range(n):
            emit(dst_off + i * d, src_off + i * s, k + 1)

    emit(0, 0, 0)
    return rows


def view_copy_rows(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """An int64 [n, 12] row table that copies each src view into its dst view (same shape/dtype)."""
    rows: list[list[int]] = []
    for i, (dst, src) in enumerate(pairs):
        if dst.shape != src.shape or dst.dtype != src.dtype:
            raise ValueError(f"view_copy_rows: pair {i} has dst {tuple(dst.shape)}/{dst.dtype} "
                             f"but src {tuple(src.shape)}/{src.dtype}; shapes and dtypes must match")
        rows += strided_rows(dst.shape, dst.stride(), src.stride(), dst.element_size(), dst.data_ptr(), src.data_ptr())
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, STRIDED_COLS)


def batched_strided_copy_(rows: torch.Tensor, device: str | torch.device = "cpu", threads: int = 0) -> None:
    """Apply a row table of strided box copies in one call (C++ threads on CPU, one kernel on CUDA)."""
    if rows.dtype != torch.int64 or rows.dim() != 2 or rows.shape[1] != STRIDED_COLS or rows.device.type != "cpu":
        raise ValueError(f"batched_strided_copy_: rows must be a CPU int64 tensor [n, {STRIDED_COLS}], "
                         f"got {rows.dtype} {tuple(rows.shape)} on {rows.device}")
    rows = rows.contiguous()
    dev = torch.device(device)
    if dev.type == "cuda":
        require_cuda().batched_strided_copy_ptr(rows.data_ptr(), rows.shape[0], dev.index or 0, 0)
    else:
        require_cpp().batched_strided_copy_ptr(rows.data_ptr(), rows.shape[0], threads, 0)


def batched_strided_copy_crc_(rows: torch.Tensor, region: torch.Tensor, crc_source: bool, threads: int = 0,
                              chunk_bytes: int = 0) -> Optional[int]:
    """batched_strided_copy_ (CPU) with the crc32c of `region` (a contiguous CPU tensor holding one
    side of every row) computed in the same pass: crc_source=True hashes each piece of the rows'
    sources just before copying it (verify and apply reading the bytes once), False hashes each piece
    of their destinations right after writing it (a pack and its checksum). Region bytes no row
    touches are hashed too, so the result is crc32c(region). Returns None, having copied nothing,
    when the rows' side in the region is not contiguous per row, outside it, or overlapping."""
    if rows.dtype != torch.int64 or rows.dim() != 2 or rows.shape[1] != STRIDED_COLS or rows.device.type != "cpu":
        raise ValueError(f"batched_strided_copy_crc_: rows must be a CPU int64 tensor [n, {STRIDED_COLS}], "
                         f"got {rows.dtype} {tuple(rows.shape)} on {rows.device}")
    if region.device.type != "cpu" or not region.is_contiguous():
        raise ValueError("batched_strided_copy_crc_: region must be a contiguous CPU tensor")
    rows = rows.contiguous()
    return require_cpp().batched_strided_copy_crc_ptr(rows.data_ptr(), rows.shape[0], threads, chunk_bytes,
                                                      region.data_ptr(), region.numel() * region.element_size(),
                                                      crc_source)


def batched_view_copy_(pairs: list[tuple[torch.Tensor, torch.Tensor]], threads: int = 0) -> None:
    """dst.copy_(src) for many (dst, src) view pairs in one native call."""
    if not pairs:
        return
    dev = pairs[0][0].device
    for i, (d, s) in enumerate(pairs):
        if d.device != dev or s.device != dev:
            raise ValueError(f"batched_view_copy_: pair {i} is not on {dev}; all views must share one device")
    batched_strided_copy_(view_copy_rows(pairs), dev, threads)


def summary() -> dict:
    """What is built and usable, for `k2sys env`."""
    return {
        "cpp": HAS_CPP,
        "cpp_error": _CPP_ERROR,
        "cuda_built": CUDA_BUILT,
        "cuda_usable": HAS_CUDA,
        "cpp_threads": _C.hardware_threads() if HAS_CPP else None,
        "crc32c_hw": _C.crc32c_hw_available() if HAS_CPP else None,
        "gemv_isa": _C.gemv_isa() if HAS_CPP else None,
    }
