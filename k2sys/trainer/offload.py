"""Offload / onload of trainer state: device storages <-> persistent host buffers, bit-exact.

    offload: unique storages of the given tensors -> byte copies into host buffers -> storages released
    onload:  storages resumed (nbytes each) -> byte copies back (same storages: every view stays valid)

Params of a Megatron DDP model are views into contiguous param/grad buffers, and optimizer state
is its own tensors; working per *storage* (deduplicated) moves each byte once and keeps all views
(param.main_grad, distributed-optimizer shards) pointing at the right place after onload.

Host buffers are allocated once and reused (docs/FACTS.md: copies into fresh memory run at a quarter of
the bound); on CUDA they are pinned and onload goes through k2sys.ext.h2d_copy_. On CPU all the
bytes of one offload or onload move in one batched C++ call (k2sys.ext thread pool), and the
"device" storages are released into and resumed from the process's host arena
(k2sys.host_arena): the memory the engine released a moment ago is what onload copies into, so
neither side page-faults fresh memory on every switch.

On CUDA, freed storage first returns to PyTorch's caching allocator, where only this process can
use it; offload then calls torch.cuda.empty_cache() so the blocks go back to the driver and the
colocated engine can take them, and reports what the allocator still reserves and what the device
has free (torch.cuda.mem_get_info, every process included): a leak shows in the switch metrics.
"""

from __future__ import annotations

import time

import torch

from k2sys import ext
from k2sys.host_arena import HostArena, host_arena


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


def _host_copy_all(copies: list[tuple[int, int, int]]) -> None:
    """Every (dst address, src address, nbytes) host copy in one C++ call, balanced over the thread
    pool by bytes (one call per storage would pay the pool's wake-up ~1000 times on a Megatron state)."""
    if copies:
        dsts, srcs, sizes = (list(x) for x in zip(*copies))
        ext.require_cpp().batched_copy_ptr(dsts, srcs, sizes, 0, 0)


class StateOffloader:
    def __init__(self, arena: HostArena | None = None) -> None:
        self.offloaded = False
        self.arena = arena if arena is not None else host_arena()
        self._storages: list[torch.UntypedStorage] = []
        self._host: list[torch.Tensor] = []
        self._host_of: dict[int, torch.Tensor] = {}  # storage (StorageImpl address) -> its host buffer
        self._views: dict[tuple, torch.Tensor] = {}  # host_view cache, valid while the host buffers are kept

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
        host_of = {s._cdata: h for s, h in zip(storages, self._host)}
        if host_of.keys() != self._host_of.keys() or any(self._host_of[k] is not h for k, h in host_of.items()):
            self._host_of, self._views = host_of, {}
        t0 = time.perf_counter()
        cpu = [(h.data_ptr(), s.data_ptr(), h.numel()) for s, h in zip(storages, self._host) if s.device.type == "cpu"]
        _host_copy_all(cpu)
        for s, h in zip(storages, self._host):
            if s.device.type == "cuda":
                h.copy_(_bytes_of(s, s.device), non_blocking=True)
        if any(s.device.type == "cuda" for s in storages):
            torch.cuda.synchronize()
        copy_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        self.arena.release(storages, user=self)  # CPU: into the host arena; CUDA: to the caching allocator
        release_s = time.perf_counter() - t1
        self.offloaded = True
        nbytes = sum(h.numel() for h in self._host)
        rep = {"bytes": nbytes, "seconds": copy_s, "release_seconds": release_s,
               "GBps": nbytes / max(copy_s, 1e-9) / 1e9, "tensors": len(storages)}
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
        key = (t.untyped_storage()._cdata, t.storage_offset(), t.shape, t.stride(), t.dtype)
        v = self._views.get(key)  # host buffers persist, so a view made once stays right
        if v is None:
            h = self._host_of.get(key[0])
            if h is None:
                raise KeyError("StateOffloader.host_view: tensor's storage was not offloaded by this offloader")
            v = self._views[key] = torch.empty(0, dtype=t.dtype).set_(h.untyped_storage(), t.storage_offset(),
                                                                       t.shape, t.stride())
        return v

    def onload(self) -> dict[str, float]:
        if not self.offloaded:
            raise RuntimeError("StateOffloader.onload: nothing is offloaded")
        t0 = time.perf_counter()
        got = self.arena.resume(self._storages, [h.numel() for h in self._host], user=self)
        alloc_s = time.perf_counter() - t0
        cpu = [(s.data_ptr(), h.data_ptr(), h.numel()) for s, h in zip(self._storages, self._host)
               if s.device.type == "cpu"]
        _host_copy_all(cpu)
        for s, h in zip(self._storages, self._host):
            if s.device.type == "cuda":
                ext.h2d_copy_(_bytes_of(s, s.device), h)
        if any(s.device.type == "cuda" for s in self._storages):
            torch.cuda.synchronize()
        copy_s = time.perf_counter() - t0
        self.offloaded = False
        nbytes = sum(h.numel() for h in self._host)
        # seconds include getting the storages back (alloc_seconds of them). On CPU the arena hands
        # over touched memory (reused_bytes); fresh_bytes page-fault during the copy.
        return {"bytes": nbytes, "seconds": copy_s, "alloc_seconds": alloc_s, "reused_bytes": got.reused_bytes,
                "fresh_bytes": got.fresh_bytes, "GBps": nbytes / max(copy_s, 1e-9) / 1e9,
                "tensors": len(self._storages)}

    def buffers(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(live storages as uint8 tensors, host buffers), in the same order, while onloaded: the
        buffers offload/onload copy between (benchmarks time their copy bound on these)."""
        if self.offloaded:
            raise RuntimeError("StateOffloader.buffers: offloaded; the live storages hold no bytes")
        return [_bytes_of(s, s.device) for s in self._storages], list(self._host)
