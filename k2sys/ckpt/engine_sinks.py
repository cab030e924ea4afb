"""Engine sinks: one per transport from the trainer to an inference engine (see k2sys.ckpt.sink).

    NativeEngineSink        the native engine in this process: the pipeline writes straight into
                            the engine's weight storage (stale after release/resume) or its
                            session staging; FP8 engines quantize each ready group once
    NativeServerSink        `k2sys serve` in another process: out-buckets written into a reused
                            /dev/shm segment (CPU) or a CUDA buffer sent by IPC handle (GPU), or
                            base64 bodies when the server is on another host; the engine copies
                            each bucket into its weights on arrival
    SGLangTensorSink        SGLang colocated: /update_weights_from_tensor with sglang's own
                            flattened_bucket payload (its FlattenedTensorMetadata over our buffer,
                            one serialized entry per engine TP rank, CUDA IPC handles on GPU)
    SGLangDistributedSink   SGLang on other GPUs or nodes: /init_weights_update_group once, then per
                            bucket /update_weights_from_distributed + one broadcast of the bucket
                            from trainer rank 0 over that group (NCCL), laid out as sglang's
                            FlattenedTensorBucket.empty expects (back to back, itemsize-sorted)

SGLang takes whole HF-named tensors on every TP rank and shards them in its own load_weights
(DeepseekV2 also derives w_kc/w_vc there), so its sinks send whole tensors; the native engine is
one device and takes whole tensors too. Every sink checks the engine's weight version after the
commit (`version_checked`), so a lost update cannot pass for a landed one.

`sink_for(engine)` picks the sink of an engine object (what update_weights does with one).
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Optional, Sequence

import torch

from k2sys.ckpt.bucket import FlattenedBucket, sort_for_packing
from k2sys.ckpt.layout import Layout, hf_layout
from k2sys.ckpt.sink import BucketSink, BufferPool
from k2sys.ckpt.types import PlanError, TensorSpec, UpdateError


class NativeEngineSink:
    """The native engine (k2sys.engine.NativeEngine) in this process (see the module doc)."""

    def __init__(self, engine: Any):
        for m in ("begin_weight_update", "weight_target", "weights_ready", "end_weight_update",
                  "abort_weight_update"):
            if not callable(getattr(engine, m, None)):
                raise TypeError(f"NativeEngineSink: {type(engine).__name__} lacks {m}(); use a k2sys NativeEngine")
        self.engine = engine
        self.layout: Optional[Layout] = None
        self._key: Optional[tuple] = None
        self.version_checked: Optional[str] = None
        self.next_version: Optional[str] = None
        """Weight version the next update sets (None: the engine's counter)."""

    def destination(self, sources: Mapping[str, TensorSpec]) -> Layout:
        key = tuple((s.name, s.shape, str(s.dtype)) for s in sources.values())
        if key != self._key:
            from k2sys.engine.core.config import RequestError

            for s in sources.values():
                try:
                    self.engine.check_weight(s.name, s.dtype, s.shape)
                except RequestError as e:
                    raise PlanError(f"native engine cannot take the trainer's tensor: {e}") from None
            self.layout = hf_layout({s.name: s.shape for s in sources.values()},
                                    {s.name: s.dtype for s in sources.values()}, name="native engine")
            self._key = key
        return self.layout

    def begin(self) -> None:
        version, self.next_version = self.next_version, None
        self.engine.begin_weight_update(weight_version=version)

    def target(self, name: str) -> torch.Tensor:
        spec = self.layout.tensors[name]
        return self.engine.weight_target(name, spec.dtype, spec.shape)

    def ready(self, names: Sequence[str]) -> None:
        self.engine.weights_ready(names)

    def commit(self) -> str:
        version = self.engine.end_weight_update()
        if self.engine.weight_version != version:
            raise UpdateError(f"native engine reports weight version {self.engine.weight_version!r} after an update "
                              f"that set {version!r}")
        self.version_checked = version
        return version

    def abort(self) -> None:
        self.engine.abort_weight_update()

    def engine_bytes_copied(self) -> int:
        return int(self.engine.last_update.get("bytes_copied", 0))


class _HTTPBucketSink(BucketSink):
    """Shared parts of the sinks that post buckets to a server (`client`: an HTTPEngine)."""

    def __init__(self, client: Any, bucket_bytes: int):
        super().__init__(bucket_bytes)
        self.client = client
        self.next_version: Optional[str] = None
        """Weight version the next update sets (None: the client's counter, "1", "2", ...)."""
        self.version_checked: Optional[str] = None
        self._version: Optional[str] = None

    def _open(self) -> None:
        self.client.begin_weight_update()
        if self.next_version is not None:  # the caller names the version (the coordinator: the policy's)
            self.client._pending_version, self.next_version = str(self.next_version), None
        self._version = self.client._pending_version

    def _finish(self) -> Optional[str]:
        version = self.client.end_weight_update()
        served = self._served_version()
        if served != version:
            raise UpdateError(f"{type(self).__name__}: the engine reports weight version {served!r} after an update "
                              f"that set {version!r}; the update did not land")
        self.version_checked = version
        return version

    def _served_version(self) -> Optional[str]:
        info = self.client.get_model_info()
        v = info.get("weight_version") if isinstance(info, dict) else None
        return None if v is None else str(v)

    def _discard(self) -> None:
        try:
            self.client.abort_weight_update()
        except Exception:  # the error that aborted the update is the one to report
            pass


class NativeServerSink(_HTTPBucketSink):
    """`k2sys serve` behind an HTTPEngine (see the module doc). transport: "auto" (shm, or cuda_ipc
    for CUDA buckets, on the same host; http otherwise), "shm", "cuda_ipc" or "http"."""

    align = 64

    def __init__(self, client: Any, *, transport: str = "auto", bucket_bytes: Optional[int] = None,
                 device: Optional[str | torch.device] = None):
        super().__init__(client, bucket_bytes or client.shm_bucket_bytes)
        self.device = torch.device(device) if device is not None else \
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.mode = client.resolve_transport(transport, on_cuda=self.device.type == "cuda")
        if self.mode == "cuda_ipc" and self.device.type != "cuda":
            raise ValueError("NativeServerSink: transport cuda_ipc needs CUDA buckets (device='cuda')")
        if self.mode == "shm":
            from k2sys.engine.transport.shm import ShmPool

            self._shm = ShmPool(min_bytes=self.bucket_bytes)
        else:
            dev = self.device if self.mode == "cuda_ipc" else torch.device("cpu")
            self._pool = BufferPool(lambda n: torch.empty(n, dtype=torch.uint8, device=dev))

    def _alloc(self, nbytes: int) -> torch.Tensor:
        return self._shm.acquire(nbytes) if self.mode == "shm" else self._pool.get(nbytes)

    def _free(self, buf: torch.Tensor) -> None:
        if self.mode == "shm":
            self._shm.release(buf)
        else:
            self._pool.put(buf)

    def _send(self, bucket: FlattenedBucket) -> None:
        if self.mode == "shm":
            self.client.send_shm(bucket, self._shm.segment_of(bucket.buffer), self._version, release=False)
        elif self.mode == "cuda_ipc":
            self.client.send_cuda_ipc(bucket, self._version)
        else:
            self.client.send_http(bucket, self._version)

    def _finish(self) -> Optional[str]:
        version = super()._finish()
        if self.mode == "cuda_ipc":
            torch.cuda.ipc_collect()
        return version

    def engine_bytes_copied(self) -> int:
        """What the server's engine copied in the last update (its /get_server_info)."""
        info = self.client.server_info()
        return int((info.get("weight_update") or {}).get("bytes_copied", 0))

    def close(self) -> None:
        if self.mode == "shm":
            self._shm.close()
        else:
            self._pool.clear()


class SGLangTensorSink(_HTTPBucketSink):
    """SGLang colocated (see the module doc): `client` is an SGLangEngine, `tp_size` the engine's
    TP size (one payload entry per TP rank)."""

    align = 256

    def __init__(self, client: Any, *, tp_size: Optional[int] = None, bucket_bytes: int = 512 << 20,
                 device: Optional[str | torch.device] = None):
        super().__init__(client, bucket_bytes)
        self.tp_size = int(tp_size or client.tp_size)
        if self.tp_size < 1:
            raise ValueError(f"SGLangTensorSink: tp_size {self.tp_size} must be >= 1")
        self.device = torch.device(device) if device is not None else \
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self._pool = BufferPool(lambda n: torch.empty(n, dtype=torch.uint8, device=self.device))
        self.bodies_sent = 0

    def _alloc(self, nbytes: int) -> torch.Tensor:
        return self._pool.get(nbytes)

    def _free(self, buf: torch.Tensor) -> None:
        self._pool.put(buf)

    def close(self) -> None:
        self._pool.clear()

    def _send(self, bucket: FlattenedBucket) -> None:
        from k2sys.engine.api.sglang_adapter import tensor_update_body

        if bucket.buffer.device.type == "cuda":
            torch.cuda.current_stream(bucket.buffer.device).synchronize()  # sglang reads it on its own streams
        self.client._post("update_tensor", tensor_update_body(bucket, self.tp_size, self._version))
        self.bodies_sent += 1

    def _served_version(self) -> Optional[str]:
        return self.client.model_weight_version()

    def _finish(self) -> Optional[str]:
        version = super()._finish()
        if self.device.type == "cuda":
            torch.cuda.ipc_collect()
        return version


class SGLangDistributedSink(_HTTPBucketSink):
    """SGLang on other GPUs/nodes (see the module doc). This process is rank 0 of the update group
    `group_name` (master_address:master_port); the engine's TP x DP ranks join at rank_offset 1, so
    world_size = 1 + the engine's GPU count. backend: nccl (GPU) or gloo (CPU tests)."""

    align = 1

    def __init__(self, client: Any, *, master_address: str, master_port: int, world_size: int,
                 group_name: str = "weight_update_group", backend: str = "nccl", bucket_bytes: int = 512 << 20,
                 timeout_s: float = 600.0):
        super().__init__(client, bucket_bytes)
        from k2sys.engine.api.sglang_adapter import InitWeightsUpdateGroupPayload

        self.init_payload = InitWeightsUpdateGroupPayload(master_address=master_address, master_port=master_port,
                                                          rank_offset=1, world_size=world_size,
                                                          group_name=group_name, backend=backend)
        self.timeout_s = timeout_s
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self._pool = BufferPool(lambda n: torch.empty(n, dtype=torch.uint8, device=self.device))
        self.group: Any = None

    def order(self, specs: list[TensorSpec]) -> list[TensorSpec]:
        return sort_for_packing(specs)

    def _alloc(self, nbytes: int) -> torch.Tensor:
        return self._pool.get(nbytes)

    def _free(self, buf: torch.Tensor) -> None:
        self._pool.put(buf)

    def close(self) -> None:
        self._pool.clear()
        if self.group is not None:
            import torch.distributed as dist

            try:
                dist.destroy_process_group(self.group)
            except Exception:  # the engine side may be gone already
                pass
            self.group = None

    def _both(self, post, collective, what: str) -> None:
        """Run the engine's HTTP call in a thread while this process does its side of the collective."""
        err: list[BaseException] = []

        def call() -> None:
            try:
                post()
            except BaseException as e:  # noqa: BLE001 - reported below
                err.append(e)
        t = threading.Thread(target=call, name=f"k2sys-{what}", daemon=True)
        t.start()
        try:
            collective()
        finally:
            t.join(self.timeout_s)
        if err:
            raise err[0]
        if t.is_alive():
            raise UpdateError(f"SGLangDistributedSink: {what}: the engine did not answer within {self.timeout_s:.0f} s")

    def init_group(self) -> None:
        """Create the update group with the engine (once); both sides block until all ranks joined."""
        if self.group is not None:
            return
        import datetime

        from sglang.srt.utils.common import init_custom_process_group

        p = self.init_payload
        box: list[Any] = []
        self._both(lambda: self.client.init_weights_update_group(p),
                   lambda: box.append(init_custom_process_group(
                       backend=p.backend, init_method=f"tcp://{p.master_address}:{p.master_port}",
                       world_size=p.world_size, rank=0, group_name=p.group_name,
                       timeout=datetime.timedelta(seconds=self.timeout_s))), "init_weights_update_group")
        self.group = box[0]

    def _open(self) -> None:
        self.init_group()
        super()._open()

    def _send(self, bucket: FlattenedBucket) -> None:
        import torch.distributed as dist

        from k2sys.ckpt.types import dtype_name
        from k2sys.engine.api.sglang_adapter import UpdateWeightsFromDistributedPayload

        end = max(e.end for e in bucket.entries)
        gap = next((e for e, f in zip(bucket.entries, bucket.entries[1:]) if e.end != f.offset), None)
        if bucket.entries[0].offset != 0 or gap is not None:
            raise UpdateError(f"SGLangDistributedSink: bucket is not laid out back to back at {gap}; sglang's "
                              "receiver allocates FlattenedTensorBucket.empty(names, dtypes, shapes)")
        payload = UpdateWeightsFromDistributedPayload(
            names=tuple(e.name for e in bucket.entries), dtypes=tuple(dtype_name(e.dtype) for e in bucket.entries),
            shapes=tuple(e.shape for e in bucket.entries), group_name=self.init_payload.group_name,
            flush_cache=False, weight_version=self._version, load_format="flattened_bucket")
        buf = bucket.buffer[:end]
        self._both(lambda: self.client.update_weights_from_distributed(payload),
                   lambda: dist.broadcast(buf, src=0, group=self.group), "update_weights_from_distributed")

    def _served_version(self) -> Optional[str]:
        return self.client.model_weight_version()


def sink_for(engine: Any, **kwargs: Any) -> Any:
    """The sink of an engine object: NativeEngine -> NativeEngineSink, SGLangEngine ->
    SGLangTensorSink (colocated), HTTPEngine (`k2sys serve`) -> NativeServerSink."""
    from k2sys.engine.api.client import HTTPEngine
    from k2sys.engine.api.sglang_adapter import SGLangEngine

    if isinstance(engine, SGLangEngine):
        return SGLangTensorSink(engine, **kwargs)
    if isinstance(engine, HTTPEngine):
        return NativeServerSink(engine, **kwargs)
    if callable(getattr(engine, "weight_target", None)):
        return NativeEngineSink(engine)
    raise TypeError(f"update_weights: no sink for {type(engine).__name__}; pass a WeightSink (k2sys.ckpt.sink, "
                    "k2sys.ckpt.engine_sinks) or an engine of k2sys.engine")
