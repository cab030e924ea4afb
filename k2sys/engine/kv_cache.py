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

import torch

from k2sys.engine.config import EngineError

__all__ = ["BlockAllocator", "OutOfBlocks", "PagedLatentCache"]


class OutOfBlocks(EngineError):
    """The KV cache has no free block; the scheduler retracts or waits."""


class BlockAllocator:
    """Free list + refcounts over block ids 0..num_blocks-1."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refcount = [0] * num_blocks
        # Pop from the end: low ids are handed out first, which keeps tests readable.
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int = 1) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocks(f"KV cache: need {count} blocks, {len(self._free)} free of {self.num_blocks}; "
                              "raise EngineConfig.max_total_tokens or send fewer concurrent requests")
        out = [self._free.pop() for _ in range(count)]
        for b in out:
            self.refcount[b] = 1
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
                self._free.append(b)

    def reset(self) -> None:
        self.__init__(self.num_blocks)


class PagedLatentCache:
    """Per-layer block storage of [latent | rotated rope key] plus the allocator."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, latent_dim: int, rope_dim: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu"):
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.latent_dim, self.rope_dim = latent_dim, rope_dim
        self.width = latent_dim + rope_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.allocator = BlockAllocator(num_blocks)
        self.layers = [torch.zeros(num_blocks, block_size, self.width, dtype=dtype, device=self.device)
                       for _ in range(num_layers)]
        self.released = False

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
    def release(self) -> None:
        """Free the storage for real (resize to 0 bytes); the allocator forgets every block."""
        for t in self.layers:
            t.untyped_storage().resize_(0)
        self.allocator.reset()
        self.released = True

    def resume(self) -> None:
        nbytes = self.num_blocks * self.block_size * self.width * torch.empty((), dtype=self.dtype).element_size()
        for t in self.layers:
            t.untyped_storage().resize_(nbytes)
            t.zero_()
        self.released = False
