"""Weight payloads that cross the process edge: bit-exact, pickle-free encodings.

    serialize_named_tensors([(name, t)...])  -> base64(safetensors{name: t}, order in metadata)
    FlattenedBucket.pack([(name, t)...])     -> one uint8 buffer + (name, dtype, shape, offset)
    FlattenedBucket.serialize()              -> base64(safetensors{"buffer"}, entries in metadata)
    tensors_from_update(payload)             -> the named tensors of an /update_weights_from_tensor body

safetensors bytes are safe to decode in another process (no pickle) and exact for every dtype.
A real SGLang server reads its own pickled format instead; `SGLangEngine` (sglang_adapter.py)
produces that one.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from k2sys.engine.protocol import ProtocolError, UpdateWeightsFromTensorPayload

__all__ = ["BucketEntry", "FlattenedBucket", "serialize_named_tensors", "deserialize_named_tensors",
           "tensors_from_update"]

_FORMAT_NAMED = "k2sys.named_tensors.v1"
_FORMAT_BUCKET = "k2sys.flattened_bucket.v1"


def _dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ProtocolError(f"dtype: {name!r} is not a torch dtype; use names like 'bfloat16'")
    return dt


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


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


def _b64decode(payload: str | bytes, field_name: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"{field_name}: not valid base64 ({exc}); encode with serialize_named_tensors()") from exc


def serialize_named_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """base64 text of a safetensors blob holding the tensors (order kept in its metadata)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in named:
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise ProtocolError(f"named_tensors: expected (str, Tensor) pairs, got ({type(name).__name__}, "
                                f"{type(t).__name__})")
        if name in tensors:
            raise ProtocolError(f"named_tensors: duplicate name {name!r}; send each tensor once")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():  # safetensors refuses tensors sharing storage (tied weights, views)
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    if not tensors:
        raise ProtocolError("named_tensors: empty; send at least one tensor")
    blob = st_save(tensors, metadata={"format": _FORMAT_NAMED, "order": json.dumps(list(tensors))})
    return base64.b64encode(blob).decode("ascii")


def deserialize_named_tensors(payload: str | bytes) -> list[tuple[str, torch.Tensor]]:
    """Inverse of serialize_named_tensors; also accepts a serialized FlattenedBucket."""
    blob = _b64decode(payload, "serialized_named_tensors")
    meta = _safetensors_metadata(blob)
    if meta.get("format") == _FORMAT_BUCKET:
        return FlattenedBucket.from_bytes(blob).unpack()
    if meta.get("format") != _FORMAT_NAMED:
        raise ProtocolError("serialized_named_tensors: not a k2sys payload (no format tag); an SGLang pickle "
                            "payload cannot be read by the native server, send safetensors via HTTPEngine")
    tensors = st_load(blob)
    return [(name, tensors[name]) for name in json.loads(meta["order"])]


@dataclass(frozen=True)
class BucketEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Byte offset in the bucket buffer (aligned, so the slice can be viewed as `dtype`)."""

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": _dtype_name(self.dtype), "shape": list(self.shape), "offset": self.offset}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BucketEntry:
        return cls(name=d["name"], dtype=_dtype_from_name(d["dtype"]), shape=tuple(int(x) for x in d["shape"]),
                   offset=int(d["offset"]))


class FlattenedBucket:
    """Many tensors of any dtypes in one contiguous uint8 buffer: one copy, one message.

    Entries start at `alignment`-byte offsets so `unpack()` returns zero-copy views.
    """

    def __init__(self, buffer: torch.Tensor, entries: Sequence[BucketEntry]):
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous():
            raise ProtocolError("buffer: must be a contiguous 1-D uint8 tensor; build buckets with FlattenedBucket.pack")
        names = set()
        for e in entries:
            if e.name in names:
                raise ProtocolError(f"entries: duplicate name {e.name!r}; each tensor goes in once")
            names.add(e.name)
            if e.offset < 0 or e.offset + e.nbytes > buffer.numel() or e.offset % e.dtype.itemsize:
                raise ProtocolError(f"entries[{e.name!r}]: offset {e.offset} (+{e.nbytes} bytes) does not fit a "
                                    f"{buffer.numel()}-byte buffer aligned for {e.dtype}")
        self.buffer = buffer
        self.entries = tuple(entries)

    @classmethod
    def pack(cls, named: Iterable[tuple[str, torch.Tensor]], alignment: int = 64,
             device: torch.device | str | None = None) -> FlattenedBucket:
        named = list(named)
        if not named:
            raise ProtocolError("named_tensors: empty; a bucket needs at least one tensor")
        if alignment < 16 or alignment & (alignment - 1):
            raise ProtocolError(f"alignment: {alignment} must be a power of two >= 16 (the largest itemsize)")
        entries, offset = [], 0
        for name, t in named:
            entries.append(BucketEntry(name=name, dtype=t.dtype, shape=tuple(t.shape), offset=offset))
            offset += -(-entries[-1].nbytes // alignment) * alignment
        dev = torch.device(device) if device is not None else named[0][1].device
        buffer = torch.empty(offset, dtype=torch.uint8, device=dev)
        for e, (_, t) in zip(entries, named):
            if e.nbytes:
                buffer[e.offset:e.offset + e.nbytes].copy_(t.detach().reshape(-1).view(torch.uint8))
        return cls(buffer, entries)

    @staticmethod
    def pack_size(named: Sequence[tuple[str, torch.Tensor]], alignment: int = 64) -> int:
        """Bytes `pack` needs for these tensors."""
        return sum(-(-t.numel() * t.element_size() // alignment) * alignment for _, t in named)

    def unpack(self) -> list[tuple[str, torch.Tensor]]:
        return [(e.name, self.buffer[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape))
                for e in self.entries]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def to_bytes(self) -> bytes:
        meta = {"format": _FORMAT_BUCKET, "entries": json.dumps([e.to_json() for e in self.entries])}
        return st_save({"buffer": self.buffer.detach().to("cpu").contiguous()}, metadata=meta)

    def serialize(self) -> str:
        return base64.b64encode(self.to_bytes()).decode("ascii")

    @classmethod
    def from_bytes(cls, blob: bytes) -> FlattenedBucket:
        meta = _safetensors_metadata(blob)
        if meta.get("format") != _FORMAT_BUCKET:
            raise ProtocolError("serialized_named_tensors: not a flattened bucket; send load_format=None for "
                                "plain named tensors")
        entries = [BucketEntry.from_json(d) for d in json.loads(meta["entries"])]
        return cls(st_load(blob)["buffer"], entries)

    @classmethod
    def deserialize(cls, payload: str | bytes) -> FlattenedBucket:
        return cls.from_bytes(_b64decode(payload, "serialized_named_tensors"))


def tensors_from_update(payload: UpdateWeightsFromTensorPayload, tp_rank: int = 0) -> list[tuple[str, torch.Tensor]]:
    """What a native server applies for one /update_weights_from_tensor body (its TP rank's entry)."""
    entries = payload.serialized_named_tensors
    data = entries[tp_rank] if len(entries) > 1 else entries[0]
    if payload.load_format == "flattened_bucket":
        return FlattenedBucket.deserialize(data).unpack()
    return deserialize_named_tensors(data)
