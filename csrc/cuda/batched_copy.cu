#include <algorithm>
#include <vector>

#include "cuda/batched_copy.h"
#include "cuda/cuda_check.h"

namespace k2sys::cuda {
namespace {

__global__ void batched_copy_kernel(const std::uint64_t* __restrict__ dst, const std::uint64_t* __restrict__ src,
                                    const std::uint64_t* __restrict__ sizes, std::size_t n) {
  // grid.y strides over segments, grid.x * block.x over bytes of a segment.
  for (std::size_t seg = blockIdx.y; seg < n; seg += gridDim.y) {
    char* d = reinterpret_cast<char*>(dst[seg]);
    const char* s = reinterpret_cast<const char*>(src[seg]);
    const std::size_t len = sizes[seg];
    const std::size_t tid = blockIdx.x * blockDim.x + threadIdx.x;
    const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
    const bool aligned = ((reinterpret_cast<std::uintptr_t>(d) | reinterpret_cast<std::uintptr_t>(s)) & 15) == 0;
    std::size_t head = 0;
    if (aligned) {
      const std::size_t n16 = len / 16;
      auto* d16 = reinterpret_cast<uint4*>(d);
      const auto* s16 = reinterpret_cast<const uint4*>(s);
      for (std::size_t i = tid; i < n16; i += stride) d16[i] = s16[i];
      head = n16 * 16;
    }
    for (std::size_t i = head + tid; i < len; i += stride) d[i] = s[i];
  }
}

}  // namespace

void batched_copy_d2d(const std::uint64_t* dst, const std::uint64_t* src, const std::uint64_t* sizes, std::size_t n,
                      int device, std::uintptr_t stream) {
  if (n == 0) return;
  K2_CUDA_CHECK(cudaSetDevice(device));
  auto st = reinterpret_cast<cudaStream_t>(stream);
  std::vector<std::uint64_t> meta;
  meta.reserve(3 * n);
  meta.insert(meta.end(), dst, dst + n);
  meta.insert(meta.end(), src, src + n);
  meta.insert(meta.end(), sizes, sizes + n);
  std::uint64_t* dmeta = nullptr;
  K2_CUDA_CHECK(cudaMallocAsync(&dmeta, meta.size() * sizeof(std::uint64_t), st));
  K2_CUDA_CHECK(cudaMemcpyAsync(dmeta, meta.data(), meta.size() * sizeof(std::uint64_t), cudaMemcpyHostToDevice, st));
  std::uint64_t max_len = *std::max_element(sizes, sizes + n);
  const int threads = 256;
  const unsigned gx = static_cast<unsigned>(std::clamp<std::uint64_t>((max_len / 16 + threads - 1) / threads, 1, 1024));
  const unsigned gy = static_cast<unsigned>(std::min<std::size_t>(n, 65535));
  batched_copy_kernel<<<dim3(gx, gy), threads, 0, st>>>(dmeta, dmeta + n, dmeta + 2 * n, n);
  K2_CUDA_CHECK(cudaGetLastError());
  K2_CUDA_CHECK(cudaFreeAsync(dmeta, st));
  K2_CUDA_CHECK(cudaStreamSynchronize(st));
}

}  // namespace k2sys::cuda
