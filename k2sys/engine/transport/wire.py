"""Weight payloads of the native server: bit-exact, pickle-free encodings.

    serialize_named_tensors([(name, t)...])  -> base64(safetensors{name: t}, order in metadata)
    FlattenedBucket.pack([(name, t)...])     -> one uint8 buffer + (name, dtype, shape, offset)
    FlattenedBucket.serialize()              -> base64(safetensors{"buffer"}, entries in metadata)
    tensors_from_update(payload)             -> the named tensors of an /update_weights_from_tensor body

FlattenedBucket and BucketEntry are the checkpoint engine's one bucket type (k2sys.ckpt.bucket),
re-exported here. safetensors bytes are safe to decode in another process (no pickle) and exact
for every dtype. A real SGLang server reads its own pickled format instead: the SGLang sinks
(k2sys.ckpt.engine_sinks, through k2sys.engine.api.sglang_adapter) produce that one.
"""

from __future__ import annotations

import base64
import json
from typing import Iterable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from k2sys.ckpt.bucket import FlattenedBucket, _safetensors_metadata
from k2sys.ckpt.types import BucketEntry
from k2sys.engine.api.protocol import ProtocolError, UpdateWeightsFromTensorPayload

__all__ = ["BucketEntry", "FlattenedBucket", "serialize_named_tensors", "deserialize_named_tensors",
           "tensors_from_update"]

_FORMAT_NAMED = "k2sys.named_tensors.v1"


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
    if meta.get("format") == FlattenedBucket.FORMAT:
        return FlattenedBucket.from_bytes(blob).unpack()
    if meta.get("format") != _FORMAT_NAMED:
        raise ProtocolError("serialized_named_tensors: not a k2sys payload (no format tag); an SGLang pickle "
                            "payload cannot be read by the native server, send safetensors via HTTPEngine")
    tensors = st_load(blob)
    return [(name, tensors[name]) for name in json.loads(meta["order"])]


def tensors_from_update(payload: UpdateWeightsFromTensorPayload, tp_rank: int = 0) -> list[tuple[str, torch.Tensor]]:
    """What a native server applies for one /update_weights_from_tensor body (its TP rank's entry)."""
    entries = payload.serialized_named_tensors
    data = entries[tp_rank] if len(entries) > 1 else entries[0]
    if payload.load_format == "flattened_bucket":
        return FlattenedBucket.deserialize(data).unpack()
    return deserialize_named_tensors(data)
