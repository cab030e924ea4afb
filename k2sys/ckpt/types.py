"""Value types of the checkpoint engine: boxes, tensor specs, layout pieces, copy ops, buckets.

All are frozen dataclasses validated on construction, because they cross process edges (they
are exchanged between ranks with all_gather_object and cached as plans): a bad value fails
here with the field and the fix, not later as a silent wrong copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


def _ints(values, what: str, *args, positive: bool = False) -> tuple[int, ...]:
    """`values` as a tuple of ints >= 0 (> 0 with positive); `what.format(*args)` names the field in
    an error (formatted only then: layouts build thousands of these per update)."""
    try:
        out = tuple(map(int, values))
    except TypeError as e:
        raise TypeError(f"{what.format(*args)} must be a sequence of ints, got {values!r}") from e
    if out and min(out) < (1 if positive else 0):
        raise ValueError(f"{what.format(*args)} must be {'> 0' if positive else '>= 0'} in every dim, got {out}")
    return out


@dataclass(frozen=True)
class Box:
    """A hyper-rectangle [offsets, offsets + sizes) of a tensor, one entry per dim."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "offsets", _ints(self.offsets, "Box.offsets"))
        object.__setattr__(self, "sizes", _ints(self.sizes, "Box.sizes"))
        if len(self.offsets) != len(self.sizes):
            raise ValueError(f"Box: offsets {self.offsets} and sizes {self.sizes} have different ranks")

    @classmethod
    def full(cls, shape) -> "Box":
        return cls((0,) * len(shape), tuple(shape))

    @property
    def ndim(self) -> int:
        return len(self.sizes)

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    @property
    def ends(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offsets, self.sizes))

    def fits_in(self, shape) -> bool:
        return len(shape) == self.ndim and all(e <= n for e, n in zip(self.ends, shape))

    def intersect(self, other: "Box") -> Optional["Box"]:
        if other.ndim != self.ndim:
            raise ValueError(f"Box.intersect: rank {self.ndim} vs {other.ndim}")
        lo = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets))
        hi = tuple(min(a, b) for a, b in zip(self.ends, other.ends))
        if any(h <= l for l, h in zip(lo, hi)):
            return None
        return Box(lo, tuple(h - l for l, h in zip(lo, hi)))

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """The box as a view of tensor t."""
        return t[tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes))]

    def __str__(self) -> str:
        return "[" + ", ".join(f"{o}:{o + s}" for o, s in zip(self.offsets, self.sizes)) + "]"


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor's shape and dtype (no data)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"TensorSpec.name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "shape", _ints(self.shape, "TensorSpec({}).shape", self.name))
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"TensorSpec({self.name}).dtype must be a torch.dtype, got {self.dtype!r}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> "TensorSpec":
        return cls(name, tuple(t.shape), t.dtype)


def squeezed(sizes) -> tuple[int, ...]:
    return tuple(s for s in sizes if s != 1)


@dataclass(frozen=True)
class Piece:
    """One rectangular correspondence between a global (HF) tensor and a local tensor.

    Elements of `global_box` map to elements of `local_box` in row-major order; the two boxes
    have equal sizes once unit dims are dropped (so a [I, H] expert slice can land in a
    [1, I, H] box of a fused [E, 2I, H] tensor). No transposes: a layout that stores a
    transposed tensor must say so with its own copy step.
    """

    global_name: str
    global_shape: tuple[int, ...]
    global_box: Box
    local_name: str
    local_box: Box

    def __post_init__(self):
        object.__setattr__(self, "global_shape", _ints(self.global_shape, "Piece({}).global_shape", self.global_name))
        if not self.global_box.fits_in(self.global_shape):
            raise ValueError(f"Piece: box {self.global_box} does not fit global tensor {self.global_name} "
                             f"of shape {self.global_shape}")
        if squeezed(self.global_box.sizes) != squeezed(self.local_box.sizes):
            raise ValueError(f"Piece: global box {self.global_box} of {self.global_name} and local box "
                             f"{self.local_box} of {self.local_name} differ in size (beyond unit dims)")

    def to_local(self, sub: Box) -> Box:
        """The local box holding `sub`, a sub-box of this piece's global box."""
        g_dims = [d for d, s in enumerate(self.global_box.sizes) if s != 1]
        l_dims = [d for d, s in enumerate(self.local_box.sizes) if s != 1]
        offs, sizes = list(self.local_box.offsets), list(self.local_box.sizes)
        for g, l in zip(g_dims, l_dims):
            offs[l] += sub.offsets[g] - self.global_box.offsets[g]
            sizes[l] = sub.sizes[g]
        return Box(tuple(offs), tuple(sizes))


@dataclass(frozen=True)
class CopyOp:
    """Copy `src_box` of local tensor `src_name` on rank `src_rank` to `dst_box` of `dst_name`."""

    global_name: str
    src_rank: int
    src_name: str
    src_box: Box
    dst_name: str
    dst_box: Box

    def __post_init__(self):
        if self.src_box.numel != self.dst_box.numel or squeezed(self.src_box.sizes) != squeezed(self.dst_box.sizes):
            raise ValueError(f"CopyOp({self.global_name}): src box {self.src_box} and dst box {self.dst_box} differ")


def dtype_name(dt: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16 (the convention of SGLang's payloads and our JSON)."""
    return str(dt).removeprefix("torch.")


def dtype_from_name(name: str, field: str = "dtype") -> torch.dtype:
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"{field}: {name!r} is not a torch dtype; use names like 'bfloat16'")
    return dt


@dataclass(frozen=True)
class BucketEntry:
    """A tensor packed at byte `offset` of a bucket: the one entry type of every transport (the
    broadcast pipeline, shared memory, SGLang's flattened buckets, NCCL to SGLang)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Byte offset in the bucket buffer (a multiple of the dtype's size, so it can be viewed as one)."""

    def __post_init__(self):
        object.__setattr__(self, "shape", _ints(self.shape, "BucketEntry({}).shape", self.name))
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"BucketEntry({self.name}).dtype must be a torch.dtype, got {self.dtype!r}")
        if int(self.offset) < 0:
            raise ValueError(f"BucketEntry({self.name}).offset must be >= 0, got {self.offset}")
        object.__setattr__(self, "offset", int(self.offset))

    @classmethod
    def of(cls, spec: TensorSpec, offset: int) -> "BucketEntry":
        return cls(spec.name, spec.dtype, spec.shape, offset)

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.shape, self.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": dtype_name(self.dtype), "shape": list(self.shape), "offset": self.offset}

    @classmethod
    def from_json(cls, d: dict) -> "BucketEntry":
        try:
            return cls(str(d["name"]), dtype_from_name(d["dtype"], f"entries[{d.get('name')!r}].dtype"),
                       tuple(int(x) for x in d["shape"]), int(d["offset"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"bucket entry {d!r}: needs name, dtype, shape, offset ({e})") from None


@dataclass(frozen=True)
class Bucket:
    """A flat byte buffer of packed tensors, broadcast as one message from `owner`."""

    index: int
    owner: int
    entries: tuple[BucketEntry, ...]
    nbytes: int

    def __post_init__(self):
        end = 0
        for e in self.entries:
            if e.offset < end:
                raise ValueError(f"Bucket {self.index}: entry {e.name} at {e.offset} overlaps the previous one")
            end = e.offset + e.nbytes
        if end > self.nbytes:
            raise ValueError(f"Bucket {self.index}: entries need {end} bytes but nbytes is {self.nbytes}")


@dataclass(frozen=True)
class FaultInjection:
    """A drill: make `rank` fail at `bucket`. "corrupt" flips a byte after the owner's checksum
    (on the owner: before sending; elsewhere: after receiving); "die" exits the process
    (code 17) just before the bucket's broadcast."""

    kind: str
    bucket: int
    rank: int

    def __post_init__(self):
        if self.kind not in ("corrupt", "die"):
            raise ValueError(f"FaultInjection.kind must be 'corrupt' or 'die', got {self.kind!r}")


TRANSPORTS = ("auto", "collective", "shm")


@dataclass(kw_only=True)
class UpdateConfig:
    """Knobs of a weight update (all ranks must pass equal values)."""

    bucket_bytes: int = 256 << 20
    """Cap of one broadcast bucket. A larger source tensor travels as row pieces (runs of whole rows
    along dim 0, each within the cap; k2sys.ckpt.bucket.split_rows), so staging slots are at most
    this size whatever the model's largest tensor; a single row larger than the cap travels alone."""
    max_staging_bytes: Optional[int] = None
    """Memory for in-flight buckets; None = enough for the pipeline's slots (PIPELINE_BUFFERS buckets)."""
    pipeline: bool = True
    """Overlap stage(i+1) || broadcast(i) || apply(i-1); False runs the stages serially."""
    checksum: bool = True
    """crc32c per bucket, computed by the owner and verified by every receiver."""
    timeout_s: float = 120.0
    """How long to wait for a peer inside a collective before declaring it dead (set on the group)."""
    copy_threads: int = 0
    """C++ threads per rank for pack/checksum/apply; 0 = this host's cores / local ranks."""
    fault: Optional[FaultInjection] = None
    """Failure drill for tests and chaos runs; None in production."""
    transport: str = "auto"
    """How bucket bytes travel between ranks: "collective" (torch.distributed broadcast: gloo on CPU,
    NCCL on GPU), "shm" (CPU ranks on one host: rings in shared memory, k2sys.ckpt.shm_ring; an error
    where that is impossible) or "auto" (shm where possible, else collective)."""

    def __post_init__(self):
        if self.bucket_bytes < 256:
            raise ValueError(f"UpdateConfig.bucket_bytes must be >= 256, got {self.bucket_bytes}")
        if self.max_staging_bytes is not None and self.max_staging_bytes < 0:
            raise ValueError(f"UpdateConfig.max_staging_bytes must be >= 0, got {self.max_staging_bytes}")
        if self.copy_threads < 0:
            raise ValueError(f"UpdateConfig.copy_threads must be >= 0 (0 = automatic), got {self.copy_threads}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"UpdateConfig.transport: use one of {TRANSPORTS}, got {self.transport!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"UpdateConfig.timeout_s must be > 0, got {self.timeout_s}")


class UpdateError(RuntimeError):
    """A weight update was aborted on every rank; the receivers kept their previous weights."""

    def __init__(self, message: str, bucket: Optional[int] = None, rank: Optional[int] = None):
        super().__init__(message)
        self.bucket, self.rank = bucket, rank


class PlanError(ValueError):
    """A layout or reshard plan is inconsistent; the message names the tensor."""
