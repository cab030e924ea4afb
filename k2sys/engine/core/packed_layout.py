"""oneDNN's packed linear weights, re-packed in place by k2sys's C++ core.

The native engine keeps a oneDNN-packed copy of each fp32 linear weight on CPU (the GEMMs of a
batched step run ~2x faster on it). After every weight update the copy must be rebuilt, and
oneDNN's own path (`torch.ops.mkldnn._reorder_linear_weight`) allocates a new tensor and reorders
at ~5 GB/s with its per-call setup: ~15-25 ms of every k2-small switch for 73 MB. This module
finds, once per weight shape, which blocked layout oneDNN chose, and then rewrites an existing
packed tensor's buffer from the plain weight with `_C.pack_blocked_f32_ptr` (a threaded tiled
transpose at about copy speed).

The layout is not assumed: `layout_for(n, k)` packs an index weight through oneDNN itself, reads
the packed buffer back, and accepts a candidate (block sizes bn x bk, element and block order)
only when it reproduces every element position and the zero padding. A shape whose layout fits
none of the candidates keeps oneDNN's reorder (`layout_for` returns None). The check is bit-exact,
so a oneDNN version or ISA that packs differently is detected, not silently mis-packed.
"""

from __future__ import annotations

import ctypes
import threading
from typing import NamedTuple, Optional

import torch

from k2sys.ext import _C

try:
    _pack = torch.ops.mkldnn._reorder_linear_weight
    _data_ptr = torch.ops.mkldnn.data_ptr
    _nbytes = torch.ops.mkldnn._nbytes
except (AttributeError, RuntimeError):  # torch without oneDNN (or without these ops)
    _pack = _data_ptr = _nbytes = None

__all__ = ["BlockedLayout", "layout_for", "repack_"]

_EXACT = 1 << 24  # float32 holds every integer up to 2**24 exactly
MAX_PROBE_NUMEL = 1 << 26
"""Largest weight (elements) whose layout is probed; larger ones keep oneDNN's own reorder."""


class BlockedLayout(NamedTuple):
    bn: int              # output rows per block (N padded to a multiple)
    bk: int              # input columns per block (K padded to a multiple)
    n_fastest: bool      # inside a block: element (n, k) at k * bn + n (else n * bk + k)
    outer_n_major: bool  # block (nb, kb) at nb * KB + kb (else kb * NB + nb)

    def numel(self, n: int, k: int) -> int:
        return -(-n // self.bn) * self.bn * -(-k // self.bk) * self.bk

    def positions(self, n: int, k: int, j: torch.Tensor) -> torch.Tensor:
        """Flat index into W [n, k] of the packed elements `j` (int64; -1 where padding)."""
        NB, KB, bs = -(-n // self.bn), -(-k // self.bk), self.bn * self.bk
        block, r = j // bs, j % bs
        nb, kb = (block // KB, block % KB) if self.outer_n_major else (block % NB, block // NB)
        kk, nn = (r // self.bn, r % self.bn) if self.n_fastest else (r % self.bk, r // self.bk)
        row, col = nb * self.bn + nn, kb * self.bk + kk
        return torch.where((row < n) & (col < k), row * k + col, torch.full((), -1, dtype=torch.int64))


_BLOCKS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
_cache: dict[tuple[int, int, int], Optional[BlockedLayout]] = {}
_lock = threading.Lock()


def _read_packed(p: torch.Tensor) -> torch.Tensor:
    """A copy of the packed tensor's buffer as float32."""
    nb = int(_nbytes(p))
    raw = (ctypes.c_char * nb).from_address(int(_data_ptr(p)))
    return torch.frombuffer(raw, dtype=torch.float32).clone()


def _probe(n: int, k: int, rows: int) -> Optional[BlockedLayout]:
    """Pack an index weight through oneDNN; the layout is the first candidate (largest blocks first)
    whose formula matches the first packed elements and whose C++ packing of the same weight is
    bit-identical to oneDNN's buffer, padding included."""
    numel = n * k
    # every element a distinct exact float: its index + 1 (padding reads 0); above 2**24 elements,
    # two weights carry (index // 2**24 + 1, index % 2**24)
    idx = torch.arange(numel, dtype=torch.int64)
    weights = [idx + 1] if numel < _EXACT else [idx // _EXACT + 1, idx % _EXACT]
    weights = [w.to(torch.float32).view(n, k) for w in weights]
    refs = [_read_packed(_pack(w, rows)) for w in weights]
    if numel < _EXACT:
        flat = refs[0].to(torch.int64) - 1
    else:
        hi, lo = refs[0].to(torch.int64), refs[1].to(torch.int64)
        flat = torch.where(hi > 0, (hi - 1) * _EXACT + lo, torch.full((), -1, dtype=torch.int64))
    head = torch.arange(min(flat.numel(), 4096))
    for bn in reversed(_BLOCKS):
        for bk in reversed(_BLOCKS):
            for n_fastest in (True, False):
                for outer_n_major in (True, False):
                    lay = BlockedLayout(bn, bk, n_fastest, outer_n_major)
                    if lay.numel(n, k) != flat.numel() or not torch.equal(lay.positions(n, k, head),
                                                                          flat[:head.numel()]):
                        continue
                    ok = True
                    for w, ref in zip(weights, refs):
                        mine = torch.empty_like(ref)
                        _C.pack_blocked_f32_ptr(mine.data_ptr(), w.data_ptr(), n, k, k, bn, bk, n_fastest,
                                                outer_n_major, 0)
                        ok = ok and torch.equal(mine.view(torch.int32), ref.view(torch.int32))
                    if ok:
                        return lay
    return None


def layout_for(n: int, k: int, rows: int) -> Optional[BlockedLayout]:
    """The blocked layout oneDNN packs an fp32 [n, k] linear weight into (for `rows`-row GEMMs), or
    None when it is not one this module can write (or oneDNN / the C++ core is missing)."""
    if _pack is None or _C is None or not hasattr(_C, "pack_blocked_f32_ptr"):
        return None
    if n * k > MAX_PROBE_NUMEL:  # the probe's index weights would take > 1.5 GB: oneDNN's reorder stays
        return None
    key = (n, k, rows)
    with _lock:
        if key not in _cache:
            try:
                _cache[key] = _probe(n, k, rows)
            except RuntimeError:
                _cache[key] = None
        return _cache[key]


def repack_(packed: torch.Tensor, w: torch.Tensor, lay: BlockedLayout, threads: int = 0) -> None:
    """Write the fp32 weight `w` [n, k] (row stride >= k, unit column stride) into `packed`, a
    oneDNN-packed tensor of w's shape whose layout is `lay`."""
    n, k = w.shape
    if w.dtype != torch.float32 or w.stride(1) != 1 or w.device.type != "cpu":
        raise ValueError(f"repack_: needs a CPU float32 weight with unit column stride, got {w.dtype} "
                         f"{w.device} strides {w.stride()}")
    if tuple(packed.shape) != (n, k) or _nbytes(packed) != 4 * lay.numel(n, k):
        raise ValueError(f"repack_: packed tensor {tuple(packed.shape)} ({_nbytes(packed)} bytes) does not hold "
                         f"a {lay} packing of [{n}, {k}]")
    _C.pack_blocked_f32_ptr(_data_ptr(packed), w.data_ptr(), n, k, w.stride(0), lay.bn, lay.bk, lay.n_fastest,
                            lay.outer_n_major, threads)
