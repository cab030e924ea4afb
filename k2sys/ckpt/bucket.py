"""Buckets: the planned layout (`Bucket`) and the one filled-bucket type (`FlattenedBucket`).

Planning rules (plan_buckets): entries start at multiples of `align` bytes (256: NCCL/vector
friendly, and the bucket end keeps the 8-byte checksum trailer aligned; 1 with itemsize-sorted
specs gives SGLang's gap-free NCCL layout); a bucket holds at most `cap_bytes` unless a single
tensor is larger, then that tensor travels alone; input order is kept, so every rank computes
identical buckets; every byte of every tensor is in exactly one bucket.

Where k2sys is on both ends (the trainer-to-engine update, k2sys.ckpt.pipeline) a tensor larger
than the cap is first cut into row pieces (`split_rows`: runs of whole rows along dim 0, each at
most the cap), so every bucket, and every staging slot, is at most the cap whatever the model's
largest tensor (a Megatron GroupedMLP weight is GBs). Transports that name whole tensors to an
engine (SGLang's flattened buckets, the shared-memory segments of the HTTP engine) keep them whole.

`FlattenedBucket` = one contiguous uint8 buffer + `BucketEntry`s (name, dtype, shape, byte
offset). Every transport carries this one type as it is, without repacking: the broadcast
pipeline's buffers, a /dev/shm segment (entries as JSON), SGLang's flattened_bucket payload
(its FlattenedTensorMetadata are the entries; the buffer is its `flattened_tensor`), an NCCL
broadcast to SGLang (names/dtypes/shapes + the buffer), and the native engine (typed views).
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import torch

from k2sys.ckpt.types import Bucket, BucketEntry, TensorSpec
from k2sys.engine.errors import ProtocolError


def align_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def plan_buckets(specs: Sequence[TensorSpec], cap_bytes: int, align: int = 256, owner: int = 0,
                 first_index: int = 0) -> list[Bucket]:
    """Greedy in-order packing of `specs` into buckets of at most cap_bytes (see module doc)."""
    if cap_bytes <= 0:
        raise ValueError(f"plan_buckets: cap_bytes must be > 0, got {cap_bytes}")
    if align <= 0 or align & (align - 1):
        raise ValueError(f"plan_buckets: align must be a power of two, got {align}")
    if align < max((s.dtype.itemsize for s in specs), default=1) and \
            any(a.dtype.itemsize < b.dtype.itemsize for a, b in zip(specs, specs[1:])):
        raise ValueError(f"plan_buckets: align={align} packs tensors back to back, which keeps every offset a "
                         "multiple of its dtype's size only when specs come in non-increasing itemsize; sort them "
                         "(sort_for_packing) or raise align")
    seen: set[str] = set()
    buckets: list[Bucket] = []
    cur: list[BucketEntry] = []
    used = 0

    def close() -> None:
        nonlocal cur, used
        if cur:
            buckets.append(Bucket(first_index + len(buckets), owner, tuple(cur), align_up(used, align)))
        cur, used = [], 0

    for s in specs:
        if s.name in seen:
            raise ValueError(f"plan_buckets: tensor {s.name} is listed twice")
        seen.add(s.name)
        off = align_up(used, align)
        if cur and off + s.nbytes > cap_bytes:
            close()
            off = 0
        cur.append(BucketEntry.of(s, off))
        used = off + s.nbytes
        if s.nbytes >= cap_bytes:  # oversize (or exactly full): it owns this bucket
            close()
    close()
    return buckets


@dataclass(frozen=True)
class RowPiece:
    """Rows [r0, r1) (dim 0) of source tensor `tensor`, travelling as the entry `name`."""

    name: str
    tensor: str
    r0: int
    r1: int


def split_rows(specs: Sequence[TensorSpec], cap_bytes: int) -> tuple[list[TensorSpec], dict[str, RowPiece]]:
    """`specs` with every tensor larger than cap_bytes replaced, in place, by its row pieces: runs of
    whole rows along dim 0 of at most cap_bytes each (a single row larger than the cap is a piece of
    its own). Returns (specs to bucket, piece name -> RowPiece). A piece is named
    "<tensor>@rows[<r0>:<r1>]"; a tensor already named like a piece is refused."""
    if cap_bytes <= 0:
        raise ValueError(f"split_rows: cap_bytes must be > 0, got {cap_bytes}")
    names = {s.name for s in specs}
    out: list[TensorSpec] = []
    pieces: dict[str, RowPiece] = {}
    for s in specs:
        if s.nbytes <= cap_bytes or len(s.shape) == 0 or s.shape[0] <= 1:
            out.append(s)
            continue
        row_bytes = s.nbytes // s.shape[0]
        per = max(1, cap_bytes // row_bytes)
        for r0 in range(0, s.shape[0], per):
            r1 = min(s.shape[0], r0 + per)
            name = f"{s.name}@rows[{r0}:{r1}]"
            if name in names:
                raise ValueError(f"split_rows: tensor name {name!r} collides with a row piece of {s.name!r}; "
                                 "rename the tensor")
            pieces[name] = RowPiece(name, s.name, r0, r1)
            out.append(TensorSpec(name, (r1 - r0,) + tuple(s.shape[1:]), s.dtype))
    return out, pieces


class PieceTensors(Mapping[str, torch.Tensor]):
    """A rank's tensors by name, row pieces included (a piece is a dim-0 view of its tensor)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], pieces: Mapping[str, RowPiece]):
        self.tensors, self.pieces = tensors, pieces

    def __getitem__(self, name: str) -> torch.Tensor:
        p = self.pieces.get(name)
        if p is None:
            return self.tensors[name]
        return self.tensors[p.tensor][p.r0:p.r1]

    def __iter__(self):
        yield from self.tensors
        yield from self.pieces

    def __len__(self) -> int:
        return len(self.tensors) + len(self.pieces)


def bucket_of(named: Sequence[tuple[str, torch.Tensor]], align: int = 64) -> Bucket:
    """One bucket holding every tensor of `named`, in order, each at a multiple of `align` bytes (the
    layout of FlattenedBucket.pack and of a shared-memory segment): plan_buckets without a cap."""
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise BucketFormatError(f"named_tensors: duplicate name {dup!r}; each tensor goes in once")
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in named]
    planned = plan_buckets(specs, cap_bytes=1 << 62, align=align)
    return planned[0] if planned else Bucket(0, 0, (), 0)


def fill_bucket(bucket: Bucket, tensors: Mapping[str, torch.Tensor], buf: torch.Tensor, threads: int = 0,
                checksum: bool = False) -> Optional[int]:
    """Copy every entry's tensor into its slot of `buf` (uint8, at least bucket.nbytes): the one packer
    of every transport. CPU to CPU is one batched C++ copy over the pool's threads (0 = all); any
    other pair of devices copies entry by entry (one H2D/D2H/D2D each).

    checksum=True also returns crc32c(buf[:bucket.nbytes]) where the whole bucket is packed on the
    CPU: each piece is hashed right after it is written, while it is in cache (padding between
    entries included, as the receivers hash it). None when not asked for or not fused (the
    caller hashes the buffer itself)."""
    dsts, srcs = [], []
    for e in bucket.entries:
        if not e.nbytes:
            continue
        t = tensors[e.name]
        if tuple(t.shape) != e.shape or t.dtype != e.dtype:
            raise BucketFormatError(f"entries[{e.name!r}]: tensor is {t.dtype}{list(t.shape)}, the bucket planned "
                                    f"{e.dtype}{list(e.shape)}")
        dst = buf[e.offset:e.end]
        src = t.detach().contiguous().reshape(-1).view(torch.uint8)
        if dst.device.type == "cpu" and src.device.type == "cpu":
            dsts.append(dst)
            srcs.append(src)
        else:
            dst.copy_(src)
            checksum = False
    from k2sys import ext

    if checksum and buf.device.type == "cpu":
        rows = torch.tensor([[d.data_ptr(), s.data_ptr(), d.numel(), 1, 1, 1, 0, 0, 0, 0, 0, 0]
                             for d, s in zip(dsts, srcs)], dtype=torch.int64).reshape(-1, ext.STRIDED_COLS)
        crc = ext.batched_strided_copy_crc_(rows, buf[:bucket.nbytes], False, threads)
        if crc is not None:
            return crc
    if dsts:
        ext.batched_host_copy(dsts, srcs, threads)
    return None


def interleave_owners(per_owner: Mapping[int, Sequence[TensorSpec]], cap_bytes: int, align: int = 256) -> list[Bucket]:
    """Buckets of every owner rank, interleaved round-robin (r0, r1, ..., r0, r1 ...) so the
    staging work rotates over ranks; indices are global and identical on every rank."""
    lists = {r: plan_buckets(specs, cap_bytes, align, owner=r) for r, specs in sorted(per_owner.items())}
    out: list[Bucket] = []
    k = 0
    while any(k < len(v) for v in lists.values()):
        for r, v in lists.items():
            if k < len(v):
                b = v[k]
                out.append(Bucket(len(out), r, b.entries, b.nbytes))
        k += 1
    return out


def sort_for_packing(specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """Specs by non-increasing dtype size (stable): packed back to back (align=1) every tensor
    then starts at a multiple of its own size, the layout SGLang's FlattenedTensorBucket.empty
    expects on the receiving side of an NCCL update."""
    return sorted(specs, key=lambda s: -s.dtype.itemsize)


# ---------------------------------------------------------------------------------- the filled bucket

# A malformed flattened bucket (or serialized form) is a ProtocolError: it arrives at the engine edge.
BucketFormatError = ProtocolError


def _safetensors_metadata(blob: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob; {} for anything that is not one (e.g. a pickle)."""
    if len(blob) < 8:
        return {}
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        return {}
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


class FlattenedBucket:
    """Many tensors of any dtypes in one contiguous uint8 buffer (see the module doc).

    Entries start at offsets aligned for their dtype, so `unpack()` returns zero-copy views.
    """

    FORMAT = "k2sys.flattened_bucket.v1"
    """Format tag of `serialize()` (safetensors bytes: pickle-free, bit-exact)."""

    def __init__(self, buffer: torch.Tensor, entries: Sequence[BucketEntry]):
        if not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8 or buffer.dim() != 1 \
                or not buffer.is_contiguous():
            raise BucketFormatError("buffer: must be a contiguous 1-D uint8 tensor; build buckets with "
                                    "FlattenedBucket.pack")
        names = set()
        for e in entries:
            if e.name in names:
                raise BucketFormatError(f"entries: duplicate name {e.name!r}; each tensor goes in once")
            names.add(e.name)
            if e.offset + e.nbytes > buffer.numel() or e.offset % e.dtype.itemsize:
                raise BucketFormatError(f"entries[{e.name!r}]: offset {e.offset} (+{e.nbytes} bytes) does not fit a "
                                        f"{buffer.numel()}-byte buffer aligned for {e.dtype}")
        self.buffer = buffer
        self.entries = tuple(entries)

    @classmethod
    def of(cls, bucket: Bucket, buffer: torch.Tensor) -> "FlattenedBucket":
        """A planned bucket filled in `buffer` (at least bucket.nbytes; the payload is its prefix)."""
        return cls(buffer[:bucket.nbytes], bucket.entries)

    @classmethod
    def pack(cls, named: Iterable[tuple[str, torch.Tensor]], alignment: int = 64,
             device: torch.device | str | None = None) -> "FlattenedBucket":
        """Copy (name, tensor) pairs into a new bucket (bucket_of's layout, fill_bucket's copy)."""
        named = list(named)
        if not named:
            raise BucketFormatError("named_tensors: empty; a bucket needs at least one tensor")
        if alignment < 16 or alignment & (alignment - 1):
            raise BucketFormatError(f"alignment: {alignment} must be a power of two >= 16 (the largest itemsize)")
        bucket = bucket_of(named, alignment)
        dev = torch.device(device) if device is not None else named[0][1].device
        # zeroed: the alignment padding travels too, and must not carry stale process memory
        buffer = torch.zeros(bucket.nbytes, dtype=torch.uint8, device=dev)
        fill_bucket(bucket, dict(named), buffer)
        return cls(buffer, bucket.entries)

    @staticmethod
    def pack_size(named: Sequence[tuple[str, torch.Tensor]], alignment: int = 64) -> int:
        """Bytes `pack` needs for these tensors."""
        return sum(-(-t.numel() * t.element_size() // alignment) * alignment for _, t in named)

    def view(self, e: BucketEntry) -> torch.Tensor:
        raw = self.buffer[e.offset:e.end]
        return raw.view(e.dtype).view(e.shape) if e.nbytes else torch.empty(e.shape, dtype=e.dtype,
                                                                             device=self.buffer.device)

    def unpack(self) -> list[tuple[str, torch.Tensor]]:
        """(name, view) pairs in entry order; the views share the buffer (no copy)."""
        return [(e.name, self.view(e)) for e in self.entries]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    @property
    def payload_bytes(self) -> int:
        """Bytes of tensor data (without alignment padding)."""
        return sum(e.nbytes for e in self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    # ---- pickle-free bytes (the native server's /update_weights_from_tensor body)
    def to_bytes(self) -> bytes:
        from safetensors.torch import save as st_save

        meta = {"format": self.FORMAT, "entries": json.dumps([e.to_json() for e in self.entries])}
        return st_save({"buffer": self.buffer.detach().to("cpu").contiguous()}, metadata=meta)

    def serialize(self) -> str:
        return base64.b64encode(self.to_bytes()).decode("ascii")

    @classmethod
    def from_bytes(cls, blob: bytes) -> "FlattenedBucket":
        from safetensors.torch import load as st_load

        meta = _safetensors_metadata(blob)
        if meta.get("format") != cls.FORMAT:
            raise BucketFormatError("serialized_named_tensors: not a flattened bucket; send load_format=None for "
                                    "plain named tensors")
        try:
            entries = [BucketEntry.from_json(d) for d in json.loads(meta["entries"])]
        except ValueError as e:
            raise BucketFormatError(f"serialized_named_tensors: {e}") from None
        return cls(st_load(blob)["buffer"], entries)

    @classmethod
    def deserialize(cls, payload: str | bytes) -> "FlattenedBucket":
        try:
            blob = base64.b64decode(payload, validate=True)
        except (ValueError, TypeError) as exc:
            raise BucketFormatError(f"serialized_named_tensors: not valid base64 ({exc})") from exc
        return cls.from_bytes(blob)

