// Multi-threaded chunked copy between host buffers: the CPU half of the pipelined onload.
#pragma once
#include <cstddef>
#include <cstdint>

namespace k2sys {

// Copies nbytes from src to dst using `threads` workers over chunks of `chunk_bytes`
// (rounded up to 4 KiB; <= 0 picks a size that gives every thread a few chunks).
// Regions must not overlap. Safe to call without the GIL.
void parallel_copy(void* dst, const void* src, std::size_t nbytes, int threads, std::int64_t chunk_bytes);

// Zeroes many (dst, nbytes) regions, balanced over the pool by bytes, with streaming stores.
void batched_zero(const std::uint64_t* dst_ptrs, const std::uint64_t* sizes, std::size_t n, int threads);

// Applies many independent (dst, src, nbytes) copies, balanced over the pool by bytes:
// large copies are split into chunks, small ones are grouped. Regions must not overlap.
void batched_copy(const std::uint64_t* dst_ptrs, const std::uint64_t* src_ptrs, const std::uint64_t* sizes,
                  std::size_t n, int threads, std::int64_t chunk_bytes);

}  // namespace k2sys
