"""The InferenceEngine protocol on a real SGLang server (>= 0.5.23), over HTTP.

`SGLangEngine` is `HTTPEngine` with SGLang's weight encoding. SGLang reads
`serialized_named_tensors[tp_rank]` with `MultiprocessingSerializer.deserialize` (base64, then
its SafeUnpickler: only allow-listed torch/sglang classes) on each TP rank, and with
load_format "flattened_bucket" rebuilds the tensors with its FlattenedTensorBucket:

    one bucket      -> {"flattened_tensor": uint8 buffer, "metadata": [FlattenedTensorMetadata]}
                       (sglang's own metadata class over our bucket's entries: no repacking; the
                       buffer may hold tensors of every dtype, sglang >= 0.5.23)
    CUDA tensors    -> sglang's serializer (ForkingPickler: CUDA IPC handles, zero-copy, same node;
                       device UUIDs via sglang's monkey_patch_torch_reductions, as its receiver
                       expects); one entry per engine TP rank, each pickled separately (each rank
                       releases its own IPC reference); the buffer lives until the call returns
    CPU tensors     -> plain pickle (the bytes travel inside the entry; ForkingPickler would pass a
                       shared-memory file descriptor). Tests and CPU-only flows; one string reused
                       for every TP rank.

The checkpoint engine's SGLang sinks (k2sys.ckpt.engine_sinks) build these payloads from the
buckets the pipeline fills. Version notes (sglang 0.5.23, read in its source): update_weights_from_*
must sit between /begin_weight_update and /end_weight_update, else success=False; pause/continue exist
only as HTTP routes; release/resume need --enable-memory-saver and an idle engine; /model_info reports the
weight_version the last update set.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from k2sys.engine.api.client import EngineHTTPError, FlattenedBucket, HTTPEngine
from k2sys.engine.api.protocol import LOAD_FORMATS, PausedRequest, ProtocolError, colocated_update

MIN_SGLANG_VERSION = "0.5.23"
_INSTALL_HINT = ("install sglang>=0.5.23 on a CUDA machine (pip install 'sglang>=0.5.23'); never on CPU "
                 "machines, its wheel pins a CUDA torch (docs/FACTS.md)")


def sglang_available() -> bool:
    try:
        import sglang  # noqa: F401
    except Exception:  # ImportError, or a CUDA stack that fails at import on CPU machines
        return False
    return True


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def _has_cuda_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.is_cuda
    if isinstance(obj, dict):
        return any(_has_cuda_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_cuda_tensor(v) for v in obj)
    return False


def sglang_serialize(obj: Any) -> str:
    """Text that sglang's MultiprocessingSerializer.deserialize reads back into `obj` (see the
    module doc: sglang's own serializer for CUDA tensors, plain pickle for CPU tensors)."""
    if _has_cuda_tensor(obj):
        try:
            from sglang.srt.utils import MultiprocessingSerializer
            from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
        except ImportError as e:
            raise ImportError(f"CUDA weight payloads for SGLang need sglang importable here: {_INSTALL_HINT}") from e
        monkey_patch_torch_reductions()  # device UUIDs in the IPC handles, as sglang's receiver reads them
        return MultiprocessingSerializer.serialize(obj, output_str=True)
    buf = io.BytesIO()
    pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def sglang_bucket_object(bucket: FlattenedBucket) -> dict[str, Any]:
    """SGLang's load_format="flattened_bucket" object for one bucket: our buffer as its
    `flattened_tensor`, one sglang FlattenedTensorMetadata per entry (byte offsets as they are)."""
    try:
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata
    except ImportError as e:
        raise ImportError(f"SGLang weight payloads pickle sglang's FlattenedTensorMetadata: {_INSTALL_HINT} "
                          "(tests: pip install sglang==0.5.23 --no-deps, scripts/install.sh)") from e
    meta = [FlattenedTensorMetadata(name=e.name, shape=torch.Size(e.shape), dtype=e.dtype, start_idx=e.offset,
                                    end_idx=e.end, numel=e.nbytes) for e in bucket.entries]
    buf = bucket.buffer
    if buf.device.type == "cpu" and buf.untyped_storage().nbytes() != buf.numel():
        buf = buf.clone()  # pickle writes a tensor's whole storage: send only this bucket's bytes
    return {"flattened_tensor": buf, "metadata": meta}


def tensor_update_body(bucket: FlattenedBucket, tp_size: int, weight_version: str | None, *,
                       flush_cache: bool = False) -> dict[str, Any]:
    """The JSON body of POST /update_weights_from_tensor (sglang's UpdateWeightsFromTensorReqInput)
    carrying one bucket: one serialized entry per engine TP rank."""
    if tp_size < 1:
        raise ProtocolError(f"tp_size: {tp_size} must be >= 1 (the engine's tensor parallel size)")
    obj = sglang_bucket_object(bucket)
    if _has_cuda_tensor(obj):
        entries = [sglang_serialize(obj) for _ in range(tp_size)]
    else:
        entries = [sglang_serialize(obj)] * tp_size
    return {"serialized_named_tensors": entries, "load_format": "flattened_bucket", "flush_cache": flush_cache,
            "abort_all_requests": False, "weight_version": weight_version}


@dataclass(frozen=True, kw_only=True)
class UpdateWeightsFromDistributedPayload:
    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    """torch dtype names without the prefix, e.g. 'bfloat16' (SGLang's convention)."""
    shapes: tuple[tuple[int, ...], ...]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    load_format: str | None = None

    def __post_init__(self) -> None:
        n = len(self.names)
        if not n:
            raise ProtocolError("names: is empty; send at least one tensor")
        if len(self.dtypes) != n or len(self.shapes) != n:
            raise ProtocolError(f"dtypes/shapes: lengths {len(self.dtypes)}/{len(self.shapes)} differ from names "
                                f"({n}); send one dtype and shape per name")
        object.__setattr__(self, "shapes", tuple(tuple(int(x) for x in s) for s in self.shapes))
        if self.load_format not in LOAD_FORMATS:
            raise ProtocolError(f"load_format: {self.load_format!r} is unsupported; use one of {list(LOAD_FORMATS)}")

    def to_sglang(self) -> dict[str, Any]:
        return {"names": list(self.names), "dtypes": list(self.dtypes), "shapes": [list(s) for s in self.shapes],
                "group_name": self.group_name, "flush_cache": self.flush_cache,
                "abort_all_requests": self.abort_all_requests, "weight_version": self.weight_version,
                "load_format": self.load_format}


@dataclass(frozen=True, kw_only=True)
class InitWeightsUpdateGroupPayload:
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"

    def __post_init__(self) -> None:
        if not 0 < self.master_port < 65536:
            raise ProtocolError(f"master_port: {self.master_port} is out of range; use a TCP port in 1..65535")
        if self.world_size < 2 or not 0 < self.rank_offset < self.world_size:
            raise ProtocolError(f"rank_offset/world_size: {self.rank_offset}/{self.world_size} is inconsistent; the "
                                "trainer is rank 0, engine ranks start at rank_offset >= 1 below world_size")

    def to_sglang(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class SGLangEngine(HTTPEngine):
    """A running `sglang.launch_server` behind the InferenceEngine protocol."""

    # SGLang's routes only (no /update_weights_from_shm, no /abort_weight_update): checked against
    # sglang's http_server in tests/test_sglang_payloads.py
    ROUTES = {**{k: v for k, v in HTTPEngine.ROUTES.items() if k not in ("update_shm", "abort_update")},
              "server_info": "/server_info", "model_info": "/model_info",
              "init_group": "/init_weights_update_group", "update_dist": "/update_weights_from_distributed",
              "destroy_group": "/destroy_weights_update_group"}

    def encode_named_tensors(self, named: list[tuple[str, torch.Tensor]]) -> str:
        return sglang_serialize([(name, t.detach()) for name, t in named])

    def encode_bucket(self, bucket: FlattenedBucket) -> list[tuple[str | None, str]]:
        return [("flattened_bucket", sglang_serialize(sglang_bucket_object(bucket)))]

    def send_http(self, bucket: FlattenedBucket, version: str | None) -> None:
        """POST one bucket in SGLang's flattened_bucket format, one entry per TP rank."""
        self._post("update_tensor", tensor_update_body(bucket, self.tp_size, version))

    def model_weight_version(self) -> str | None:
        """The weight_version SGLang reports in /model_info (set by the last weight update)."""
        info = self._call("GET", "model_info", idempotent=True)
        if not isinstance(info, dict) or "weight_version" not in info:
            raise EngineHTTPError(self._url("model_info"), 200, "no 'weight_version' in the answer; is this SGLang "
                                  ">= 0.5.23?")
        v = info["weight_version"]
        return None if v is None else str(v)

    def server_version(self) -> str:
        info = self._call("GET", "server_info", idempotent=True)
        if not isinstance(info, dict) or "version" not in info:
            raise EngineHTTPError(self._url("server_info"), 200, "no 'version' in the answer; is this SGLang?")
        return str(info["version"])

    def check_version(self, minimum: str = MIN_SGLANG_VERSION) -> str:
        v = self.server_version()
        if _version_tuple(v) < _version_tuple(minimum):
            raise RuntimeError(f"sglang server is {v}; k2sys needs >= {minimum} (weight-update sessions); "
                               f"upgrade sglang on the GPU nodes")
        return v

    weights_stale = False
    """True after an update that did not complete: SGLang has no abort, so whatever part of it
    was loaded stays in the weights until the next complete update."""

    def end_weight_update(self) -> str | None:
        version = super().end_weight_update()
        self.weights_stale = False
        return version

    def abort_weight_update(self) -> None:
        """SGLang has no abort route: close the session (/end_weight_update) and mark the weights
        stale (`weights_stale`): the part already loaded stays loaded, so push again before
        generating (the coordinator's push raises, and its retry pushes everything)."""
        self.weights_stale = True
        self._pending_version = None
        self._post("end", {})

    def colocated_update(self, weights: Iterable[Any] | Callable[[], Iterable[Any]], *,
                         train_step: Callable[[], Any] | None = None, pause_mode: str = "abort",
                         weight_version: str | None = None) -> tuple[list[PausedRequest], str | None]:
        """pause -> release(all) -> train -> resume(weights) -> begin -> update -> end ->
        resume(kv_cache, cuda_graph) -> flush -> continue (see protocol.colocated_update)."""
        return colocated_update(self, weights, train_step=train_step, pause_mode=pause_mode,
                                weight_version=weight_version)

    def init_weights_update_group(self, payload: InitWeightsUpdateGroupPayload) -> None:
        self._post("init_group", payload.to_sglang())

    def update_weights_from_distributed(self, payload: UpdateWeightsFromDistributedPayload) -> None:
        """The engine side of a broadcast from the trainer (call inside a begin/end session)."""
        self._post("update_dist", payload.to_sglang())
