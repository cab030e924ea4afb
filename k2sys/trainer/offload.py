"""Offload / onload of trainer state: device storages <-> persistent host buffers, bit-exact.

    offload: unique storages of the given tensors -> byte copies into host buffers -> storage.resize_(0)
    onload:  storage.resize_(nbytes) -> byte copies back (same storages, so every view stays valid)

Params of a Megatron DDP model are views into contiguous param/grad buffers, and optimizer state
is its own tensors; working per *storage* (deduplicated) moves each byte once and keeps all views
(param.main_grad, distributed-optimizer shards) pointing at the right place after onload.

Host buffers are allocated once and reused (FACTS.md: copies into fresh memory run at a quarter of
the bound); on CUDA they are pinned and onload goes through k2sys.ext.h2d_copy_. On CPU the bytes
move with k2sys.ext.host_copy_ (the C++ thread pool) and the "device" storage is freed the same way.

On CUDA, freed storage first returns to PyTorch's caching allocator, where only this process can
use it; offload then calls torch.cuda.empty_cache() so the blocks go back to the driver and the
colocated engine can take them, and reports what the allocator still reserves and what the device
has free (torch.cuda.mem_get_info, every process included): a leak shows in the switch metrics.
"""

from __future__ import annotations

import time

import torch

from k2sys import ext


def device_memory(device: torch.device | int | None = None) -> dict[str, int]:
    """This process's reserved / allocated CUDA bytes and the device's free / total bytes (all
    processes, torch.cuda.mem_get_info); {} without CUDA."""
    if not torch.cuda.is_available():
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {"device_free_bytes": int(free), "device_total_bytes": int(total),
            "reserved_bytes": int(torch.cuda.memory_reserved(device)),
            "allocated_bytes": int(torch.cuda.memory_allocated(device))}


def _bytes_of(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


class StateOffloader:
    def __init__(self) -> None:
        self.offloaded = False
        self._storages: list[torch.UntypedStorage] = []
        self._host: list[torch.Tensor] = []

    @staticmethod
    def unique_storages(tensors: list[torch.Tensor]) -> list[torch.UntypedStorage]:
        seen: dict[int, torch.UntypedStorage] = {}
        for t in tensors:
            s = t.untyped_storage()
            if s.nbytes() > 0:
                seen.setdefault(s.data_ptr(), s)
        return list(seen.values())

    def offload(self, tensors: list[torch.Tensor]) -> dict[str, float]:
        if self.offloaded:
            raise RuntimeError("StateOffloader.offload: already offloaded; call onload() first")
        storages = self.unique_storages(tensors)
        if [s.nbytes() for s in storages] != [h.numel() for h in self._host] or len(storages) != len(self._storages):
            pin = any(s.device.type == "cuda" for s in storages)
            self._host = [torch.empty(s.nbytes(), dtype=torch.uint8, pin_memory=pin) for s in storages]
        self._storages = storages
        t0 = time.perf_counter()
        for s, h in zip(storages, self._host):
            src = _bytes_of(s, s.device)
            if s.device.type == "cuda":
                h.copy_(src, non_blocking=True)
            else:
                ext.host_copy_(h, src)
        if any(s.device.type == "cuda" for s in storages):
            torch.cuda.synchronize()
        copy_s = time.perf_counter() - t0
        for s in storages:
            s.resize_(0)
        self.offloaded = True
        nbytes = sum(h.numel() for h in self._host)
        rep = {"bytes": nbytes, "seconds": copy_s, "GBps": nbytes / max(copy_s, 1e-9) / 1e9, "tensors": len(storages)}
        devices = {s.device for s in storages if s.device.type == "cuda"}
        if devices:
            t0 = time.perf_counter()
            torch.cuda.empty_cache()  # hand the freed blocks back to the driver (the engine's turn)
            rep["empty_cache_seconds"] = time.perf_counter() - t0
            rep.update(device_memory(devices.pop()))
        return rep

    def host_view(self, t: torch.Tensor) -> torch.Tensor:
        """While offloaded: `t`'s values as a view into the host copy (same shape, strides, offset).

        Lets the checkpoint engine read the weights from DRAM after offload (the paper's path:
        train -> offload -> broadcast from host), without onloading or cloning."""
        if not self.offloaded:
            raise RuntimeError("StateOffloader.host_view: nothing is offloaded")
        key = t.untyped_storage()._cdata
        for s, h in zip(self._storages, self._host):
            if s._cdata == key:
                return torch.empty(0, dtype=t.dtype).set_(h.untyped_storage(), t.storage_offset(), t.shape, t.stride())
        raise KeyError("StateOffloader.host_view: tensor's storage was not offloaded by this offloader")

    def onload(self) -> dict[str, float]:
        if not self.offloaded:
            raise RuntimeError("StateOffloader.onload: nothing is offloaded")
        t0 = time.perf_counter()
        for s, h in zip(self._storages, self._host):
            s.resize_(h.numel())
        alloc_s = time.perf_counter() - t0
        for s, h in zip(self._storages, self._host):
            dst = _bytes_of(s, s.device)
            if s.device.type == "cuda":
                ext.h2d_copy_(dst, h)
            else:
                ext.host_copy_(dst, h)
        if any(s.device.type == "cuda" for s in self._storages):
            torch.cuda.synchronize()
        copy_s = time.perf_counter() - t0
        self.offloaded = False
        nbytes = sum(h.numel() for h in self._host)
        # seconds include re-allocating the device storage (alloc_seconds of them): on CPU that is
        # fresh pages, i.e. page faults during the first copy, the dominant cost.
        return {"bytes": nbytes, "seconds": copy_s, "alloc_seconds": alloc_s,
                "GBps": nbytes / max(copy_s, 1e-9) / 1e9, "tensors": len(self._storages)}
