// One kernel launch applies many device-to-device byte copies (the slices of a reshard plan).
#pragma once
#include <cstddef>
#include <cstdint>

namespace k2sys::cuda {

// dst/src/sizes are host arrays of n device addresses and byte counts; copied to the device
// once, then one grid (blockIdx.y = segment) copies every segment with 16-byte vector
// loads where alignment allows. stream 0 = the current default stream. Blocks until done.
void batched_copy_d2d(const std::uint64_t* dst, const std::uint64_t* src, const std::uint64_t* sizes, std::size_t n,
                      int device, std::uintptr_t stream);

}  // namespace k2sys::cuda
