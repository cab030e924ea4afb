"""Paged KV cache in MLA's compressed layout, with a refcounted block allocator.

MLA needs only the normed latent (C) and the rotated rope key (R) per token to rebuild every
head's K and V, so the cache stores [C + R] values per token per layer, not H * (N + V) for K
and V: 576 vs 32768 values per token at Kimi-K2 shapes. Tokens live in fixed-size blocks;
a sequence owns a block table. Blocks are refcounted so the n samples of one prompt share the
prompt's full blocks (a partial last block is copied at fork time, so appends never write into
a shared block).

Layout: cache[layer] is [num_blocks, block_size, C + R]; slot = block_id * block_size + offset.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Callable

import torch

from k2sys.engine.core.config import EngineError

__all__ = ["BlockAllocator", "OutOfBlocks", "PagedLatentCache"]


class OutOfBlocks(EngineError):
    """The KV cache has no free block; the scheduler retracts or waits."""


class BlockAllocator:
    """Free list + refcounts over block ids 0..num_blocks-1, with a prefix cache.

    Prefix cache (automatic prefix caching): a full block whose tokens were computed is registered
    under a chained key (the key of the block before it + its own tokens), so a later request
    whose prompt starts with the same tokens reuses the block instead of recomputing it (the next
    turn of a multi-turn episode re-sends the whole conversation). A registered block whose last
    owner releases it stays cached but evictable: allocate() takes plain free blocks first, then
    evicts cached ones least recently used first. `flush_prefix_cache()` forgets every key (new
    weights make all cached KV stale).
    """

    def __init__(self, num_blocks: int, on_allocate: Callable[[list[int]], None] | None = None):
        self.num_blocks = num_blocks
        self.on_allocate = on_allocate
        """Called with each allocate()'s blocks before they are handed out (PagedLatentCache zeroes
        the ones not written since its storage was resumed)."""
        self.refcount = [0] * num_blocks
        # Pop from the end: low ids are handed out first, which keeps tests readable.
        self._free = list(range(num_blocks - 1, -1, -1))
        self._by_key: dict[bytes, int] = {}          # chained block key -> block id
        self._key_of: dict[int, bytes] = {}          # block id -> its key
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, refcount 0, LRU first
        self.hit_blocks = 0
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks allocate() can hand out (plain free + evictable cached)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._key_of)

    def allocate(self, count: int = 1) -> list[int]:
        if count > self.num_free:
            raise OutOfBlocks(f"KV cache: need {count} blocks, {self.num_free} free of {self.num_blocks}; "
                              "raise EngineConfig.max_total_tokens or send fewer concurrent requests")
        out = []
        for _ in range(count):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._by_key[self._key_of.pop(b)]
                self.evictions += 1
            self.refcount[b] = 1
            out.append(b)
        if self.on_allocate is not None:
            self.on_allocate(out)
        return out

    def share(self, blocks: list[int]) -> list[int]:
        """Another owner for these blocks (prefix sharing)."""
        for b in blocks:
            if self.refcount[b] <= 0:
                raise EngineError(f"KV block {b} is not allocated; cannot share it")
            self.refcount[b] += 1
        return list(blocks)

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            rc = self.refcount[b]
            if rc <= 0:
                raise EngineError(f"KV block {b} released twice")
            self.refcount[b] = rc - 1
            if rc == 1:
                if b in self._key_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    # ---- prefix cache ------------------------------------------------------------------------
    @staticmethod
    def block_key(parent: bytes | None, tokens: list[int] | tuple[int, ...]) -> bytes:
        """The chained key of a full block: a 128-bit digest of the previous block's key and its tokens."""
        h = hashlib.blake2b(parent or b"root", digest_size=16)
        h.update(array("q", tokens).tobytes())
        return h.digest()

    def register(self, block: int, key: bytes) -> None:
        """Offer a computed full block to the cache (a no-op if the key already has a block)."""
        if self.refcount[block] <= 0:
            raise EngineError(f"KV block {block} is not allocated; cannot cache it")
        if key in self._by_key or block in self._key_of:
            return
        self._by_key[key] = block
        self._key_of[block] = key

    def lookup(self, key: bytes) -> int | None:
        """The cached block for `key`, now owned by the caller (refcount + 1), or None."""
        b = self._by_key.get(key)
        if b is None:
            return None
        if self.refcount[b] == 0:
            del self._evictable[b]
        self.refcount[b] += 1
        self.hit_blocks += 1
        return b

    def flush_prefix_cache(self) -> None:
        """Forget every cached key; evictable blocks become plain free blocks."""
        for b in self._evictable:
            self._free.append(b)
        self._evictable.clear()
        self._by_key.clear()
        self._key_of.clear()

    def reset(self) -> None:
        self.__init__(self.num_blocks, self.on_allocate)


class PagedLatentCache:
    """Per-layer block storage of [latent | rotated rope key] plus the allocator."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, latent_dim: int, rope_dim: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu"):
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.latent_dim, self.rope_dim = latent_dim, rope_dim
        self.width = latent_dim + rope_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.allocator = BlockAllocator(num_blocks, self._zero_unwritten)
        self.layers = [torch.zeros(num_blocks, block_size, self.width, dtype=dtype, device=self.device)
                       for _ in range(num_layers)]
        self.released = False
        self._unzeroed: set[int] = set()  # blocks holding whatever the resumed memory held (CPU)

    def _zero_unwritten(self, blocks: list[int]) -> None:
        """Zero the blocks among `blocks` not written since resume, as the allocator hands them out."""
        if not self._unzeroed:
            return
        todo = [b for b in blocks if b in self._unzeroed]
        if todo:
            idx = torch.tensor(todo, device=self.device)
            for t in self.layers:
                t.index_fill_(0, idx, 0)
            self._unzeroed.difference_update(todo)

    @property
    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.layers)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- writes and reads ------------------------------------------------------------------
    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        """slots [T] int64, latent [T, C], k_rope [T, R] -> cache rows."""
        flat = self.layers[layer].view(-1, self.width)
        flat.index_copy_(0, slots, torch.cat([latent, k_rope], dim=-1).to(self.dtype))

    def gather(self, layer: int, block_tables: torch.Tensor) -> torch.Tensor:
        """block_tables [B, nb] -> [B, nb * block_size, C + R] (positions in order)."""
        B, nb = block_tables.shape
        return self.layers[layer].index_select(0, block_tables.reshape(-1)).view(B, nb * self.block_size, self.width)

    def copy_block(self, src: int, dst: int) -> None:
        for t in self.layers:
            t[dst].copy_(t[src])

    # ---- memory release (RL colocation) -------------------------------------------------------
    def release(self, user: object = None) -> None:
        """Give the storage up (0 bytes; the allocator forgets every block): on CPU into the process's
        host arena (k2sys.host_arena), for a colocated trainer to onload into; `user` is the side
        releasing (the engine), which decides whether the arena keeps the memory."""
        from k2sys.host_arena import host_arena

        host_arena().release([t.untyped_storage() for t in self.layers], user=user)
        self.allocator.reset()
        self.released = True

    def resume(self, user: object = None) -> None:
        """Storage back (from the arena's touched memory on CPU), zeroed before it is read: blocks
        are read whole, and stale bytes could hold NaN patterns that masked attention would still
        multiply. On CPU only block 0 (what block tables are padded with) is zeroed here; every
        other block is zeroed when the allocator first hands it out, so a switch does not pay for
        zeroing the whole pool (k2-small: ~0.01 s) and the blocks a rollout never uses are not touched."""
        from k2sys.host_arena import host_arena

        nbytes = self.num_blocks * self.block_size * self.width * torch.empty((), dtype=self.dtype).element_size()
        host_arena().resume([t.untyped_storage() for t in self.layers], [nbytes] * len(self.layers), user=user)
        if self.device.type == "cpu":
            for t in self.layers:
                t[0].zero_()
            self._unzeroed = set(range(1, self.num_blocks))
        else:
            for t in self.layers:
                t.zero_()
        self.released = False
