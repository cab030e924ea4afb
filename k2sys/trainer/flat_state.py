"""Optimizer state in one flat buffer per (device, dtype): one storage to move instead of hundreds.

torch.optim and Transformer Engine's FusedAdam create each parameter's moments (exp_avg,
exp_avg_sq, ...) as a tensor with a storage of its own: on k2-small that is 644 of the 981 storages
an offload moves. Every storage costs the switch a fixed amount whatever its size (the host arena's
bookkeeping and pointer swap on release and resume, a work item in the batched copy), so

    flatten_state(optimizers)

moves every such tensor into a flat buffer and re-points the tensor at its slice (`Tensor.set_`):
the optimizer keeps the same tensor objects, values are unchanged, and in-place updates land in
the buffer. Megatron's distributed optimizer keeps its shards flat for the same reason.

Only tensors that are the sole user of a whole, contiguous storage move (a view, or a storage
another tensor also holds, keeps its layout: re-pointing one alias would split it from the others).
A bare storage object someone keeps (`t.untyped_storage()` held on its own) is not seen: it keeps
the old bytes. Within k2sys only the StateOffloader holds storages, and it takes them afresh from
the tensors at every offload, after the flattening.
Calling it again is cheap and moves only what is new (state created after the last call, or a
loaded checkpoint's fresh tensors).
"""

from __future__ import annotations

from typing import Iterable

import torch

ALIGN_BYTES = 64
"""Each tensor's slice starts on a 64-byte boundary (a cache line; a full AVX-512 vector)."""


def _movable(t: torch.Tensor) -> bool:
    if t.dim() == 0 or t.is_sparse or t.requires_grad or not t.is_contiguous() or t.storage_offset() != 0:
        return False
    s = t.untyped_storage()
    if s.nbytes() != t.numel() * t.element_size() or s.nbytes() == 0:
        return False
    # s (this wrapper) + t's TensorImpl: nobody else (a view, another tensor, a held storage) uses it
    return torch._C._storage_Use_Count(s._cdata) == 2


def state_tensors(optimizers: Iterable[torch.optim.Optimizer]) -> list[tuple[dict, str]]:
    """(state dict, key) of every tensor entry of every parameter's optimizer state."""
    out = []
    for opt in optimizers:
        for st in opt.state.values():
            for k, v in st.items():
                if torch.is_tensor(v):
                    out.append((st, k))
    return out


def flatten_state(optimizers: Iterable[torch.optim.Optimizer]) -> dict[str, int]:
    """Move the movable state tensors of `optimizers` (torch.optim.Optimizer instances: their
    `.state`) into one new flat buffer per (device, dtype). Returns {"tensors": moved, "buffers":
    created, "bytes": moved bytes}. Values are preserved exactly."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for st, k in state_tensors(optimizers):
        t = st[k]
        if _movable(t):
            groups.setdefault((t.device, t.dtype), []).append(t)
    moved = buffers = nbytes = 0
    for (device, dtype), ts in groups.items():
        if len(ts) < 2:
            continue
        esize = ts[0].element_size()
        step = max(1, ALIGN_BYTES // esize)
        offsets, n = [], 0
        for t in ts:
            offsets.append(n)
            n += (t.numel() + step - 1) // step * step
        flat = torch.empty(n, dtype=dtype, device=device)
        storage = flat.untyped_storage()
        with torch.no_grad():
            for t, off in zip(ts, offsets):
                flat[off:off + t.numel()].copy_(t.reshape(-1))
                t.set_(storage, off, t.shape, t.stride())
        moved += len(ts)
        buffers += 1
        nbytes += sum(t.numel() for t in ts) * esize
    return {"tensors": moved, "buffers": buffers, "bytes": nbytes}
